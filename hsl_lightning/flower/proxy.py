"""The reverse proxy between the hospitals and the SuperLink (``hsl flower proxy``): an nginx
configuration, and a checker for one.

Flower 1.42's SuperLink serves three APIs on one port: the Fleet API that SuperNodes call
(``/v1/fleet/...``), the Control API that ``flwr run``, ``flwr supernode register`` and ``flwr ls``
call (``/v1/control/...``, no authentication in the open-source build) and the Runtime API of its
own ServerApp processes (``/v1/runtime/...``), plus ``/docs`` and ``/health``. Whoever reaches the
Control API submits runs whose ClientApp then runs at every site, registers node keys and reads
every run's logs. So the SuperLink listens on 127.0.0.1 only, and the hospitals reach it through
nginx, which

- terminates TLS with the SuperLink's own certificate (``server.pem``, ``server.key`` from
  ``hsl flower keys``), so the sites keep checking it against the consortium's ``ca.crt``;
- forwards only Fleet API calls as a SuperNode makes them: ``POST /v1/fleet/<call>``, one path
  segment of letters, digits and dashes, no query, no percent-encoding, no dots (``..``,
  ``%2e%2e`` and ``//`` tricks never match), to ``https://127.0.0.1:<port>``, verifying the
  SuperLink's certificate against ``ca.crt`` under the name ``localhost``;
- answers 403 to everything else, and to an exact ``/v1/fleet`` (which would otherwise be a 301);
- passes the signed ``flwr-public-key``, ``flwr-timestamp`` and ``flwr-signature`` headers on
  untouched (node authentication works through it) and never logs a request header: a captured
  header set can be replayed for about 5 minutes;
- accepts bodies of 16 MiB (arrays travel in 5 MiB chunks; nginx's default of 1 MiB answers 413,
  on which a SuperNode gives up) and streams them on, so it writes no temporary files.

:func:`write_config` writes it, :func:`check_config` checks any configuration (an edited copy
included) against that policy, :func:`nginx_test` runs ``nginx -t`` on it where nginx is installed.
Standard library only (``hsl flower`` starts without torch).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hsl_lightning.errors import HSLError

#: a Fleet API call as a SuperNode sends it (the raw request URI: nginx's map tests ``$request_uri``);
#: the same text is a PCRE for nginx and a Python regular expression
FLEET_CALL = r"^/v1/fleet/[A-Za-z0-9-]+$"
#: the largest request body the proxy accepts (Flower's array chunks are 5 MiB, plus protobuf framing)
MAX_BODY = "16m"
#: the name the proxy checks the SuperLink's certificate for (``hsl flower keys`` always includes it)
UPSTREAM_NAME = "localhost"
#: the file name ``hsl flower proxy --out DIR`` writes
CONFIG_NAME = "nginx.conf"

_TEMPLATE = """\
# nginx configuration written by `hsl flower proxy` (hsl_lightning): the hospitals' only way to the
# Flower SuperLink. nginx terminates TLS on {listen} and forwards the Fleet API, exactly the calls a
# SuperNode makes (POST /v1/fleet/<call>), to the SuperLink at https://127.0.0.1:{superlink_port},
# checking its certificate against the consortium's CA. Everything else -- the Control API that
# submits runs and registers node keys, the Runtime API, /docs, /health -- is answered 403 here.
# After editing a copy, check it: hsl flower proxy --check FILE
# Start (no root needed for a port above 1023):
#   {start}

worker_processes 1;
pid {prefix}/nginx.pid;
# never "debug": it logs every request header, the sites' node signatures included
error_log {prefix}/logs/error.log warn;

events {{
    worker_connections 512;
}}

http {{
    server_tokens off;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    # No request header is logged: a SuperNode's flwr-public-key, flwr-timestamp and flwr-signature
    # can be replayed for about 5 minutes by whoever reads them.
    log_format hsl_fleet '$remote_addr [$time_iso8601] "$request_method $uri" $status '
                         '$request_length $bytes_sent $request_time';
    access_log {prefix}/logs/access.log hsl_fleet;

    # 1 for a Fleet API call as a SuperNode sends it: one path segment, no query, no %-encoding, no dots
    map $request_uri $hsl_fleet_call {{
        "~{fleet_call}" 1;
        default 0;
    }}

    upstream hsl_superlink {{
        server 127.0.0.1:{superlink_port};
        keepalive 8;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # arrays travel in 5 MiB chunks; nginx's default limit (1 MiB) would answer 413 and stop the site
        client_max_body_size {max_body};

        location / {{
            return 403;
        }}
        # without it nginx would answer 301 (to /v1/fleet/)
        location = /v1/fleet {{
            return 403;
        }}
        location /v1/fleet/ {{
            if ($hsl_fleet_call = 0) {{
                return 403;
            }}
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://hsl_superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 90s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """The nginx executable (Debian keeps it in /usr/sbin, which an unprivileged PATH may lack)."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def start_command(config: str | os.PathLike, nginx: str = "nginx") -> list[str]:
    """The command that runs nginx in the foreground with ``config``, keeping its pid file, logs and
    temporary files in the config's folder."""
    prefix = Path(config).resolve().parent
    return [nginx, "-c", str(Path(config).resolve()), "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"),
            "-g", "daemon off;"]


def _quote(path: Path) -> str:
    text = str(path)
    if re.search(r"""[\s;{}#'"$\\]""", text):
        raise HSLError(f"{text}: a path with spaces, quotes, braces, ';', '#' or '$' cannot go into the nginx "
                       "configuration; choose another folder.")
    return text


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", host) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise HSLError(f"--listen {listen!r}: give HOST:PORT, e.g. 0.0.0.0:8443 or [::]:8443.")
    return host, int(port)


def render_config(listen: str, superlink_port: int, cert: str | os.PathLike, key: str | os.PathLike,
                  ca: str | os.PathLike, prefix: str | os.PathLike) -> str:
    """The configuration text (absolute paths; ``prefix`` holds the pid file, logs and temp folders)."""
    _host_port(listen)
    if not 0 < int(superlink_port) < 65536:
        raise HSLError(f"--superlink-port {superlink_port}: not a TCP port.")
    prefix = Path(prefix).resolve()
    paths = {name: _quote(Path(p).resolve()) for name, p in (("cert", cert), ("key", key), ("ca", ca))}
    start = " ".join(f"'{a}'" if " " in a else a for a in start_command(prefix / CONFIG_NAME))
    return _TEMPLATE.format(listen=listen, superlink_port=int(superlink_port), prefix=_quote(prefix), start=start,
                            fleet_call=FLEET_CALL, max_body=MAX_BODY, upstream_name=UPSTREAM_NAME, **paths)


def write_config(out: str | os.PathLike, listen: str, superlink_port: int, keys: str | os.PathLike) -> Path:
    """Write ``out/nginx.conf`` for the SuperLink on 127.0.0.1:``superlink_port``, serving the
    sites on ``listen`` with ``keys/server.pem`` and ``keys/server.key`` and checking the SuperLink
    against ``keys/ca.crt``; make ``out/logs`` and ``out/tmp``. Returns the config's path."""
    keys = Path(keys)
    missing = [n for n in ("ca.crt", "server.pem", "server.key") if not (keys / n).is_file()]
    if missing:
        raise HSLError(f"{keys} lacks {', '.join(missing)}: make the keys with `hsl flower keys` first.")
    out = Path(out)
    text = render_config(listen, superlink_port, keys / "server.pem", keys / "server.key", keys / "ca.crt", out)
    for sub in ("logs", "tmp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- checking
@dataclass
class _Directive:
    name: str
    args: list[str]
    line: int
    block: list["_Directive"] | None = None
    parent: "_Directive | None" = field(default=None, repr=False)


def _tokens(text: str):
    """nginx's syntax: words (quoted or not), ``{``, ``}``, ``;``; comments to the end of the line."""
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c, line, False
            i += 1
        elif c in "\"'":
            j, word = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                if text[j] == "\n":
                    line += 1
                word.append(text[j])
                j += 1
            if j >= n:
                raise HSLError(f"line {line}: unterminated quote")
            yield "".join(word), line, True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};\"'":
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                j += 1
            yield text[i:j], line, False
            i = j


def parse(text: str) -> list[_Directive]:
    """The configuration as a tree of directives (``block`` holds a ``{...}`` block's directives)."""
    root: list[_Directive] = []
    stack: list[tuple[list[_Directive], _Directive | None]] = [(root, None)]
    words: list[str] = []
    start = 0
    for token, line, quoted in _tokens(text):
        if not quoted and token in ("{", ";"):
            if not words:
                raise HSLError(f"line {line}: '{token}' without a directive")
            current, parent = stack[-1]
            directive = _Directive(words[0], words[1:], start, [] if token == "{" else None, parent)
            current.append(directive)
            if token == "{":
                stack.append((directive.block, directive))
            words = []
        elif not quoted and token == "}":
            if words or len(stack) == 1:
                raise HSLError(f"line {line}: unexpected '}}'")
            stack.pop()
        else:
            if not words:
                start = line
            words.append(token)
    if words or len(stack) > 1:
        raise HSLError("the configuration ends inside a directive or block")
    return root


# Directives the checker knows to be harmless here; any other one is refused, so that nothing the
# policy cannot see (include, stream, root, rewrite, error_page, grpc_pass, ...) gets past it.
_SAFE = set("""
user worker_processes worker_rlimit_nofile pid error_log events worker_connections multi_accept use
http server_tokens client_body_temp_path proxy_temp_path fastcgi_temp_path uwsgi_temp_path scgi_temp_path
log_format access_log map upstream server keepalive keepalive_timeout keepalive_requests listen server_name
ssl_certificate ssl_certificate_key ssl_protocols ssl_ciphers ssl_prefer_server_ciphers ssl_session_cache
ssl_session_timeout ssl_session_tickets ssl_dhparam ssl_ecdh_curve client_max_body_size client_body_buffer_size
client_body_timeout client_header_timeout client_header_buffer_size large_client_header_buffers send_timeout
sendfile tcp_nopush tcp_nodelay default_type types location return if limit_except allow deny add_header
proxy_pass proxy_http_version proxy_set_header proxy_ssl_verify proxy_ssl_trusted_certificate proxy_ssl_name
proxy_ssl_server_name proxy_ssl_protocols proxy_ssl_ciphers proxy_ssl_session_reuse proxy_ssl_verify_depth
proxy_ssl_certificate proxy_ssl_certificate_key proxy_connect_timeout proxy_read_timeout proxy_send_timeout
proxy_buffering proxy_request_buffering proxy_buffers proxy_buffer_size proxy_busy_buffers_size
proxy_max_temp_file_size proxy_next_upstream proxy_next_upstream_tries proxy_next_upstream_timeout
merge_slashes underscores_in_headers ignore_invalid_headers
""".split())
# Variables a log_format may use: none of them holds a request header or body.
_LOGGABLE = set("""
remote_addr remote_port time_iso8601 time_local msec request_method uri request_uri request status
request_length bytes_sent body_bytes_sent request_time upstream_response_time upstream_connect_time
upstream_header_time upstream_status upstream_addr server_protocol ssl_protocol ssl_cipher connection
connection_requests pid server_name server_port server_addr scheme
""".split())
_REFUSE = ("403", "404")
_LOOPBACK = re.compile(r"^127\.0\.0\.1:\d{1,5}$")


def _walk(block: list[_Directive]):
    for d in block:
        yield d
        if d.block is not None and d.name not in ("map", "types"):  # their entries are data, not directives
            yield from _walk(d.block)


def _inherited(d: _Directive, name: str) -> _Directive | None:
    """The nearest ``name`` directive in effect at ``d`` (its own block's, then each enclosing one's)."""
    node = d.parent
    while node is not None:
        found = [x for x in node.block if x.name == name]
        if found:
            return found[-1]
        node = node.parent
    return None


def _is_fleet_location(loc: _Directive) -> bool:
    """A prefix or exact location under ``/v1/fleet/`` (regular expressions and named ones are not)."""
    args = loc.args
    path = args[-1] if args else ""
    modifier = args[0] if len(args) == 2 else ""
    return modifier in ("", "^~", "=") and len(args) in (1, 2) and path.startswith("/v1/fleet/")


def _size(text: str) -> float:
    """An nginx size (``16m``, ``1024k``, ``0`` for no limit) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    if not match:
        return 0.0
    value = int(match.group(1)) * 1024 ** " kmg".index((match.group(2) or " ").lower())
    return float("inf") if value == 0 else float(value)


def _refuses(block: list[_Directive]) -> bool:
    return any(d.name == "return" and d.args[:1] and d.args[0] in _REFUSE for d in block)


def check_config(text: str) -> list[str]:
    """What in this nginx configuration breaks the policy (empty: it keeps it). The policy: only
    Fleet API calls reach the SuperLink, every other request is answered 403 or 404, the upstream is
    https://127.0.0.1 with its certificate verified against a CA file, the sites connect over TLS,
    and no request header is logged. Only the text is read (``include`` is refused)."""
    try:
        tree = parse(text)
    except HSLError as exc:
        return [f"cannot parse the configuration: {exc}"]
    problems: list[str] = []

    def bad(d: _Directive, message: str) -> None:
        problems.append(f"line {d.line}: {message}")

    https = [d for d in tree if d.name == "http"]
    if len(https) != 1:
        problems.append(f"there must be exactly one http block, found {len(https)}")
    upstreams = {d.args[0]: d for d in _walk(tree) if d.name == "upstream" and d.args}
    formats = {}
    for d in _walk(tree):
        if d.name not in _SAFE:
            why = {"include": "the checker cannot see an included file", "stream": "a TCP proxy bypasses the "
                   "path rules", "rewrite": "it changes the path after the rules matched it", "error_page":
                   "it can send a refused request somewhere else", "root": "it serves files",
                   "alias": "it serves files"}.get(d.name, "not a directive this checker knows to be safe here")
            bad(d, f"`{d.name}`: {why}")
        elif d.name == "log_format" and d.args:
            used = re.findall(r"\$\{?([A-Za-z0-9_]+)", " ".join(d.args[1:]))
            unsafe = sorted({v for v in used if v not in _LOGGABLE})
            if d.args[0] == "combined" or unsafe:
                bad(d, f"log_format {d.args[0]} logs {', '.join('$' + v for v in unsafe) or 'request headers'}: "
                       "no request header may be logged (a site's flwr-* signature headers can be replayed)")
            else:
                formats[d.args[0]] = d
        elif d.name == "error_log" and "debug" in d.args[1:]:
            bad(d, "error_log at level debug logs every request header, the sites' node signatures included")
        elif d.name == "proxy_set_header" and d.args and d.args[0].lower().startswith("flwr-"):
            bad(d, f"proxy_set_header {d.args[0]}: the SuperNode's signed flwr-* headers must pass untouched")
        elif d.name == "if" and d.block is not None:
            if not _refuses(d.block) or any(x.name != "return" for x in d.block):
                bad(d, "an if block may only answer 403 or 404 (return 403;)")
        elif d.name == "limit_except" and d.block is not None:
            if any(x.name not in ("allow", "deny") for x in d.block):
                bad(d, "a limit_except block may only hold allow and deny")
        elif d.name == "return" and (not d.args or d.args[0] not in _REFUSE):
            bad(d, f"return {' '.join(d.args)}: a refusal must answer 403 or 404")
        elif d.name == "upstream" and d.block is not None:
            for server in (x for x in d.block if x.name == "server"):
                if not server.args or not _LOOPBACK.match(server.args[0]):
                    bad(server, f"upstream {d.args[0]}: server {' '.join(server.args)} is not 127.0.0.1:PORT (the "
                                "SuperLink listens on 127.0.0.1 only)")
    for d in _walk(tree):
        if d.name == "access_log" and d.args and d.args[0] != "off":
            name = d.args[1] if len(d.args) > 1 else "combined"
            if name not in formats:
                bad(d, f"access_log uses the log format {name!r}, which is not a checked log_format here "
                       "(nginx's combined format logs request headers)")
        elif d.name == "proxy_pass":
            loc = d.parent
            if loc is None or loc.name != "location" or not _is_fleet_location(loc):
                where = f"location {' '.join(loc.args)}" if loc is not None and loc.name == "location" else \
                    (loc.name if loc is not None else "the top level")
                bad(d, f"proxy_pass in {where}: only a location under /v1/fleet/ (prefix or exact) may forward")
                continue
            target = d.args[0] if len(d.args) == 1 else ""
            match = re.fullmatch(r"https://([^/$]+)", target)
            if not match:
                bad(d, f"proxy_pass {' '.join(d.args)}: give https://UPSTREAM or https://127.0.0.1:PORT with no "
                       "path and no variable (a path or variable can send a site's request to another API)")
            else:
                host = match.group(1)
                if host not in upstreams and not _LOOPBACK.match(host):
                    bad(d, f"proxy_pass {target}: {host} is neither 127.0.0.1:PORT nor an upstream block here")
            verify = _inherited(d, "proxy_ssl_verify")
            if verify is None or verify.args != ["on"]:
                bad(d, "proxy_pass without `proxy_ssl_verify on`: the SuperLink's certificate must be verified")
            if _inherited(d, "proxy_ssl_trusted_certificate") is None:
                bad(d, "proxy_pass without proxy_ssl_trusted_certificate (the consortium's ca.crt)")
            limit = _inherited(d, "client_max_body_size")
            if _size(limit.args[0] if limit is not None and limit.args else "1m") < _size("6m"):
                bad(d, "client_max_body_size below 6m where the Fleet API is forwarded: a SuperNode's 5 MiB array "
                       "chunks would get 413, and it gives up")
        elif d.name == "location" and d.block is not None:
            forwards = any(x.name == "proxy_pass" for x in d.block)
            if not forwards and not _refuses(d.block):
                bad(d, f"location {' '.join(d.args)} neither forwards to the Fleet API nor answers 403/404 "
                       "(it would serve files)")
        elif d.name == "server" and d.block is not None and d.parent is not None and d.parent.name == "http":
            listens = [x for x in d.block if x.name == "listen"]
            if not listens:
                bad(d, "a server block without listen (nginx would listen on port 80 in plain HTTP)")
            for listen in listens:
                if "ssl" not in listen.args[1:]:
                    bad(listen, f"listen {' '.join(listen.args)} without ssl: the sites must connect over TLS")
            for name in ("ssl_certificate", "ssl_certificate_key"):
                if not any(x.name == name for x in d.block) and _inherited(d, name) is None:
                    bad(d, f"a server block without {name}")
            if not any(x.name == "location" and x.args in (["/"], ["^~", "/"]) and x.block is not None
                       and _refuses(x.block) for x in d.block):
                bad(d, "a server block without `location / { return 403; }`: every path but the Fleet API's "
                       "must be refused")
    return problems


def nginx_test(config: str | os.PathLike, timeout: float = 30) -> tuple[bool, str]:
    """``nginx -t`` on ``config`` (its folder as the prefix): (passed, nginx's output). Raises when
    nginx is not installed."""
    nginx = nginx_binary()
    if nginx is None:
        raise HSLError("nginx is not installed (Debian, Ubuntu: apt-get install nginx-light).")
    config = Path(config).resolve()
    done = subprocess.run([nginx, "-t", "-q", "-c", str(config), "-p", str(config.parent), "-e", "stderr"],
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


# ---------------------------------------------------------------------------------------------- probing
def http_status(address: str, path: str, ca: str | os.PathLike, method: str = "POST", body: bytes = b"",
                timeout: float = 10.0) -> int:
    """The HTTP status that ``method path`` gets over TLS at ``address`` (HOST:PORT), trusting only
    ``ca``; the path is sent exactly as given (no normalisation), with Flower's protobuf content type."""
    host, port = _host_port(address)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Content-Type", "application/protobuf")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()
