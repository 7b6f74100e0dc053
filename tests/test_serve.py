"""`sitegen serve` under hostile and concurrent requests, and the rules engine's Netlify semantics
(first matching rule stops processing, shadowing, one rewrite, integer placeholders)."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import tomllib

MODEL = "toy-model"
SITE_HEADERS = next(
    h["values"]
    for h in tomllib.loads((Path(__file__).resolve().parents[1] / "netlify.toml").read_text())["headers"]
    if h["for"] == "/*"
)


# ---- a raw HTTP client: sends bytes exactly as given, reads the answer until the server closes --


def raw_request(base: str, request: bytes, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) for REQUEST; status -1 when the server closed without answering."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        return -1, [], b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.") else -1
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return status, headers, body


def get(base: str, target: str | bytes, method: bytes = b"GET") -> tuple[int, list[tuple[str, str]], bytes]:
    target = target if isinstance(target, bytes) else target.encode("latin-1")
    return raw_request(base, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def browser_resolves_off_site(base: str, request_path: str, location: str) -> bool:
    """Whether a browser following LOCATION would leave BASE's host: browsers read '\\' as '/'
    in http(s) URLs, which Python's urljoin does not."""
    resolved = urljoin(base + request_path, location.replace("\\", "/"))
    return urlsplit(resolved).netloc != urlsplit(base).netloc


def assert_safe_answer(base: str, path: str, status: int, headers: list[tuple[str, str]]) -> None:
    assert 100 <= status < 500, f"{path!r}: answered {status} (-1: connection dropped)"
    names = {k.lower(): v for k, v in headers}
    for name, value in SITE_HEADERS.items():
        assert names.get(name.lower()) == value, f"{path!r}: {status} without {name}"
    assert not any(k.lower() in ("set-cookie", "x-evil") for k, _ in headers), f"{path!r}: injected header {headers}"
    for k, v in headers:
        assert all(0x20 <= ord(c) < 0x7F for c in v), f"{path!r}: control or non-ASCII character in {k}: {v!r}"
    if "location" in names:
        loc = names["location"]
        assert "\\" not in loc and not loc.startswith("//"), f"{path!r}: Location {loc!r}"
        assert not browser_resolves_off_site(base, path, loc), f"{path!r}: Location {loc!r} leaves the site"


# ---- the reproducers, one test each ----------------------------------------------------


def test_crlf_in_a_query_placeholder_sets_no_cookie(served_site):
    status, headers, _ = get(served_site, f"/{MODEL}/go?layer=0%0d%0aSet-Cookie:%20pwn=1&neuron=0")
    assert status == 400
    assert_safe_answer(served_site, f"/{MODEL}/go", status, headers)


def test_backslash_model_cannot_redirect_off_site(served_site):
    # The chooser's rules name each model (the build's _redirects): no other path redirects.
    for path in ("/%5Cevil.com/go?layer=0&neuron=0", "/%5C%5Cevil.com/go?layer=1&neuron=2"):
        status, headers, _ = get(served_site, path)
        assert_safe_answer(served_site, path, status, headers)
        assert status == 404 and "Location" not in dict(headers), path


def test_non_integer_layer_is_400_not_a_dropped_connection(served_site):
    status, headers, body = get(served_site, f"/{MODEL}/go?layer=%E4%B8%AD&neuron=0")
    assert status == 400 and b"layer must be a whole number" in body
    assert_safe_answer(served_site, f"/{MODEL}/go", status, headers)


def test_nul_in_the_path_is_404_not_a_dropped_connection(served_site):
    status, headers, body = get(served_site, "/%00")
    assert status == 404 and b"<html" in body.lower()  # the site's 404 page
    assert_safe_answer(served_site, "/%00", status, headers)


# ---- hostile inputs: never a header injection, an off-site redirect, a 5xx or a dropped line -----

HOSTILE = [
    f"/{MODEL}/go?layer=0&neuron=0%0aX-Evil:%201",
    f"/{MODEL}/go?layer=0%0d%0a%0d%0a<script>&neuron=0",
    f"/{MODEL}/go?layer=0&neuron=0%0d",
    "/%0d%0aSet-Cookie:%20pwn=1/go?layer=0&neuron=0",
    "/%5C%5Cevil.com/go?layer=0&neuron=0",
    "/%2F%2Fevil.com/go?layer=0&neuron=0",
    "//evil.com/go?layer=0&neuron=0",
    "/%2Fevil.com/go?layer=0&neuron=0",
    "/evil.com%5C/go?layer=0&neuron=0",
    "/..%2F..%2Fevil.com/go?layer=0&neuron=0",
    f"/{MODEL}/go?layer=..%2F..%2F%2Fevil.com&neuron=0",
    f"/{MODEL}/go?layer=%5C%5Cevil.com&neuron=0",
    f"/{MODEL}/go?layer=-1&neuron=0",
    f"/{MODEL}/go?layer=1e3&neuron=0",
    f"/{MODEL}/go?layer=&neuron=",
    f"/{MODEL}/go?layer=%ff%fe&neuron=%c0%af",
    f"/{MODEL}/go?layer=%&neuron=%zz",
    f"/{MODEL}/%00/1",
    "/api/%00",
    "/api/toy-model/neuroscope/0/%00",
    f"/{MODEL}/0/%00",
    "/%ff%fe",
    f"/{MODEL}/%C0%AF/1",
    "/%E4%B8%AD",
    "/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/..%2F..%2F..%2Fetc%2Fpasswd",
    "/" + "a" * 5000,
    f"/{MODEL}/" + "1" * 300 + "/1",
    f"/{MODEL}/go?layer=" + "9" * 10000 + "&neuron=0",
    "/api/" + "%2F" * 3000,
    "/api/toy-model/neuron2graph-search?query=%00",
    "/api/toy-model/neuron2graph-search?query=" + "%ff" * 200,
]


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_url_gets_a_safe_http_answer(served_site, path):
    status, headers, _ = get(served_site, path)
    assert_safe_answer(served_site, path, status, headers)
    status, headers, _ = get(served_site, path, method=b"HEAD")
    assert_safe_answer(served_site, path, status, headers)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /\xe4\xb8\xad HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # raw non-ASCII bytes
        b"GET /\xff\\evil.com/go?layer=0&neuron=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /%00\r\n\r\n",  # no version: still a status line and headers
        b"GET / HTTP/9.x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"GET http://evil.com/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",  # a request line over http.server's limit
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",  # a header line over the limit
    ],
)
def test_malformed_request_gets_a_safe_http_answer(served_site, request_bytes):
    status, headers, _ = raw_request(served_site, request_bytes)
    assert_safe_answer(served_site, "/", status, headers)


# ---- first matching rule stops processing, shadowing, one rewrite, integer placeholders ---------

SMALL_RULES = {
    "redirects": [
        {"from": "/a/:x", "to": "/a/:x.json", "status": 200},
        {"from": "/a/:x", "to": "/fallback.json", "status": 200},  # never reached: the rule above matched
        {"from": "/b", "to": "/c", "status": 200},
        {"from": "/c", "to": "/d.html", "status": 200},
        {"from": "/forced/*", "to": "/forced.html", "status": 200, "force": True},
        {"from": "/q", "to": "/q/:layer.html", "status": 200, "query": {"layer": ":layer"}},
        {"from": "/q", "to": "/q-usage.html", "status": 404},
        {"from": "/go/:layer", "to": "/n/:layer", "status": 301},
        {"from": "/s/*", "to": "/:splat", "status": 302},
        {"from": "/*", "to": "/404.html", "status": 404},
    ],
}
SMALL_FILES = {
    "/a/there.json",
    "/a/shadow",
    "/fallback.json",
    "/d.html",
    "/forced/real.html",
    "/forced.html",
    "/q/3.html",
    "/q-usage.html",
    "/404.html",
    "/plain.html",
}


@pytest.fixture
def small_rules():
    from sitegen.site.rules import parse_rules

    return parse_rules(SMALL_RULES)


@pytest.mark.parametrize(
    "path, query, expected",
    [
        ("/a/there", "", (200, "/a/there.json", None)),
        ("/a/missing", "", (404, "/404.html", None)),  # target missing: the 404 page, no fall-through to /fallback.json
        ("/a/shadow", "", (200, "/a/shadow", None)),  # an existing file wins over a rule that is not forced
        ("/plain.html", "", (200, "/plain.html", None)),  # shadows the catch-all 404 rule
        ("/forced/real.html", "", (200, "/forced.html", None)),  # force = true wins over the file
        ("/b", "", (404, "/404.html", None)),  # rewritten once to /c, which is no file; /c's rule is not applied
        ("/c", "", (200, "/d.html", None)),
        ("/c/", "", (200, "/d.html", None)),  # one trailing slash does not matter for matching
        ("/q", "layer=3", (200, "/q/3.html", None)),
        ("/q", "layer=4", (404, "/404.html", None)),  # first match stops even though the next rule also matches /q
        ("/q", "layer=x", (404, "/404.html", None)),  # a rewrite with a non-integer :layer: the 404 page
        ("/q", "other=1", (404, "/q-usage.html", None)),  # query condition unmet: the next rule
        ("/go/7", "", (301, None, "/n/7")),
        ("/go/7x", "", (400, None, None)),  # a redirect with a non-integer :layer
        ("/s//evil.com", "", (302, None, "/evil.com")),  # a Location never starts with //
        ("/s/a\\b", "", (302, None, "/a%5Cb")),
        ("/nothing", "", (404, "/404.html", None)),
    ],
)
def test_first_matching_rule_decides(small_rules, path, query, expected):
    d = small_rules.decide(path, query, SMALL_FILES.__contains__)
    assert (d.status, d.file, d.location) == expected


def test_match_is_the_pure_first_rule_lookup(small_rules):
    m = small_rules.match("/q", "layer=3&x=1")
    assert m.rule.to == "/q/:layer.html" and m.values == {"layer": "3"} and m.target() == "/q/3.html"
    assert small_rules.match("/a/shadow", "").rule.to == "/a/:x.json"  # no file checks here
    assert small_rules.match("/go/1", "").target() == "/n/1"
    assert small_rules.match("/go/a\r\nb", "").target() == "/n/a%0D%0Ab"  # a Location gets values percent-encoded
    assert small_rules.match("/s/x/\\y", "").target() == "/x/%5Cy"  # a splat keeps its slashes, not backslashes


# ---- what Netlify does that serve follows (tests/test_netlify.py compares against netlify dev) ---


def _body(base: str, target: str) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = get(base, target)
    return status, {k.lower(): v for k, v in headers}, body


def test_pretty_urls_find_the_html_page(served_site, built_site):
    for path, file in (
        ("/about", "about.html"),
        ("/search", "search.html"),
        ("/search/", "search.html"),
        (f"/{MODEL}/0", f"{MODEL}/0/index.html"),
    ):
        status, _, body = _body(served_site, path)
        assert (status, body) == (200, (built_site / file).read_bytes()), path


def test_api_is_json_although_api_html_shadows_it_under_pretty_urls(served_site, built_site):
    assert (built_site / "api.html").is_file()
    status, headers, body = _body(served_site, "/api")
    assert (status, headers["content-type"], body) == (
        200,
        "application/json; charset=utf-8",
        (built_site / "api" / "index.json").read_bytes(),
    )


@pytest.mark.parametrize(
    "dotted",
    [
        f"/api/{MODEL}/./neuron2graph-search",
        f"/api/{MODEL}/%2e/neuron2graph-search",
        f"/api/./{MODEL}/neuron2graph-search",
        f"/api/x/%2E%2e/{MODEL}/neuron2graph-search",
    ],
)
def test_dot_segments_are_resolved_before_routing(served_site, dotted):
    # One answer for the search URL however its dots are written (the edge function sees it so on Netlify).
    plain = _body(served_site, f"/api/{MODEL}/neuron2graph-search?query=any:w0")
    assert plain[0] == 200 and plain[2] == b'[{"layer":0,"neuron":2}]'
    assert _body(served_site, dotted + "?query=any:w0") == plain


def test_dot_dot_never_climbs_above_the_root(served_site, built_site):
    status, headers, body = _body(served_site, "/api/%2e%2e/%2e%2e/index")  # is /index: the home page
    assert (status, body) == (
        200,
        (built_site / "index.html").read_bytes(),
    ) and "access-control-allow-origin" not in headers


def test_chooser_redirect_passes_the_query_on(served_site):
    status, headers, body = _body(served_site, f"/{MODEL}/go?layer=1&neuron=2&q=a+b~")
    assert status == 302 and headers["location"] == f"/{MODEL}/1/2.html?layer=1&neuron=2&q=a+b%7E"
    assert (
        body == f"Redirecting to /{MODEL}/1/2.html?layer=1&neuron=2&q=a+b%7E".encode() and "content-type" not in headers
    )


def test_api_splat_keeps_a_trailing_slash(served_site):
    assert (
        _body(served_site, f"/api/{MODEL}/neuroscope/0/1/")[0] == 404
    )  # /api/*: splat "toy-model/.../1/", no such file
    assert _body(served_site, "/api/")[0] == 200  # the /api rule, without its trailing slash


def test_remove_dot_segments():
    from sitegen.site.rules import remove_dot_segments

    assert remove_dot_segments("/a/./b/../c") == "/a/c"
    assert remove_dot_segments("/%2E%2e/%2e/x") == "/x"
    assert remove_dot_segments("/a/b/..") == "/a/"
    assert remove_dot_segments("/a/%2e") == "/a/"
    assert remove_dot_segments("/..%2F..%2Fetc") == "/..%2F..%2Fetc"  # an encoded slash is no separator
    assert remove_dot_segments("/a/.b/..c") == "/a/.b/..c"


def test_redirects_file_rules_come_first_and_a_bad_line_is_one_clear_error(tmp_path):
    from sitegen.errors import BuildError
    from sitegen.site.rules import REDIRECTS_FILE, parse_redirects_file, site_rules

    (tmp_path / REDIRECTS_FILE).write_text(
        "# comment\n/old  /new  301!\n/m/go layer=:layer neuron=:neuron /m/:layer/:neuron.html 302\n"
    )
    rules = site_rules(tmp_path)
    assert [(r.source, r.to, r.status, r.force) for r in rules.redirects[:2]] == [
        ("/old", "/new", 301, True),
        ("/m/go", "/m/:layer/:neuron.html", 302, False),
    ]
    assert rules.decide("/old", "", lambda p: True).location == "/new"  # forced past the file
    with pytest.raises(BuildError, match=r"_redirects, line 2: .*rebuild the site"):
        parse_redirects_file("/a /b\n/from only=value /to\n")


def test_header_patterns_follow_netlify(small_rules):
    from sitegen.site.rules import load_rules

    names = lambda path: {k.lower(): v for k, v in load_rules().headers_for(path)}
    assert names("/api")["access-control-allow-origin"] == "*"  # "/api/*" covers "/api"
    assert names("/API/m.json")["access-control-allow-origin"] == "*"  # case-insensitive
    assert "access-control-allow-origin" not in names("/about.html")
    assert len(load_rules().headers_for("/api")) == len(names("/api"))  # one value per header name


# ---- connections --------------------------------------------------------------------------------


def test_idle_connections_time_out(built_site):
    from sitegen.site.serve import make_server
    from tests.conftest import free_port

    server = make_server(built_site, "127.0.0.1", free_port(), idle_timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = server.server_address
        with socket.create_connection(address, timeout=8) as s:  # sends nothing at all
            start = time.monotonic()
            assert s.recv(1) == b"" and time.monotonic() - start < 5
        with socket.create_connection(address, timeout=8) as s:  # one keep-alive request, then idle
            s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            start = time.monotonic()
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()


def _started(built_site, **options):
    from sitegen.site.serve import make_server
    from tests.conftest import free_port

    server = make_server(built_site, "127.0.0.1", free_port(), **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _read_answer(s: socket.socket) -> bytes:
    """One keep-alive answer (head + Content-Length body) from S, reading no further."""
    f = s.makefile("rb", buffering=0)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = f.read(1)
        assert byte, head
        head += byte
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    body = b""
    while len(body) < length:
        chunk = f.read(length - len(body))
        assert chunk, head
        body += chunk
    return head + body


def test_idle_and_half_sent_connections_cost_no_thread(built_site):
    """300 connections that send nothing or half a request head: the server's threads stay at its
    fixed pool (old: one thread per connection), a new client is still answered at once, and
    keep-alive and pipelining still work."""
    from sitegen.site.serve import WORKERS

    before = threading.active_count()
    server = _started(built_site, idle_timeout=20)
    idle: list[socket.socket] = []
    try:
        for i in range(300):
            s = socket.create_connection(server.server_address, timeout=5)
            if i % 2:
                s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            idle.append(s)
        time.sleep(0.5)
        assert threading.active_count() - before <= WORKERS + 1, threading.active_count() - before
        with socket.create_connection(server.server_address, timeout=5) as s:
            start = time.monotonic()
            s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
            first = _read_answer(s)
            s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\nGET /no/such/page HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
            second, third = _read_answer(s), _read_answer(s)
            assert time.monotonic() - start < 5
        assert (
            first.startswith(b"HTTP/1.1 200") and second == first and first.partition(b"\r\n\r\n")[2].startswith(b"{")
        )
        assert third.startswith(b"HTTP/1.1 404")
        assert threading.active_count() - before <= WORKERS + 1
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_a_trickled_request_head_is_cut_at_the_idle_timeout(built_site):
    """A client sending its head a byte at a time gets IDLE_TIMEOUT for the whole head, not per
    byte (old: every byte restarted the timeout, so such a client held its thread for ever)."""
    server = _started(built_site, idle_timeout=1.0)
    try:
        with socket.create_connection(server.server_address, timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")
            start, closed = time.monotonic(), False
            while not closed and time.monotonic() - start < 6:
                try:
                    s.sendall(b"X")
                    s.settimeout(0.25)
                    closed = s.recv(1) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
            assert closed and time.monotonic() - start < 3, time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_stops_reading_frees_its_worker_within_the_timeout(built_site):
    """One worker, one client pipelining ~60 MB of answers and reading none: the worker's write
    times out (IDLE_TIMEOUT) and the next client is answered."""
    biggest = max((f for f in built_site.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    target = "/" + biggest.relative_to(built_site).as_posix()
    server = _started(built_site, idle_timeout=1.0, workers=1)
    try:
        with socket.create_connection(server.server_address, timeout=5) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            stuck.sendall(request * min(1200, 60_000_000 // biggest.stat().st_size + 1))
            time.sleep(0.3)
            with socket.create_connection(server.server_address, timeout=10) as s:
                start = time.monotonic()
                s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert _read_answer(s).startswith(b"HTTP/1.1 200")
                assert time.monotonic() - start < 6
    finally:
        server.shutdown()
        server.server_close()


def test_at_the_connection_cap_the_longest_idle_connection_makes_room(built_site):
    server = _started(built_site, idle_timeout=20, max_connections=20)
    idle = [socket.create_connection(server.server_address, timeout=5) for _ in range(20)]
    try:
        time.sleep(0.3)
        with socket.create_connection(server.server_address, timeout=5) as s:
            s.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _read_answer(s).startswith(b"HTTP/1.1 200")
        assert idle[0].recv(1) == b""  # closed by the server to admit the new client
        idle[-1].sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(idle[-1]).startswith(b"HTTP/1.1 200")  # the others stay usable
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def load_urls(site: Path) -> list[str]:
    """A mix of pages, API URLs (with and without .json), search files and malformed URLs."""
    search = sorted(str(p.relative_to(site)) for p in (site / "search").rglob("*.json"))[:6]
    return [
        "/",
        f"/{MODEL}/",
        f"/{MODEL}/0/",
        f"/{MODEL}/1/2.html",
        f"/{MODEL}/1/2",
        "/search.html",
        "/api",
        f"/api/{MODEL}",
        f"/api/{MODEL}/neuroscope/0/1",
        f"/api/{MODEL}/all/1/3.json",
        f"/api/{MODEL}/neuroscope/0/99",
        f"/{MODEL}/go?layer=1&neuron=3",
        f"/{MODEL}/go?layer=%E4%B8%AD&neuron=0",
        "/%00",
        "/%5Cevil.com/go?layer=0&neuron=0",
        f"/{MODEL}/go?layer=0%0d%0aSet-Cookie:%20pwn=1&neuron=0",
        "/%ff",
        "/no/such/page",
    ] + ["/" + s for s in search]


def run_load(base: str, urls: list[str], clients: int, seconds: float, max_requests: int) -> dict:
    """CLIENTS threads, each on its own keep-alive connection (http.client reconnects after a
    Connection: close), requesting random URLS until SECONDS pass or MAX_REQUESTS are done."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    lock = threading.Lock()
    stats = {"requests": 0, "dropped": 0, "5xx": 0, "statuses": {}, "latencies": [], "errors": []}
    deadline = time.monotonic() + seconds
    start_gate = threading.Barrier(clients)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        start_gate.wait()
        while time.monotonic() < deadline:
            with lock:
                if stats["requests"] >= max_requests:
                    break
                stats["requests"] += 1
            url = rng.choice(urls)
            t0 = time.perf_counter()
            try:
                conn.request("GET", url)
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                with lock:
                    stats["dropped"] += 1
                    stats["errors"].append(f"{url}: {e!r}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                stats["latencies"].append(dt)
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                stats["5xx"] += status >= 500
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["elapsed"] = time.perf_counter() - t0
    return stats


def test_64_concurrent_clients_no_drops_no_5xx(served_site, built_site):
    stats = run_load(served_site, load_urls(built_site), clients=64, seconds=6.0, max_requests=20_000)
    assert stats["dropped"] == 0, stats["errors"][:5]
    assert stats["5xx"] == 0, stats["statuses"]
    assert stats["requests"] >= 64 and {200, 302, 400, 404} <= set(stats["statuses"])


@pytest.mark.parametrize(
    "path, ctype",
    [
        (f"/{MODEL}/1/2.html", "text/html"),
        (f"/api/{MODEL}/neuroscope/1/2.json", "application/json"),
        ("/api/openapi.json", "application/json"),
    ],
)
def test_text_answers_are_gzipped_for_clients_that_accept_gzip(served_site, built_site, path, ctype):
    """As Netlify's CDN does: gzip for a client that asks, the same bytes once decoded, plain for
    one that does not (or refuses gzip with q=0); Vary: Accept-Encoding on both."""
    import gzip

    want = (built_site / path.lstrip("/")).read_bytes()
    for accept, zipped in (
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("identity", False),
        ("gzip;q=0", False),
        (None, False),
    ):
        extra = f"Accept-Encoding: {accept}\r\n" if accept is not None else ""
        status, headers, body = raw_request(
            served_site, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        h = {k.lower(): v for k, v in headers}
        assert status == 200 and h["content-type"].startswith(ctype)
        assert h.get("vary") == "Accept-Encoding"
        assert (h.get("content-encoding") == "gzip") is zipped, (accept, h)
        assert int(h["content-length"]) == len(body)
        assert (gzip.decompress(body) if zipped else body) == want
        if zipped:
            assert len(body) < len(want) / 2  # the point of it
    # HEAD says what GET would send
    status, headers, body = raw_request(
        served_site, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 200 and body == b"" and dict((k.lower(), v) for k, v in headers)["content-encoding"] == "gzip"
