"""Certificates and keys for a deployment (``hsl flower keys``), made with ``cryptography``.

- ``ca.crt`` / ``ca.key``: a certificate authority of the consortium's own; every SuperNode gets
  ``ca.crt`` to check the SuperLink's identity; ``ca.key`` stays offline with whoever runs it;
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate (signed by the CA) for the host
  names and addresses the sites connect to;
- ``<site>`` / ``<site>.pub``: each site's node key (ECDSA P-384, OpenSSH format, as
  ``ssh-keygen -t ecdsa -b 384`` makes): the private key stays at the site, the public key is
  registered with the SuperLink (``flwr supernode register``), which then admits only those sites.

The same files can be made with openssl and ssh-keygen (see the deployment guide); this command
saves typing and gets the certificate's subject alternative names right.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from hsl_lightning.errors import HSLError


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


#: names of the SuperLink's own machine, always in its certificate (its SuperExec connects to 127.0.0.1)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def make_keys(out: str | os.PathLike, sites: list[str], hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write the CA, the SuperLink's certificate for ``hosts`` and one node key pair per site name
    into ``out``; returns the paths by role. Existing files are never overwritten."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"] + [n for s in sites for n in (s, f"{s}.pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise HSLError(f"{out} already holds {', '.join(existing)}; keys are never overwritten (choose another --out).")
    if len(set(sites)) != len(sites) or any(not s or "/" in s or s.startswith(".") for s in sites):
        raise HSLError(f"Site names must be distinct plain file names, got {sites}.")
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("hsl_lightning deployment CA"))
          .issuer_name(_name("hsl_lightning deployment CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.crt", ca.public_bytes(pem), private=False)
    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain), private=True)

    # the SuperLink's own SuperExec reaches it at 127.0.0.1 through the same TLS port, so this machine's
    # names are always in the certificate, whatever names the sites use
    hosts = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))
    alt = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(alt), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    _write(out / "server.pem", server.public_bytes(pem), private=False)
    _write(out / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain), private=True)

    paths = {"ca": out / "ca.crt", "server_cert": out / "server.pem", "server_key": out / "server.key"}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / site, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / f"{site}.pub", public + f" {site}\n".encode(), private=False)
        paths[site] = out / site
    return paths
