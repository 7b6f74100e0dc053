"""`sitegen serve` under 64 concurrent clients, on loopback only.

    python benchmarks/serve_load.py [--clients 64] [--seconds 30] [--max-requests 300000] [--site DIR]

Builds a small synthetic site (or serves DIR, a built site), starts `sitegen serve` in its own
process on 127.0.0.1, and runs CLIENTS keep-alive clients (threads spread over a few client
processes, so the clients' GIL does not cap the server) that request a random mix of pages, API
URLs (with and without .json), search files and malformed URLs, for SECONDS or MAX_REQUESTS,
whichever comes first. Prints requests/s, p50 / p99 / max latency, answers by status, dropped
connections and 5xx answers (both must be 0).
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
    api += [f"/api/{model}/{svc}/{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}{ext}"
            for svc in ("neuroscope", "all", "logits") for ext in ("", ".json") for _ in range(4)]
    api += [f"/{model}/go?layer={rng.randrange(LAYERS)}&neuron={rng.randrange(NEURONS)}" for _ in range(4)]
    malformed = [f"/{model}/go?layer=0%0d%0aSet-Cookie:%20pwn=1&neuron=0", "/%5Cevil.com/go?layer=0&neuron=0",
                 f"/{model}/go?layer=%E4%B8%AD&neuron=0", "/%00", "/%ff%fe", "/" + "a" * 3000, "/..%2F..%2Fetc%2Fpasswd"]
    return pages + api + rng.sample(search, min(20, len(search))) + malformed


def _client_process(host: str, port: int, urls: list[str], threads: int, deadline: float, budget, seed: int, out) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=300_000)
    ap.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1), help="client processes the clients are spread over")
    ap.add_argument("--site", type=Path, help="a built site to serve (default: build a synthetic one)")
    args = ap.parse_args()
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..1024 and --seconds 0..600")

    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or build_site(Path(tmp))
        model = args.site and next(p.name for p in sorted(site.iterdir()) if (p / "index.html").is_file() and p.name != "api") or MODEL
        urls = url_mix(site, model)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        server = subprocess.Popen([sys.executable, "-c", "from sitegen.cli import main; main()", "serve", str(site),
                                   "--host", "127.0.0.1", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_up(port)
            procs = max(1, min(args.processes, args.clients))
            per = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
            budget = mp.Value("q", args.max_requests)
            out: mp.Queue = mp.Queue()
            t0 = time.perf_counter()
            deadline = time.time() + args.seconds
            workers = [mp.Process(target=_client_process, args=("127.0.0.1", port, urls, n, deadline, budget, i, out)) for i, n in enumerate(per)]
            for w in workers:
                w.start()
            results = [out.get() for _ in workers]
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - t0
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=10)

    latencies = sorted(x for lat, _, _ in results for x in lat)
    statuses: dict[int, int] = {}
    for _, st, _ in results:
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    errors = [e for _, _, errs in results for e in errs]
    n = len(latencies)
    pct = lambda q: latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")  # noqa: E731
    fives = sum(v for k, v in statuses.items() if k >= 500)
    print(f"sitegen serve, {args.clients} concurrent keep-alive clients in {procs} processes, loopback, {elapsed:.1f} s, "
          f"{len(urls)} distinct URLs ({os.cpu_count()} CPUs on this machine)")
    print(f"requests answered: {n:,}   {n / elapsed:,.0f} requests/s")
    print(f"latency: p50 {pct(0.50):.1f} ms   p99 {pct(0.99):.1f} ms   max {latencies[-1] * 1000 if n else float('nan'):.1f} ms")
    print("answers by status: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    print(f"dropped connections: {len(errors)}   5xx answers: {fives}")
    for e in errors[:5]:
        print("  dropped:", e)
    if "Traceback" in (stderr or ""):
        print("server stderr had a traceback:\n" + stderr[-2000:])
    if errors or fives:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
