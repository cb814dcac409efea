"""``hsl flower ...``: the commands a deployment's IT staff run besides Flower's own.

- ``hsl flower keys``: the CA, the SuperLink's certificate and the sites' node keys;
- ``hsl flower app``: a Flower app folder that runs an ``hsl fit`` config (``flwr run`` submits it),
  and the run's digest, which each site approves;
- ``hsl flower approve`` / ``hsl flower digest``: a site approves a run's digest (its node config's
  ``approved-runs`` file), or recomputes the digest of an app folder it was sent
  (``hsl_lightning/flower/approval.py``);
- ``hsl flower supernode``: checks a site's certificate, key, connection, data and that the
  SuperLink has registered its key, each failure
  one message naming the site, then starts ``flower-supernode`` with the same options;
- ``hsl flower stop-workers``: stops a site's worker processes now, by their pid files;
- ``hsl flower proxy``: writes (or, with ``--check``, checks) the nginx configuration through which
  the hospitals reach only the SuperLink's Fleet API (``hsl_lightning/flower/proxy.py``).
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


def key_fingerprint(public_key) -> str:
    """``SHA256:...`` of an EC public key, as ``ssh-keygen -lf KEY.pub`` prints it."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    blob = base64.b64decode(public_key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# A registered key is told from an unregistered one by the SuperNode's own first call, ActivateNode,
# sent with an out-of-range heartbeat interval. Found in flwr 1.42.0 (paths inside site-packages/flwr):
# - supernode/fleet_http_connection.py:221-231: a SuperNode given a key only calls ActivateNode
#   (RegisterNode is for key-less, self-registering SuperNodes); the request carries the public key,
#   signed as supernode/node_auth_http_interceptor.py:49-61 does (flwr-public-key, flwr-timestamp,
#   flwr-signature over the timestamp only).
# - superlink/routers/fleet/node_auth.py:69-73: for ActivateNode the SuperLink checks only that the
#   signature is valid and the key matches the request's (401 otherwise); every other Fleet call
#   (node_auth.py:75-81) also needs the node id the key was registered under, which a site does not
#   know, so they answer 401 whether or not the key is registered. RegisterNode answers 2001 to all
#   when --enable-supernode-auth is on (servicer/fleet/fleet_handlers.py:85-88).
# - servicer/fleet/fleet_handlers.py:101-129 activate_node: looks the key up first (110-112: unknown
#   key -> ApiError 2004, HTTP 412), THEN validates the heartbeat interval (113, bounds 10..1800 s,
#   common/constant.py:48-49, fleet_handlers.py:486-492: out of range -> ApiError 2003, HTTP 400),
#   and only then activates the node (114). Interval 0 therefore answers 2003 for a registered key
#   and 2004 for an unregistered one, having only read the state: get_node_id_by_public_key is a
#   SELECT (server/superlink/linkstate/sql_linkstate.py:925-938). The node stays "registered", never
#   "online", and the ServerApp only sees online nodes (sql_linkstate.py:839-843). Error codes and
#   HTTP statuses: supercore/error/catalog.py:335-344, JSON {"code", "detail"}: supercore/error/http.py:60-78.
#   The SuperLink logs one ERROR line per probe ([/v1/fleet/activate-node][ApiError:2003] ...).
# - A fresh random key is probed too: it must answer 2004, else the SuperLink does not look the key
#   up before validating (another Flower version) and the answer says nothing.
# - `flwr supernode list` shows node ids, owner and status, not public keys (cli/supernode/ls.py:
#   225-233): a coordinator compares the fingerprint printed here with `ssh-keygen -lf KEY.pub`.
def _activate_probe(address: str, ca: Path, private_key, timeout: float) -> tuple[int | None, int]:
    """(ApiError code, HTTP status) of an ActivateNode call with heartbeat interval 0 (never activates)."""
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import FlowerError
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    public_key = private_key.public_key()
    request = ActivateNodeRequest(public_key=public_key_to_bytes(public_key), heartbeat_interval=0.0)
    with FleetHttpClient(f"https://{address}", interceptors=[NodeAuthHttpInterceptor(private_key, public_key)],
                         verify=str(ca), timeout=timeout) as client:
        try:
            client.ActivateNode(request)
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            return (error.code if error else None), exc.response.status_code
    return None, 200


def check_registered(address: str, ca: Path, key_path: Path, site: str, timeout: float = 10.0) -> bool:
    """Ask the SuperLink whether it has registered this site's node key, without activating the node
    (see the comment above for how, in flwr 1.42). True: registered; an unregistered key, a refused
    signature or an unreachable Fleet API is one message naming the site; False: this SuperLink's
    answer cannot tell (printed as a note)."""
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = load_ssh_private_key(key_path.read_bytes(), password=None)
    fingerprint = key_fingerprint(key.public_key())
    pub = key_path.with_name(key_path.name + ".pub")
    try:
        code, http_status = _activate_probe(address, ca, key, timeout)
        control = _activate_probe(address, ca, ec.generate_private_key(ec.SECP384R1()), timeout)[0] \
            if code == 2003 else None
    except ImportError as exc:
        print(f"hsl: site {site}: cannot check whether the SuperLink has registered the node key: flwr is not "
              f"installed here ({exc}).", flush=True)
        return False
    except httpx.HTTPError as exc:
        raise HSLError(f"Site {site}: the SuperLink at {address} accepts TLS but its Fleet API did not answer "
                       f"({type(exc).__name__}: {exc}).") from exc
    if code == 2004:
        raise HSLError(f"Site {site}: the SuperLink at {address} has not registered this site's node key "
                       f"{key_path} (public key {fingerprint}); Flower would refuse the SuperNode (Failed to "
                       f"activate SuperNode). Ask the coordinator to register it: `flwr supernode register {pub} "
                       f"<superlink-connection> --name {site}` (`ssh-keygen -lf {pub}` shows the same fingerprint).")
    if http_status == 401:
        raise HSLError(f"Site {site}: the SuperLink at {address} refused the node key's signature (HTTP 401): "
                       "this machine's clock differs from the SuperLink's (Flower allows 5 s ahead, 300 s behind), or "
                       "a proxy in between drops the flwr-public-key, flwr-timestamp and flwr-signature headers.")
    if code == 2003 and control == 2004:
        return True
    print(f"hsl: site {site}: cannot tell whether the SuperLink has registered the node key {key_path} (public key "
          f"{fingerprint}): its Fleet API answered HTTP {http_status} (code {code}"
          f"{'' if control is None else f'; code {control} for a random key'}), not what Flower 1.42 answers. "
          "Ask the coordinator to check `flwr supernode list`.", flush=True)
    return False


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


def check_images(node_config: dict, site: str) -> None:
    """``hsl check`` on the site's data config (``--check-only`` with a ``data-config``): every file read and
    transformed, the report printed; its problems stop the SuperNode from being started."""
    from hsl_lightning.config import data_module_of
    from hsl_lightning.data.check import check, format_report

    report = check(data_module_of(["--config", str(Path(node_config["data-config"]).expanduser())]), progress=False)
    print(format_report(report), flush=True)
    if report["problems"]:
        raise HSLError(f"Site {site}: hsl check found {len(report['problems'])} problem(s) in the data config's images "
                       "(listed above); fix them before starting the SuperNode.")


def with_mask_signing(text: str, node_config: dict, key: Path, site: str) -> str:
    """The node config with what secure aggregation needs: ``node-key`` (the node key, which signs the
    site's mask key: by default the one Flower authenticates it by) and ``consortium-keys`` (every
    site's ``<name>.pub``, to check the peers' mask keys: by default the node key's folder, as
    ``hsl flower keys`` writes it); checked here: this site's own ``<name>.pub`` must be there."""
    key = Path(node_config.setdefault("node-key", str(key.resolve()))).expanduser()
    roster = Path(node_config.setdefault("consortium-keys", str(key.parent.resolve()))).expanduser()
    pubs = sorted(p.stem for p in roster.glob("*.pub")) if roster.is_dir() else []
    if site not in pubs:
        raise HSLError(f"Site {site}: secure aggregation checks every site's mask key against the consortium's public "
                       f"keys, and {roster} holds no {site}.pub (it holds: {', '.join(pubs) or 'none'}). Put every "
                       "site's <name>.pub there (hsl flower keys writes them), or name the folder with "
                       "consortium-keys=\"DIR\" in --node-config.")
    for name in ("node-key", "consortium-keys"):
        if f"{name}=" not in text:
            text += f' {name}="{node_config[name]}"'
    return text.strip()


def supernode(argv: list[str]) -> None:
    """``hsl flower supernode``: check the site's certificate, key, data and connection, then start it."""
    parser = argparse.ArgumentParser(prog="hsl flower supernode", description=(
        "Check this site's CA certificate, node key (and that the SuperLink has registered it), connection to "
        "the SuperLink and data config, then start "
        "flower-supernode with the same options (any further options are passed on)."))
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--root-certificates", required=True, help="the consortium's CA certificate (ca.crt)")
    parser.add_argument("--auth-supernode-private-key", required=True, help="this site's node key")
    parser.add_argument("--node-config", required=True, help="e.g. 'node-index=0 site-dir=\"/srv/hsl\"'")
    parser.add_argument("--check-only", action="store_true", help="run the checks (with a data-config, hsl check on its "
                        "images too), do not start the SuperNode")
    args, rest = parser.parse_known_args(argv)
    node_config = parse_node_config(args.node_config)
    if "node-index" not in node_config:
        raise HSLError("--node-config needs node-index=<this hospital's index in the run config>.")
    site = node_config.get("name") or f"site{node_config['node-index']}"
    ca = Path(args.root_certificates)
    if not ca.is_file():
        raise HSLError(f"Site {site}: the CA certificate {ca} does not exist.")
    check_key(Path(args.auth_supernode_private_key), site)
    node_config_text = with_mask_signing(args.node_config, node_config, Path(args.auth_supernode_private_key), site)
    check_data(node_config, site)
    from hsl_lightning.flower.approval import describe_approvals

    print(f"hsl: {describe_approvals(node_config, site)}", flush=True)
    check_tls(args.superlink, ca, site)
    if check_registered(args.superlink, ca, Path(args.auth_supernode_private_key), site):
        print(f"hsl: site {site}: CA certificate, node key, data config and TLS connection to {args.superlink} are "
              "fine, and the SuperLink has registered the node key.", flush=True)
    else:
        print(f"hsl: site {site}: CA certificate, node key format, data config and TLS connection to "
              f"{args.superlink} are fine; the node key's registration is not verified.", flush=True)
    if args.check_only:
        if node_config.get("data-config"):
            check_images(node_config, site)
        return
    exe = shutil.which("flower-supernode")
    if exe is None:
        raise HSLError("flower-supernode is not installed: pip install 'hsl_lightning[flower]'.")
    command = [exe, "--superlink", args.superlink, "--root-certificates", str(ca), "--auth-supernode-private-key",
               args.auth_supernode_private_key, "--node-config", node_config_text, *rest]
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
    from hsl_lightning.flower.approval import EXAMPLE_FILE, read_digest

    digest = read_digest(out)
    print(f"hsl: wrote {out}/pyproject.toml; submit it with: flwr run {out} <superlink-connection> --stream\n"
          f"hsl: the run's digest is {digest} (also in {out}/DIGEST.txt). Every site must approve it before the run "
          f"starts there; a site, after reviewing the config, runs (--file: its node config's approved-runs):\n"
          f"  hsl flower approve --file {EXAMPLE_FILE} {digest}")


def approve(argv: list[str]) -> None:
    """``hsl flower approve``: add a run's digest to this site's approvals file."""
    from hsl_lightning.flower.approval import approve as add

    parser = argparse.ArgumentParser(prog="hsl flower approve", description=(
        "Approve a run at this site: append its digest (printed by `hsl flower app`, recomputed by `hsl flower "
        "digest APP`) to the file the SuperNode's node config names as approved-runs. The SuperNode reads the file "
        "at every message: no restart needed."))
    parser.add_argument("--file", required=True, help="the site's approvals file (node config approved-runs)")
    parser.add_argument("digest", help="the run's SHA-256 digest (64 hex digits)")
    parser.add_argument("--note", help="a comment kept on the digest's line (who approved what, and why)")
    args = parser.parse_args(argv)
    if add(args.file, args.digest, args.note):
        print(f"hsl: approved run {args.digest.strip().lower()} in {args.file}", flush=True)
    else:
        print(f"hsl: run {args.digest.strip().lower()} was approved already in {args.file}", flush=True)


def digest(argv: list[str]) -> None:
    """``hsl flower digest``: the digest of an app folder, and the classes its config names."""
    from hsl_lightning.flower.approval import app_digest, check_class_paths

    parser = argparse.ArgumentParser(prog="hsl flower digest", description=(
        "Print the digest of the run an app folder (hsl flower app) submits, as a site computes it, and the classes "
        "its config names (only hsl_lightning's are accepted at a site)."))
    parser.add_argument("app", help="the app folder (holding pyproject.toml)")
    args = parser.parse_args(argv)
    import tomllib

    value = app_digest(args.app)  # one clear error when the folder holds no app
    project = tomllib.loads((Path(args.app) / "pyproject.toml").read_text())
    text = project["tool"]["flwr"]["app"]["config"]["hsl-config"]
    named = check_class_paths(text, f"{args.app}: the run's configuration")
    print(value)
    print(f"hsl: classes the run names: {', '.join(named) or 'none'}", file=sys.stderr, flush=True)


def stop_workers(argv: list[str]) -> None:
    """``hsl flower stop-workers``: stop a site's workers (by their pid files, never by name)."""
    from hsl_lightning.flower.worker import stop_workers as stop

    parser = argparse.ArgumentParser(prog="hsl flower stop-workers", description=(
        "Stop this site's worker processes (each keeps a run's data and model between rounds) now: every "
        "run folder's worker.pid whose process is that folder's worker gets SIGTERM; stale pid files are removed."))
    parser.add_argument("--site-dir", required=True, help="the site's directory (its node config's site-dir)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="how long a worker may take to exit before it is killed")
    args = parser.parse_args(argv)
    pids = stop(args.site_dir, args.timeout_s)
    for pid in pids:
        print(f"hsl: stopped the worker with pid {pid}", flush=True)
    if not pids:
        print(f"hsl: no worker of {args.site_dir} was running", flush=True)


def proxy(argv: list[str]) -> None:
    """``hsl flower proxy``: the nginx configuration in front of the SuperLink, written or checked."""
    from hsl_lightning.flower import proxy as px

    parser = argparse.ArgumentParser(prog="hsl flower proxy", description=(
        "Write the nginx configuration through which the hospitals reach the SuperLink (listening on "
        "127.0.0.1): TLS for the sites, only the Fleet API (POST /v1/fleet/...) forwarded, every other "
        "path (the Control API that submits runs and registers keys, the Runtime API, /docs) answered 403. "
        "With --check FILE, check a configuration against that policy instead."))
    parser.add_argument("--out", help="folder for nginx.conf, its logs and temporary files")
    parser.add_argument("--listen", help="HOST:PORT the hospitals connect to, e.g. 0.0.0.0:8443")
    parser.add_argument("--superlink-port", type=int, default=8000,
                        help="the SuperLink's --port (it must listen on --host 127.0.0.1); default 8000")
    parser.add_argument("--keys", help="the folder `hsl flower keys` wrote (server.pem, server.key, ca.crt)")
    parser.add_argument("--check", metavar="FILE", help="check this nginx configuration; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        path = Path(args.check)
        if not path.is_file():
            raise HSLError(f"{path} does not exist.")
    else:
        missing = [f"--{n}" for n in ("out", "listen", "keys") if getattr(args, n) is None]
        if missing:
            raise HSLError(f"hsl flower proxy needs {', '.join(missing)} (or --check FILE).")
        path = px.write_config(args.out, args.listen, args.superlink_port, args.keys)
    problems = px.check_config(path.read_text())
    if problems:
        raise HSLError(f"{path} lets the hospitals reach more than the Fleet API, or breaks it:\n  "
                       + "\n  ".join(problems))
    nginx = px.nginx_binary()
    if nginx is None:
        tested = "not tested with `nginx -t`: nginx is not installed here (apt-get install nginx-light)"
    else:
        passed, output = px.nginx_test(path)
        if not passed:
            raise HSLError(f"{path} keeps the proxy's policy, but `nginx -t` refuses it:\n{output}")
        tested = "`nginx -t` accepts it"
    if args.check:
        print(f"hsl: {path} keeps the policy (only POST /v1/fleet/<call> forwarded, to 127.0.0.1 with the "
              f"certificate verified; everything else 403/404; sites on TLS; no request header logged); {tested}.")
        return
    command = " ".join(f"'{a}'" if " " in a else a for a in px.start_command(path, nginx or "nginx"))
    print(f"hsl: wrote {path} ({tested}): the hospitals connect to {args.listen}, which forwards only the Fleet API "
          f"to the SuperLink at 127.0.0.1:{args.superlink_port}. Start the SuperLink with --host 127.0.0.1 --port "
          f"{args.superlink_port}, then nginx:\n  {command}")


COMMANDS = {"keys": keys, "app": app, "supernode": supernode, "stop-workers": stop_workers, "proxy": proxy,
            "approve": approve, "digest": digest}


def main(argv: list[str]) -> None:
    """``hsl flower SUBCOMMAND``."""
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    if not argv or argv[0] not in COMMANDS:
        raise HSLError(f"usage: hsl flower {{{','.join(COMMANDS)}}} ... (hsl flower keys --help for one's options)")
    COMMANDS[argv[0]](argv[1:])
