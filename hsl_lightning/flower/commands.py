"""``hsl flower ...``: the commands a deployment's IT staff run besides Flower's own.

- ``hsl flower keys``: the CA, the SuperLink's certificate and the sites' node keys;
- ``hsl flower app``: a Flower app folder that runs an ``hsl fit`` config (``flwr run`` submits it);
- ``hsl flower supernode``: checks a site's certificate, key, connection and data, each failure
  one message naming the site, then starts ``flower-supernode`` with the same options.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import sys
from pathlib import Path

from hsl_lightning.errors import HSLError
from hsl_lightning.flower.nodeconfig import load_site_config, missing_paths, parse_node_config


def check_tls(address: str, ca: Path, site: str, timeout: float = 10.0) -> None:
    """Open a TLS connection to the SuperLink at ``address`` trusting only ``ca``: an unreachable
    SuperLink or a certificate the CA did not sign becomes one message naming the site."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise HSLError(f"Site {site}: {ca} is not a readable PEM CA certificate ({exc}).") from exc
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as exc:
        raise HSLError(f"Site {site}: the SuperLink at {address} presents a certificate that {ca} does not vouch for "
                       f"({exc.verify_message}): wrong CA certificate, or a server certificate made for another "
                       "host name.") from exc
    except (OSError, ValueError) as exc:
        raise HSLError(f"Site {site}: cannot reach the SuperLink at {address} ({exc}). Is it running, and is the "
                       "port open from this site?") from exc


def check_key(path: Path, site: str) -> None:
    """The node's private key must exist and be an OpenSSH EC key (``ssh-keygen -t ecdsa -b 384``)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not path.is_file():
        raise HSLError(f"Site {site}: the node key {path} does not exist.")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise HSLError(f"Site {site}: {path} is not an unencrypted OpenSSH private key ({exc}); make one with "
                       "`hsl flower keys` or `ssh-keygen -t ecdsa -b 384 -N \"\" -f KEY`.") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HSLError(f"Site {site}: {path} is a {type(key).__name__}; Flower's node authentication needs an "
                       "ECDSA key (ssh-keygen -t ecdsa -b 384).")


def check_data(node_config: dict, site: str) -> None:
    """A ``data-config`` named in the node config must exist, parse as YAML, and name only files and
    folders that exist here."""
    try:
        text = load_site_config(node_config.get("data-config"))
    except HSLError as exc:
        raise HSLError(f"Site {site}: {exc}") from exc
    missing = missing_paths(text)
    if missing:
        raise HSLError(f"Site {site}: the data config {node_config['data-config']} names "
                       f"{', '.join(missing)}, which {'does' if len(missing) == 1 else 'do'} not exist on this machine.")


def supernode(argv: list[str]) -> None:
    """``hsl flower supernode``: check the site's certificate, key, data and connection, then start it."""
    parser = argparse.ArgumentParser(prog="hsl flower supernode", description=(
        "Check this site's CA certificate, node key, connection to the SuperLink and data config, then start "
        "flower-supernode with the same options (any further options are passed on)."))
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--root-certificates", required=True, help="the consortium's CA certificate (ca.crt)")
    parser.add_argument("--auth-supernode-private-key", required=True, help="this site's node key")
    parser.add_argument("--node-config", required=True, help="e.g. 'node-index=0 site-dir=\"/srv/hsl\"'")
    parser.add_argument("--check-only", action="store_true", help="run the checks, do not start the SuperNode")
    args, rest = parser.parse_known_args(argv)
    node_config = parse_node_config(args.node_config)
    if "node-index" not in node_config:
        raise HSLError("--node-config needs node-index=<this hospital's index in the run config>.")
    site = node_config.get("name") or f"site{node_config['node-index']}"
    ca = Path(args.root_certificates)
    if not ca.is_file():
        raise HSLError(f"Site {site}: the CA certificate {ca} does not exist.")
    check_key(Path(args.auth_supernode_private_key), site)
    check_data(node_config, site)
    check_tls(args.superlink, ca, site)
    print(f"hsl: site {site}: CA certificate, node key, data config and TLS connection to {args.superlink} are fine.",
          flush=True)
    if args.check_only:
        return
    exe = shutil.which("flower-supernode")
    if exe is None:
        raise HSLError("flower-supernode is not installed: pip install 'hsl_lightning[flower]'.")
    command = [exe, "--superlink", args.superlink, "--root-certificates", str(ca), "--auth-supernode-private-key",
               args.auth_supernode_private_key, "--node-config", args.node_config, *rest]
    # Flower's SuperExec looks for a new message every second by default; a tenth of a second costs a
    # negligible local request and takes up to 0.9 s off every round (a site may still set its own).
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    sys.stdout.flush()
    os.execv(exe, command)


def keys(argv: list[str]) -> None:
    """``hsl flower keys``: the CA, the SuperLink's certificate and the sites' node keys."""
    from hsl_lightning.flower.keys import make_keys

    parser = argparse.ArgumentParser(prog="hsl flower keys", description=(
        "Make a CA, the SuperLink's TLS certificate and one node key pair per site."))
    parser.add_argument("--out", required=True, help="folder for the files (must not hold them yet)")
    parser.add_argument("--sites", nargs="+", required=True, help="site names, e.g. hospital1 hospital2")
    parser.add_argument("--hosts", nargs="+", default=[],
                        help="names and addresses the sites reach the SuperLink by, e.g. superlink.example.org "
                             "(localhost, 127.0.0.1 and ::1 are always added: Flower's SuperExec uses them)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = parser.parse_args(argv)
    paths = make_keys(args.out, args.sites, args.hosts, args.days)
    print(f"hsl: wrote {args.out}/ca.crt (give to every site), server.pem + server.key (SuperLink only), "
          f"ca.key (keep offline), and a key pair per site: {', '.join(args.sites)} "
          f"(private key to that site only; register the .pub with the SuperLink).")
    return paths


def app(argv: list[str]) -> None:
    """``hsl flower app``: a Flower app folder that runs an ``hsl fit`` config."""
    from hsl_lightning.flower.app import write_app

    parser = argparse.ArgumentParser(prog="hsl flower app", description=(
        "Write a Flower app folder that runs an hsl fit config on SuperNodes (submit it with flwr run)."))
    parser.add_argument("--config", required=True, help="the hsl fit YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--out", required=True, help="the app folder to write")
    parser.add_argument("--run-dir", help="where the SuperLink's machine writes the run (default: the config's)")
    args = parser.parse_args(argv)
    out = write_app(args.config, args.out, args.run_dir)
    print(f"hsl: wrote {out}/pyproject.toml; submit it with: flwr run {out} <superlink-connection> --stream")


COMMANDS = {"keys": keys, "app": app, "supernode": supernode}


def main(argv: list[str]) -> None:
    """``hsl flower SUBCOMMAND``."""
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    if not argv or argv[0] not in COMMANDS:
        raise HSLError(f"usage: hsl flower {{{','.join(COMMANDS)}}} ... (hsl flower keys --help for one's options)")
    COMMANDS[argv[0]](argv[1:])
