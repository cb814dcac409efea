"""The reverse proxy between the hospitals and the SuperLink (``hsl flower proxy``, nginx).

Fast tests of the configuration it writes and of the checker (a configuration that forwards the
Control API, skips the SuperLink's certificate check or logs the signed headers is refused), and
one test with a real SuperLink on 127.0.0.1 behind a real nginx: the requests that control a run
answer 200 straight at the SuperLink and 403 through the proxy, node authentication still works
through it (a registered key passes, an unregistered one is refused), and a 5 MiB array chunk
passes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hsl_lightning.flower import proxy as px
from hsl_lightning.flower.localhost import Localhost, _bin

HSL = str(Path(sys.executable).parent / "hsl")
NGINX = px.nginx_binary()
NEEDS_NGINX = pytest.mark.skipif(NGINX is None, reason=(
    "nginx is not installed, so the SuperLink cannot be tested behind the proxy: install it with "
    "`apt-get install nginx-light` (Debian, Ubuntu; .ci/run does this)"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    subprocess.run([HSL, "flower", "keys", "--out", str(out), "--sites", "hospital1"], check=True, capture_output=True)
    return out


@pytest.fixture()
def written(tmp_path, keys) -> tuple[Path, str]:
    path = px.write_config(tmp_path / "proxy", "127.0.0.1:8443", 8000, keys)
    return path, path.read_text()


def _problems(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return "\n".join(px.check_config(text.replace(old, new)))


# ------------------------------------------------------------------------------------------ the config
def test_the_written_config_keeps_the_policy(written, keys):
    path, text = written
    assert px.check_config(text) == []
    assert "listen 127.0.0.1:8443 ssl;" in text and "server 127.0.0.1:8000;" in text
    assert f"ssl_certificate {keys.resolve() / 'server.pem'};" in text
    assert f"proxy_ssl_trusted_certificate {keys.resolve() / 'ca.crt'};" in text
    assert "proxy_ssl_verify on;" in text and "proxy_ssl_name localhost;" in text
    assert "client_max_body_size 16m;" in text and "location = /v1/fleet {" in text
    assert "$http_" not in text  # no request header in any log
    assert (path.parent / "logs").is_dir() and (path.parent / "tmp").is_dir()
    assert f"-c {path.resolve()} -p {path.parent.resolve()}" in text  # the start command, in its header
    if NGINX:
        assert px.nginx_test(path) == (True, "")


@pytest.mark.parametrize("old,new,expected", [
    ("        location / {", "        location /v1/control/ {\n            proxy_pass https://hsl_superlink;\n"
     "            proxy_ssl_verify on;\n        }\n        location / {",
     "proxy_pass in location /v1/control/: only a location under /v1/fleet/"),
    ("        location / {\n            return 403;",
     "        location / {\n            proxy_pass https://hsl_superlink;", "proxy_pass in location /"),
    ("proxy_pass https://hsl_superlink;", "proxy_pass https://hsl_superlink/v1/;", "no path and no variable"),
    ("proxy_pass https://hsl_superlink;", "proxy_pass https://hsl_superlink$request_uri;", "no variable"),
    ("proxy_pass https://hsl_superlink;", "proxy_pass https://superlink.example.org:8000;",
     "neither 127.0.0.1:PORT nor an upstream"),
    ("proxy_pass https://hsl_superlink;", "proxy_pass http://127.0.0.1:8000;", "give https://"),
    ("proxy_ssl_verify on;", "proxy_ssl_verify off;", "proxy_ssl_verify on"),
    ("server 127.0.0.1:8000;", "server 10.0.0.5:8000;", "is not 127.0.0.1:PORT"),
    ("$request_time';", "$request_time $http_flwr_signature';", "logs $http_flwr_signature"),
    (" hsl_fleet;\n", ";\n", "nginx's combined format logs request headers"),
    ("logs/error.log warn;", "logs/error.log debug;", "debug logs every request header"),
    ("ssl;\n", ";\n", "without ssl: the sites must connect over TLS"),
    ("        location / {\n            return 403;\n        }\n", "", "without `location / { return 403; }`"),
    ("        location / {\n            return 403;", "        location / {\n            return 200;",
     "a refusal must answer 403 or 404"),
    ("            return 403;\n        }\n        # without", "            root /srv;\n        }\n        # without",
     "`root`: it serves files"),
    ("    server_tokens off;", "    include /etc/nginx/mime.types;", "cannot see an included file"),
    ("events {", "stream {\n    server { listen 9000; proxy_pass 127.0.0.1:8000; }\n}\nevents {",
     "`stream`: a TCP proxy"),
    ("            limit_except POST {", "            rewrite ^ /v1/control/list-runs break;\n            limit_except POST {",
     "`rewrite`"),
    ("proxy_set_header Connection \"\";", "proxy_set_header flwr-signature \"\";", "must pass untouched"),
    ("client_max_body_size 16m;", "", "5 MiB array chunks would get 413"),
    ("            if ($hsl_fleet_call = 0) {\n                return 403;",
     "            if ($hsl_fleet_call = 0) {\n                proxy_pass https://hsl_superlink;",
     "an if block may only answer 403"),
])
def test_the_checker_refuses_a_config_that_breaks_the_policy(written, old, new, expected):
    problems = _problems(written[1], old, new)
    assert expected in problems, problems


def test_nothing_given_on_the_command_line_can_add_a_directive(tmp_path, keys):
    from hsl_lightning.errors import HSLError

    for listen in ("0.0.0.0:8443 ssl; location /v1/control/ {}", "8443", "0.0.0.0:99999"):
        with pytest.raises(HSLError, match="give HOST:PORT"):
            px.write_config(tmp_path / "p", listen, 8000, keys)
    with pytest.raises(HSLError, match="cannot go into the nginx configuration"):
        px.write_config(tmp_path / "a folder; include x", "0.0.0.0:8443", 8000, keys)


def test_every_fleet_call_of_this_flower_is_forwarded_and_nothing_else():
    """The proxy's pattern must let through every Fleet API path of the installed Flower (a refused
    one would stop the sites), and none of the Control or Runtime API's."""
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet
    from flwr.supercore.routers.runtime.router import router as runtime

    def paths(router):
        return {r.path for r in router.routes if isinstance(r, APIRoute)}

    assert len(paths(fleet)) >= 10 and all(re.fullmatch(px.FLEET_CALL, p) for p in paths(fleet)), paths(fleet)
    assert not any(re.fullmatch(px.FLEET_CALL, p) for p in paths(control) | paths(runtime) | {"/docs", "/health"})
    # what a SuperNode's client sends is among them
    source = Path(sys.modules["flwr"].__file__).parent / "supernode" / "fleet_http_client.py"
    assert set(re.findall(r'path="(/v1/[^"]+)"', source.read_text())) <= paths(fleet)


def test_hsl_flower_proxy_writes_checks_and_refuses(tmp_path, keys):
    done = subprocess.run([HSL, "flower", "proxy", "--out", str(tmp_path / "p"), "--listen", "0.0.0.0:8443",
                           "--superlink-port", "9000", "--keys", str(keys)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "p" / "nginx.conf"
    assert "server 127.0.0.1:9000;" in conf.read_text() and "listen 0.0.0.0:8443 ssl;" in conf.read_text()
    assert f"-c {conf.resolve()} -p {conf.parent.resolve()}" in done.stdout and "-g 'daemon off;'" in done.stdout
    assert "--host 127.0.0.1 --port 9000" in done.stdout

    checked = subprocess.run([HSL, "flower", "proxy", "--check", str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0 and "keeps the policy" in checked.stdout, checked.stderr

    bad = tmp_path / "bad.conf"
    bad.write_text(conf.read_text().replace("location /v1/fleet/ {", "location /v1/ {"))
    refused = subprocess.run([HSL, "flower", "proxy", "--check", str(bad)], capture_output=True, text=True)
    assert refused.returncode == 2 and "proxy_pass in location /v1/: only a location under /v1/fleet/" in refused.stderr
    assert "Traceback" not in refused.stderr

    missing = subprocess.run([HSL, "flower", "proxy", "--out", str(tmp_path / "q"), "--listen", "0.0.0.0:8443",
                              "--keys", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 2 and "make the keys with `hsl flower keys` first" in missing.stderr
    port = subprocess.run([HSL, "flower", "proxy", "--out", str(tmp_path / "q"), "--listen", "8443",
                           "--keys", str(keys)], capture_output=True, text=True)
    assert port.returncode == 2 and "give HOST:PORT" in port.stderr


@pytest.mark.slow
def test_the_flwr_cli_talks_to_the_superlink_and_the_sites_to_the_proxy(tmp_path):
    lh = Localhost(tmp_path, sites=1, proxy=False)
    assert lh.address == lh.superlink_address and not lh.proxied
    if NGINX:
        lh = Localhost(tmp_path, sites=1)  # the default where nginx is installed
        assert lh.proxied and lh.address != lh.superlink_address
        lh.make_keys()
        assert f'address = "{lh.superlink_address}"' in (tmp_path / "flwr" / "config.toml").read_text()


# ----------------------------------------------------------------------------- a real SuperLink behind nginx
ATTACKS = [  # (method, path): what anyone reaching the SuperLink's port may do without credentials
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
]
TRICKS = ["/v1/fleet", "/v1/fleet/", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
          "/v1/fleet/x%2F..%2F..%2Fcontrol%2Flist-runs", "//v1/control/list-runs", "/v1//control/list-runs",
          "/v1/fleet//../control/list-runs", "/V1/CONTROL/list-runs", "/v1/fleet/get-run?x=1"]


def _check_only(lh: Localhost, site: str) -> subprocess.CompletedProcess:
    return lh.run(HSL, "flower", "supernode", "--superlink", lh.address, "--root-certificates", str(lh.keys / "ca.crt"),
                  "--auth-supernode-private-key", str(lh.keys / site), "--node-config",
                  f'node-index=0 name="{site}"', "--check-only", check=False)


@pytest.mark.slow
@NEEDS_NGINX
def test_through_the_proxy_a_site_reaches_only_the_fleet_api(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    with Localhost(tmp_path / "d", sites=2, proxy=True) as lh:
        lh.make_keys()
        lh.start_superlink()
        lh.register("hospital1")  # the coordinator, through the flwr CLI on its own machine (config.toml)
        ca = lh.keys / "ca.crt"
        direct_at, proxy_at = lh.superlink_address, lh.address
        table = {(m, p): (px.http_status(direct_at, p, ca, m), px.http_status(proxy_at, p, ca, m)) for m, p in ATTACKS}
        print("\n".join(f"{m} {p}: SuperLink {d}, proxy {v}" for (m, p), (d, v) in table.items()))
        # stop-run with an empty request names no run (a 4xx from Flower); every other one answers 200
        assert all(d == 200 for (m, p), (d, v) in table.items() if p != "/v1/control/stop-run"), table
        assert all(v == 403 for d, v in table.values()), table

        # hospital2's key is not registered: registering it itself through the proxy is refused ...
        pub = load_ssh_public_key((lh.keys / "hospital2.pub").read_bytes())
        body = RegisterNodeRequest(public_key=public_key_to_bytes(pub), name="hospital2").SerializeToString()
        assert px.http_status(proxy_at, "/v1/control/register-node", ca, body=body) == 403
        refused = _check_only(lh, "hospital2")  # ... and node authentication refuses it through the proxy
        assert refused.returncode == 2 and "has not registered this site's node key" in refused.stderr, refused.stderr
        # a registered key passes: its signed flwr-* headers reached the SuperLink through the proxy
        admitted = _check_only(lh, "hospital1")
        assert admitted.returncode == 0 and "the SuperLink has registered the node key" in admitted.stdout, \
            admitted.stdout + admitted.stderr

        # path tricks, a GET of a Fleet call, an exact /v1/fleet (no 301): the proxy's own 403
        tricks = {p: px.http_status(proxy_at, p, ca) for p in TRICKS}
        tricks["GET /v1/fleet/activate-node"] = px.http_status(proxy_at, "/v1/fleet/activate-node", ca, "GET")
        print(tricks)
        assert set(tricks.values()) == {403}, tricks
        # a 5 MiB array chunk (Flower's size) plus framing is not the proxy's 413: the SuperLink answers it
        # (401: unsigned), as it does directly
        chunk = PushObjectRequest(object_id="0" * 64, object_content=os.urandom(5 * 2**20)).SerializeToString()
        assert px.http_status(proxy_at, "/v1/fleet/push-object", ca, body=chunk) == \
            px.http_status(direct_at, "/v1/fleet/push-object", ca, body=chunk) == 401

        # a site's own flwr CLI, pointed at the proxy as at a SuperLink: refused
        home = lh.workdir / "site-flwr"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "site"\n\n[superlink.site]\naddress = '
                                          f'"{proxy_at}"\nroot-certificates = "{ca}"\n')
        for command in (["ls", "site"], ["supernode", "register", str(lh.keys / "hospital2.pub"), "site"]):
            out = subprocess.run([_bin("flwr"), *command], env={**lh.env, "FLWR_HOME": str(home), "COLUMNS": "200"},
                                 capture_output=True, text=True, timeout=120)
            assert "403 Forbidden" in out.stdout + out.stderr, out.stdout + out.stderr

        # what the proxy prevents: the same registration straight at the SuperLink works, with no credentials
        assert px.http_status(direct_at, "/v1/control/register-node", ca, body=body) == 200
        assert _check_only(lh, "hospital2").returncode == 0

        access = (lh.workdir / "proxy" / "logs" / "access.log").read_text()
        assert "POST /v1/fleet/activate-node" in access and "/v1/control/list-runs\" 403" in access
        logged = access + (lh.workdir / "proxy" / "logs" / "error.log").read_text()
        assert "flwr-" not in logged.lower() and not re.search(r"[A-Za-z0-9+/=]{64,}", logged)  # no signature
        listed = lh.run(_bin("flwr"), "supernode", "list", "local", "--format", "json")
        assert listed.returncode == 0
