"""`sitegen serve` under many concurrent clients, with idle connections held open, on loopback only.

    python benchmarks/serve_load.py [--clients 200] [--idle 1000] [--seconds 10] [--max-requests 300000] [--site DIR]

Builds a small synthetic site (or serves DIR, a built site), starts `sitegen serve` in its own
process on 127.0.0.1, opens IDLE connections that stay open for the run (half send nothing, half
send half a request head and stop: slow clients), then runs CLIENTS keep-alive clients (threads
spread over a few client processes, so the clients' GIL does not cap the server) that request a
random mix of pages, API URLs (with and without .json), search files and malformed URLs, for
SECONDS or MAX_REQUESTS, whichever comes first. Prints requests/s, p50 / p99 / max latency,
answers by status, dropped connections and 5xx answers (both must be 0), the server's peak thread
count and peak RSS (sampled from /proc, Linux), and how many idle connections were open at the end
(the server closes one whose request head is not complete within 15 s; the benchmark reopens them
every 0.5 s, so IDLE stay held open during the run).
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-model"
LAYERS, NEURONS = 4, 64


def build_site(out: Path) -> Path:
    from sitegen.site.build import build_site as build
    from tests.reference import write_synthetic_store

    store = write_synthetic_store(out / "store", name=MODEL, n_layers=LAYERS, n_neurons=NEURONS)
    build([store.root], out / "site")
    return out / "site"


def url_mix(site: Path, model: str, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    search = sorted("/" + str(p.relative_to(site)) for p in (site / "search").rglob("*.json"))
    pages = ["/", f"/{model}/", "/search.html", "/404-no-such-page"]
    pages += [f"/{model}/{layer}/" for layer in range(LAYERS)]
    pages += [f"/{model}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}.html" for _ in range(20)]
    pages += [f"/{model}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}" for _ in range(10)]
    api = ["/api", f"/api/{model}", f"/api/{model}/neuroscope/0", f"/api/{model}/neuroscope/0/999"]
    api += [
        f"/api/{model}/{svc}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}{ext}"
        for svc in ("neuroscope", "all", "logits")
        for ext in ("", ".json")
        for _ in range(4)
    ]
    api += [f"/{model}/go?layer={rng.randrange(LAYERS)}&neuron={rng.randrange(NEURONS)}" for _ in range(4)]
    malformed = [
        f"/{model}/go?layer=0%0d%0aSet-Cookie:%20pwn=1&neuron=0",
        "/%5Cevil.com/go?layer=0&neuron=0",
        f"/{model}/go?layer=%E4%B8%AD&neuron=0",
        "/%00",
        "/%ff%fe",
        "/" + "a" * 3000,
        "/..%2F..%2Fetc%2Fpasswd",
    ]
    return pages + api + rng.sample(search, min(20, len(search))) + malformed


def _client_process(
    host: str, port: int, urls: list[str], threads: int, deadline: float, budget, seed: int, out
) -> None:
    """THREADS keep-alive clients until DEADLINE (time.time()) or the shared request BUDGET runs out."""
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.time() < deadline:
            with budget.get_lock():
                if budget.value <= 0:
                    break
                budget.value -= 1
            url = rng.choice(urls)
            t0 = time.perf_counter()
            try:
                conn.request("GET", url)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                with lock:
                    errors.append(f"{url[:80]}: {e!r}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[r.status] = statuses.get(r.status, 0) + 1
        conn.close()

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, statuses, errors))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/")
            c.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("sitegen serve did not answer within 30 s")


def _proc_status(pid: int) -> dict[str, int]:
    """Threads and VmHWM (peak RSS, kB) of PID from /proc (empty where /proc is missing)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("Threads", "VmHWM")}


def _sample(pid: int, stop: threading.Event, peak: dict[str, int]) -> None:
    while not stop.wait(0.05):
        for k, v in _proc_status(pid).items():
            peak[k] = max(peak.get(k, 0), v)


def _idle_connection(port: int, half_sent: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if half_sent:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    s.setblocking(False)
    return s


def open_idle(port: int, n: int, deadline: float) -> list[socket.socket]:
    """N loopback connections: even ones send nothing, odd ones half a request head (no blank line)."""
    out = []
    for i in range(n):
        if time.monotonic() > deadline:
            raise SystemExit(f"opening {n} idle connections took too long ({len(out)} open)")
        out.append(_idle_connection(port, i % 2 == 1))
    return out


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""  # data would be a bug (nothing was asked); b"" means the server closed it
    except BlockingIOError:
        return False
    except OSError:
        return True


def keep_open(port: int, sockets: list[socket.socket], stop: threading.Event, reopened: list[int]) -> None:
    """Every 0.5 s until STOP, replace the idle connections the server has closed (it closes one
    whose request head is not complete within its idle timeout), so the count stays held open."""
    while not stop.wait(0.5):
        for i, s in enumerate(sockets):
            if not stop.is_set() and _closed(s):
                s.close()
                try:
                    sockets[i] = _idle_connection(port, i % 2 == 1)
                    reopened[0] += 1
                except OSError:
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument(
        "--idle", type=int, default=0, help="connections held open, idle or half-sent, while the clients run"
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=300_000)
    ap.add_argument(
        "--processes",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="client processes the clients are spread over",
    )
    ap.add_argument("--site", type=Path, help="a built site to serve (default: build a synthetic one)")
    args = ap.parse_args()
    if not 1 <= args.clients <= 1024 or not 0 <= args.idle <= 4000 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..1024, --idle 0..4000 and --seconds 0..600")

    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or build_site(Path(tmp))
        model = (
            args.site
            and next(p.name for p in sorted(site.iterdir()) if (p / "index.html").is_file() and p.name != "api")
            or MODEL
        )
        urls = url_mix(site, model)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from sitegen.cli import main; main()",
                "serve",
                str(site),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        idle: list[socket.socket] = []
        peak: dict[str, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(server.pid, stop, peak), daemon=True)
        try:
            wait_until_up(port)
            sampler.start()
            idle = open_idle(port, args.idle, time.monotonic() + 60)
            reopened = [0]
            keeper = threading.Thread(target=keep_open, args=(port, idle, stop, reopened), daemon=True)
            keeper.start()
            procs = max(1, min(args.processes, args.clients))
            per = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
            budget = mp.Value("q", args.max_requests)
            out: mp.Queue = mp.Queue()
            t0 = time.perf_counter()
            deadline = time.time() + args.seconds
            workers = [
                mp.Process(target=_client_process, args=("127.0.0.1", port, urls, n, deadline, budget, i, out))
                for i, n in enumerate(per)
            ]
            for w in workers:
                w.start()
            results = [out.get() for _ in workers]
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - t0
            idle_left = sum(not _closed(sock) for sock in idle)  # as the clients finish
            stop.set()
            keeper.join()
        finally:
            stop.set()
            for sock in idle:
                sock.close()
            server.terminate()
            _, stderr = server.communicate(timeout=10)

    latencies = sorted(x for lat, _, _ in results for x in lat)
    statuses: dict[int, int] = {}
    for _, st, _ in results:
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    errors = [e for _, _, errs in results for e in errs]
    n = len(latencies)
    pct = lambda q: latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")
    fives = sum(v for k, v in statuses.items() if k >= 500)
    print(
        f"sitegen serve, {args.clients} concurrent keep-alive clients in {procs} processes, {args.idle} idle connections held open, "
        f"loopback, {elapsed:.1f} s, {len(urls)} distinct URLs ({os.cpu_count()} CPUs on this machine, load average "
        f"{os.getloadavg()[0]:.1f})"
    )
    print(f"requests answered: {n:,}   {n / elapsed:,.0f} requests/s")
    print(
        f"latency: p50 {pct(0.50):.1f} ms   p99 {pct(0.99):.1f} ms   max {latencies[-1] * 1000 if n else float('nan'):.1f} ms"
    )
    print("answers by status: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    print(f"dropped connections: {len(errors)}   5xx answers: {fives}")
    print(
        f"server: peak threads {peak.get('Threads', 'n/a')}   peak RSS {peak.get('VmHWM', 0) / 1024:.0f} MB   "
        f"idle connections open as the clients finished: {idle_left} of {args.idle} ({reopened[0]} reopened after the server's idle timeout)"
    )
    for e in errors[:5]:
        print("  dropped:", e)
    if "Traceback" in (stderr or ""):
        print("server stderr had a traceback:\n" + stderr[-2000:])
    if errors or fives:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
