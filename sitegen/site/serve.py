"""`sitegen serve`: a local static server that applies netlify.toml's rules and headers (rules.py).

Every request gets an HTTP answer carrying netlify.toml's headers (security headers included):
malformed requests, unsupported methods and internal errors too. Paths declared for netlify.toml's
edge functions are answered first, by their Python ports (edge.py), with only the headers the
function sets (as on Netlify); a 404 under /api/ gets the API's JSON body instead of the 404 page
(edge.py's port of api-not-found, which on Netlify lets the request through and replaces a 404).

Bounded work whatever the clients do (SiteServer): one thread watches every open connection with a
selector and reads request heads; only a complete head (request line and headers, at most
HEAD_LIMIT bytes) is handed to a fixed pool of WORKERS threads, so idle or slow connections cost a
socket and a small buffer, never a thread. HTTP/1.1 keep-alive and pipelining work; a connection
gets IDLE_TIMEOUT seconds for each request head (counted from the previous answer, not reset by
trickled bytes) and at most MAX_CONNECTIONS are open: past that, the longest-waiting idle one is
closed to admit the new one. A worker's writes time out after IDLE_TIMEOUT too.

Text answers are gzipped for clients that accept gzip, as Netlify's CDN does (_compressed).
"""

from __future__ import annotations

import gzip
import io
import mimetypes
import queue
import re
import resource as rlimit
import selectors
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote_to_bytes

from sitegen.errors import BuildError
from sitegen.resources import resource
from sitegen.site import edge as edge_functions
from sitegen.site.rules import Decision, Rules, remove_dot_segments, site_rules

IDLE_TIMEOUT = 15.0  # seconds a connection gets for each request head; also the write timeout
LISTEN_BACKLOG = 128  # socketserver's default of 5 refuses bursts of new connections
WORKERS = 16  # threads answering complete requests (the work is CPU-bound under the GIL)
MAX_CONNECTIONS = 2048  # open connections (also kept below the process's file descriptor limit)
HEAD_LIMIT = 128 * 1024  # bytes of request line + headers buffered per connection
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
# Netlify's content types for the site's files (tests/test_netlify.py compares them).
_TYPES = {
    ".json": "application/json; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_COMPRESSIBLE = ("text/", "application/json", "application/javascript", "image/svg+xml")
GZIP_MIN_BYTES = 256  # smaller answers gain nothing from compression
# What may go into a header value we build from a request: printable ASCII without backslash.
_HEADER_SAFE = re.compile(r"[\x21-\x5b\x5d-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Netlify's pretty URLs: a path with no such file is looked up with these endings too (none for a
# path that already ends in one of these asset extensions), and "/a/" as "/a.html" first.
_ASSET = re.compile(r"\.(html?|png|jpg|js|css|svg|gif|ico|woff|woff2)$")


class Handler(BaseHTTPRequestHandler):
    rules: Rules
    root: Path
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    default_request_version = "HTTP/1.0"  # a version-less request line still gets a status line and headers
    server_version = "sitegen"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet: a preview server, not an access log
        pass

    # ---- one request whose head SiteServer has already read (request = a _Connection) ----------

    def setup(self) -> None:
        self.connection = self.request.sock
        self.rfile = io.BytesIO(self.request.head)
        self.wfile = _SocketWriter(self.request.sock)

    def handle(self) -> None:
        conn = self.request
        if conn.oversize and b"\n" in conn.head[:65537]:  # a request line that fits, headers that do not
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", None
            self.send_error(431)
            return
        self.handle_one_request()  # a request line over 64 KiB: http.server's own 414

    def finish(self) -> None:
        pass

    # ---- answers -------------------------------------------------------------------------

    def _send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, head_only: bool, path: str | None = "/"
    ) -> None:
        """Status line, HEADERS, netlify.toml's headers for PATH (none when PATH is None: an edge
        function's answer), Content-Length, then BODY."""
        if body:
            # (a request too malformed to parse has no headers: it gets its short answer plain)
            headers, body = _compressed(
                headers, body, getattr(self, "headers", None) and self.headers.get("Accept-Encoding", "") or ""
            )
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        for name, value in self.rules.headers_for(path) if path is not None else ():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error answer, including http.server's own (400 malformed, 414 too long, 501
        method): a short plain-text body and the security headers. The status line carries only
        the standard reason phrase, never text from the request. A method other than GET/HEAD
        (http.server's 501) is a client error on a static site: 405 with Allow."""
        if code == 501:
            self._plain(405, "", [("Allow", "GET, HEAD")])
        else:
            self._plain(code, "")

    def _plain(self, code: int, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """A plain-text error answer that closes the connection; DETAIL is our own text."""
        self.close_connection = True
        reason = self.responses.get(code, ("Error",))[0]
        body = f"{code} {reason}" + (f": {detail}" if detail else "") + "\n"
        head_only = getattr(self, "command", None) == "HEAD"
        self._send(
            code,
            [("Content-Type", "text/plain; charset=utf-8"), *headers],
            body.encode("ascii", "backslashreplace"),
            head_only,
        )

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, None)  # the standard reason phrase only

    def _file(self, site_path: str) -> Path | None:
        """The file a site path names, or None: outside the root, a control character, a name
        too long, or nothing there. As on Netlify (pretty URLs), "/a" is also "/a.html",
        "/a.htm", "/a/index.html" and "/a/index.htm", and "/a/" is "/a.html", "/a.htm",
        "/a/index.html" and "/a/index.htm"."""
        if _CONTROL.search(site_path):
            return None
        if site_path.endswith("/"):
            stem = site_path[:-1]
            names = ([stem + ".html", stem + ".htm"] if stem else []) + [
                site_path + "index.html",
                site_path + "index.htm",
            ]
        else:
            names = [site_path] + (
                []
                if _ASSET.search(site_path)
                else [site_path + ".html", site_path + ".htm", site_path + "/index.html", site_path + "/index.htm"]
            )
        for name in names:
            try:
                path = (self.root / name.lstrip("/")).resolve()
                if self.root not in path.parents:
                    continue
                if path.is_file():
                    return path
            except (OSError, ValueError):
                continue
        return None

    def _read(self, site_path: str) -> bytes | None:
        """An edge function's read of a static file of the site (a decoded site path)."""
        file = self._file(site_path)
        return file.read_bytes() if file else None

    def _answer(self, head_only: bool) -> None:
        raw = self.path
        if not raw.startswith("/"):  # absolute-form (a proxy request) or garbage
            self._plain(400, "the request target must be a path")
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body we do not read must not be taken for the next request
        raw_path, _, query = raw.partition("?")
        query = query.partition("#")[0]
        # "." and ".." segments (also as %2e) resolved first, as Netlify's CDN does, so an edge
        # function's path written with "/./" is its path and "/api/%2e%2e/index" is "/index".
        raw_path = remove_dot_segments(raw_path.partition("#")[0])
        # Percent-decode as bytes, then UTF-8 (undecodable bytes become U+FFFD: no file has such
        # a name, so the rules answer 404, as Netlify does).
        path = unquote_to_bytes(raw_path.encode("latin-1")).decode("utf-8", "replace")
        edge = edge_functions.handle(resource("netlify.toml"), raw_path, query, self._read)
        if edge is not None:  # before the rules, as on Netlify
            self._send(edge.status, list(edge.headers), edge.body, head_only, None)
            return
        decision = self.rules.decide(path, query, lambda p: self._file(p) is not None)
        if (
            decision.status == 404
            and (body := edge_functions.not_found_body(resource("netlify.toml"), raw_path)) is not None
        ):
            # an edge function that replaces the 404 page's body, as on Netlify (the API's JSON 404)
            self._send(404, [("Content-Type", "application/json; charset=utf-8")], body, head_only, path)
            return
        self._deliver(decision, path, head_only)

    def _deliver(self, d: Decision, path: str, head_only: bool) -> None:
        if d.status == 400:
            self._plain(400, d.reason)
            return
        if d.location is not None:
            if not _HEADER_SAFE.fullmatch(d.location):  # rules.py encodes values; this is the last guard
                self._plain(400, "the redirect target would not be a safe URL")
                return
            # Netlify's redirect answer: no Content-Type, this one-line body.
            self._send(
                d.status, [("Location", d.location)], f"Redirecting to {d.location}".encode("ascii"), head_only, path
            )
            return
        file = self._file(d.file) if d.file else None
        if file is None:  # only the 404 page itself can be missing here
            self._send(404, [("Content-Type", "text/plain; charset=utf-8")], b"404 Not Found\n", head_only, path)
            return
        body = file.read_bytes()
        ctype = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(d.status, [("Content-Type", ctype)], body, head_only, path)

    def _guarded(self, head_only: bool) -> None:
        try:
            self._answer(head_only)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug in the server: still an HTTP answer, and the traceback on stderr
            traceback.print_exc(file=sys.stderr)
            try:
                self.send_error(500)
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._guarded(False)

    def do_HEAD(self):
        self._guarded(True)


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (or *) with a non-zero q value."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        try:
            return not q.startswith("q=") or float(q[2:]) > 0
        except ValueError:
            return False
    return False


def _compressed(
    headers: list[tuple[str, str]], body: bytes, accept_encoding: str
) -> tuple[list[tuple[str, str]], bytes]:
    """Text answers (HTML, JSON, JS, CSS, SVG, plain text) gzipped for a client that accepts gzip,
    as Netlify's CDN sends them; every compressible answer says Vary: Accept-Encoding. The gzip
    header has no time stamp, so the same file gives the same bytes."""
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
    if not ctype.startswith(_COMPRESSIBLE) or len(body) < GZIP_MIN_BYTES:
        return headers, body
    headers = [*headers, ("Vary", "Accept-Encoding")]
    if not _accepts_gzip(accept_encoding):
        return headers, body
    return [*headers, ("Content-Encoding", "gzip")], gzip.compress(body, compresslevel=6, mtime=0)


class _SocketWriter(io.BufferedIOBase):
    """The handler's wfile: every write is one sendall (bounded by the socket's timeout)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._sock.sendall(b)
        return memoryview(b).nbytes


class _Connection:
    """An open client connection: bytes received and not yet answered, and its deadline."""

    __slots__ = ("sock", "address", "buffer", "scanned", "head", "oversize", "deadline")

    def __init__(self, sock: socket.socket, address, deadline: float):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.buffer, self.scanned, self.head, self.oversize = b"", 0, b"", False

    def take_request(self) -> bool:
        """Move the next complete request head out of the buffer into .head (True), or say
        none is complete yet (False). A buffer past HEAD_LIMIT without one is taken whole,
        marked oversize: the handler answers 414 or 431 and the connection closes."""
        m = _END_OF_HEAD.search(self.buffer, max(0, self.scanned - 3))
        if m is None:
            self.scanned = len(self.buffer)
            if len(self.buffer) <= HEAD_LIMIT:
                return False
            self.head, self.buffer, self.oversize = self.buffer[: HEAD_LIMIT + 1], b"", True
        else:
            self.head, self.buffer, self.oversize = self.buffer[: m.end()], self.buffer[m.end() :], False
        self.scanned = 0
        return True


class SiteServer(HTTPServer):
    """A selector loop (serve_forever) over every open connection plus WORKERS threads that
    answer complete requests: see the module docstring."""

    request_queue_size = LISTEN_BACKLOG
    workers = WORKERS
    max_connections = MAX_CONNECTIONS
    idle_timeout = IDLE_TIMEOUT

    def __init__(
        self,
        server_address,
        handler,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
    ):
        super().__init__(server_address, handler)
        soft = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[0]
        room = soft - 64 if soft != rlimit.RLIM_INFINITY else max_connections  # files, the wake pair, stdio
        self.idle_timeout, self.workers = idle_timeout, workers
        self.max_connections = max(1, min(max_connections, room))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # connections with a complete request (None: stop)
        self._returned: queue.SimpleQueue = queue.SimpleQueue()  # (connection, keep open) from the workers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already pending (or closed): the loop wakes anyway

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        pool = [
            threading.Thread(target=self._work, name=f"sitegen-serve-{i}", daemon=True) for i in range(self.workers)
        ]
        for t in pool:
            t.start()
        sel = selectors.DefaultSelector()
        waiting: OrderedDict[_Connection, None] = OrderedDict()  # idle or partly read, earliest deadline first
        self.open_connections = 0

        def close(conn: _Connection) -> None:
            self.open_connections -= 1
            try:
                conn.sock.close()
            except OSError:
                pass

        def forget(conn: _Connection) -> None:
            sel.unregister(conn.sock)
            del waiting[conn]

        def park(conn: _Connection) -> None:
            conn.deadline = time.monotonic() + self.idle_timeout
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            waiting[conn] = None

        try:
            self.socket.setblocking(False)
            sel.register(self.socket, selectors.EVENT_READ, "accept")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                timeout = poll_interval
                if waiting:
                    timeout = max(0.0, min(timeout, next(iter(waiting)).deadline - time.monotonic()))
                for key, _ in sel.select(timeout):
                    if key.data == "accept":
                        for _ in range(64):  # a batch per wake-up, so one burst cannot starve the rest
                            try:
                                sock, address = self.socket.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError:  # out of descriptors or the like: the backlog holds the rest
                                break
                            if self.open_connections >= self.max_connections:
                                if not waiting:
                                    sock.close()
                                    continue
                                oldest = next(iter(waiting))  # the longest-waiting idle connection makes room
                                forget(oldest)
                                close(oldest)
                            sock.settimeout(self.idle_timeout)  # bounds a worker's writes
                            self.open_connections += 1
                            park(_Connection(sock, address, 0.0))
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        conn = key.data
                        if conn not in waiting:  # closed earlier in this batch (made room for a new one)
                            continue
                        try:
                            data = conn.sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            forget(conn)
                            close(conn)
                            continue
                        conn.buffer += data
                        if conn.take_request():
                            forget(conn)
                            self._jobs.put(conn)
                        # else it waits on, its deadline unchanged: trickled bytes buy no time
                while True:
                    try:
                        conn, keep = self._returned.get_nowait()
                    except queue.Empty:
                        break
                    if keep:
                        park(conn)
                    else:
                        close(conn)
                now = time.monotonic()
                while waiting and next(iter(waiting)).deadline <= now:
                    conn = next(iter(waiting))
                    forget(conn)
                    close(conn)
        finally:
            for conn in list(waiting):
                forget(conn)
                close(conn)
            sel.close()
            for _ in pool:
                self._jobs.put(None)
            self._stopped.set()

    def _work(self) -> None:
        """A worker: answer each connection's complete requests, then hand it back to the loop."""
        while (conn := self._jobs.get()) is not None:
            keep = False
            try:
                while True:
                    handler = self.RequestHandlerClass(conn, conn.address, self)
                    keep = not handler.close_connection
                    if not keep or not conn.take_request():  # pipelined requests already received
                        break
            except OSError:  # the client went away or stopped reading (write timeout)
                keep = False
            except Exception:
                keep = False
                self.handle_error(conn.sock, conn.address)
            if self._stop.is_set():  # the loop is gone or going: nobody would close it
                conn.sock.close()
                continue
            self._returned.put((conn, keep))
            self._wake()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


def make_server(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    workers: int = WORKERS,
    max_connections: int = MAX_CONNECTIONS,
) -> SiteServer:
    root = Path(root).resolve()
    if not (root / "index.html").is_file():
        raise BuildError(f"{root} has no index.html; build the site first: sitegen build STORE --out {root}")
    handler = type("SiteHandler", (Handler,), {"rules": site_rules(root), "root": root})
    edge_functions.declarations(resource("netlify.toml"))  # a declaration serve cannot run fails here, in one line
    try:
        return SiteServer(
            (host, port), handler, idle_timeout=idle_timeout, workers=workers, max_connections=max_connections
        )
    except OSError as e:
        raise BuildError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from None


def serve_forever(root: Path, host: str, port: int) -> None:
    server = make_server(root, host, port)
    print(
        f"serving {Path(root).resolve()} at http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
