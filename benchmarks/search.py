"""Static token search at GPT-2 XL scale: a synthetic token store of 48 x 6400 = 307,200 neurons
over a 50,257-token vocabulary (Zipf-distributed token use, 1-20 activating tokens per neuron,
a fifth of the neurons with a graph's 3-8 important tokens), written by the real search writer.

    python benchmarks/search.py [--queries 60] [--seed 0] [--keep DIR] [--no-browser]

Prints: the files written and the largest folder (Netlify refuses more than 54,000 files in one);
bytes a query downloads (gzip, as a CDN serves JSON), median / p95 / max over queries drawn by
token frequency and over every distinct token; for DeepDecipher's search URL, the bytes its edge
function reads per query and its time per query under Deno (when the deno package is installed);
and time to results in headless Chromium against `sitegen serve` on loopback (so network time is
~0; the figure is fetch + parse + intersect + render).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

LAYERS, SIZE, VOCAB = 48, 6400, 50_257


def synthetic_token_store(seed: int):
    from sitegen.services.neuron2graph.tokenstore import SOURCE_GRAPH, SOURCE_TOP, TokenStore

    rng = np.random.default_rng(seed)
    n = LAYERS * SIZE
    weights = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    weights /= weights.sum()
    n_act = rng.integers(1, 21, size=n)
    draws = rng.choice(VOCAB, size=int(n_act.sum()), p=weights)
    splits = np.split(draws, np.cumsum(n_act)[:-1])
    activating = [np.unique(s) for s in splits]
    graph = rng.random(n) < 0.2
    important = [
        np.unique(rng.choice(VOCAB, size=rng.integers(3, 9), p=weights)) if g else np.zeros(0, np.int64) for g in graph
    ]
    keys = [f"tok{i}" for i in range(VOCAB)]
    # each result's support (top sequences carrying the token: 1-5 of a neuron's top 5) and the
    # token counts of a 10M-token corpus, so the shards carry what a real store's do
    support = [rng.integers(1, 6, size=len(a)) for a in activating]
    counts = rng.multinomial(10_000_000, weights)
    corpus = {"sequences": 10_000_000 // 64, "tokens": 10_000_000, "processed": 10_000_000 // 64}
    return TokenStore(
        keys,
        SIZE,
        activating,
        important,
        [SOURCE_GRAPH if g else SOURCE_TOP for g in graph],
        [round(float(x), 3) if g else None for g, x in zip(graph, rng.random(n))],
        np.round(rng.random(n) * 5, 4).tolist(),
        support,
        counts,
        corpus,
    ), weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the site here and keep it")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium timing")
    args = ap.parse_args()

    from sitegen.site.build import _environment, _publish_assets
    from sitegen.site.publisher import Publisher
    from sitegen.site.search import fnv1a, publish_search

    t = time.perf_counter()
    ts, weights = synthetic_token_store(args.seed)
    print(
        f"synthetic token store: {ts.n_neurons:,} neurons, {sum(len(a) for a in ts.activating):,} activating and "
        f"{sum(len(i) for i in ts.important):,} important entries ({time.perf_counter() - t:.0f} s)"
    )
    out = args.keep or Path(tempfile.mkdtemp(prefix="search-bench-"))
    try:
        pub = Publisher(out)
        env = _environment(_publish_assets(pub))
        env.globals["content_pages"] = []
        from sitegen.services import registry

        cached = {
            "neuron2graph.token_store": ts,
            "neuron_explainer.explanations": {},
        }  # what SiteModel.cached would hold
        model = SimpleNamespace(
            name="synthetic-xl",
            layer_size=SIZE,
            num_layers=LAYERS,
            services=list(registry()),
            text_search=False,
            cached=lambda key, make: cached[key],
        )
        t = time.perf_counter()
        figures = publish_search(pub, model)
        pub.publish("search.html", env.get_template("search.html").render(models=[model]))
        pub.publish("index.html", b"<!doctype html><title>bench</title>")
        print(f"search files written in {time.perf_counter() - t:.0f} s: {figures}")
        base = out / "search" / model.name
        shard_gz = {int(p.stem): len(gzip.compress(p.read_bytes(), 6)) for p in (base / "tokens").iterdir()}
        meta_gz = len(gzip.compress((base / "meta.json").read_bytes(), 6))
        more = [p.stat().st_size for p in (base / "more").iterdir()] if (base / "more").exists() else [0]
        total = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
        print(
            f"index: {len(shard_gz)} shards, {total / 1e6:.1f} MB on disk under search/ (previews included); "
            f"{len(more)} 'more' files, largest {max(more) / 1e3:.0f} KB raw"
        )
        present = np.unique(np.concatenate(ts.activating + ts.important)).tolist()

        def query_bytes(token_ids) -> list[int]:
            return [shard_gz[fnv1a(ts.keys[i]) % len(shard_gz)] for i in token_ids]

        def describe(label, sizes):
            sizes = sorted(sizes)
            p95 = sizes[int(0.95 * (len(sizes) - 1))]
            print(
                f"  {label}: median {statistics.median(sizes) / 1e3:.2f} KB, p95 {p95 / 1e3:.2f} KB, max {sizes[-1] / 1e3:.2f} KB (gzip)"
            )

        rng = np.random.default_rng(args.seed + 1)
        by_freq = rng.choice(VOCAB, size=2000, p=weights)
        print(f"bytes per one-token query (the shard; plus {meta_gz} B of meta.json once per page):")
        describe("queries drawn by token frequency", query_bytes(by_freq))
        describe("every distinct token", query_bytes(present))
        folders: dict[str, int] = {}
        for p in out.rglob("*"):
            if p.is_file():
                folders[str(p.parent.relative_to(out))] = folders.get(str(p.parent.relative_to(out)), 0) + 1
        top = sorted(folders.items(), key=lambda kv: -kv[1])[:3]
        print(f"files per folder: largest {', '.join(f'{f}/ {n:,}' for f, n in top)} (Netlify's limit: 54,000)")
        _api_figures(out, model.name, ts, weights, rng)
        if not args.no_browser:
            _browser_timing(out, model.name, [ts.keys[i] for i in rng.choice(VOCAB, size=args.queries, p=weights)])
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)


def _api_figures(site: Path, model: str, ts, weights, rng) -> None:
    """DeepDecipher's search URL: what its edge function reads per query (the Python port, which
    reads the same files), and its time per query under Deno."""
    import json
    import os
    import subprocess

    from sitegen.services.neuron2graph import edge

    def files_read(query: str) -> tuple[int, int]:
        sizes = []

        def read(path: str):
            f = site / edge.unquote(path).lstrip("/")
            data = f.read_bytes() if f.is_file() else None
            if data is not None:
                sizes.append((len(data), len(gzip.compress(data, 6))))
            return data

        r = edge.neuron2graph_search(f"/api/{model}/neuron2graph-search", "query=" + edge.quote(query, safe=""), read)
        assert r.status == 200, r.body
        return sum(s for s, _ in sizes), sum(z for _, z in sizes)

    singles = [f"any:{ts.keys[i]}" for i in rng.choice(VOCAB, size=300, p=weights)]
    pairs = [f"any:{ts.keys[a]},any:{ts.keys[b]}" for a, b in rng.choice(VOCAB, size=(100, 2), p=weights)]
    for label, queries in (("one term", singles), ("two terms (AND)", pairs)):
        got = sorted(files_read(q) for q in queries)
        raw, gz = sorted(r for r, _ in got), sorted(z for _, z in got)
        print(
            f"search URL, files the edge function reads per query, {label}, queries drawn by token frequency: "
            f"median {statistics.median(raw) / 1e3:.1f} KB ({statistics.median(gz) / 1e3:.1f} KB gzip), "
            f"p95 {raw[int(0.95 * (len(raw) - 1))] / 1e3:.1f} KB, max {raw[-1] / 1e3:.1f} KB ({gz[-1] / 1e3:.1f} KB gzip)"
        )
    try:
        import deno

        deno_bin = deno.find_deno_bin()
    except (ImportError, FileNotFoundError):
        print("search URL under Deno: not measured (pip install deno)")
        return
    common = [ts.keys[0], ts.keys[1], ts.keys[2]]  # the most frequent tokens: the longest lists
    worst = [
        f"any:{common[0]}",
        f"activating:{common[0]}",
        f"any:{common[1]}",
        f"any:{common[0]},any:{common[1]}",
        f"any:{common[0]},any:{common[1]},any:{common[2]}",
    ]
    done = subprocess.run(
        [deno_bin, "run", "--quiet", "--no-prompt", f"--allow-read={site}", "--allow-env", "benchmarks/search_edge.ts"],
        input=json.dumps({"site": str(site), "model": model, "queries": singles[:200] + pairs[:50] + worst}),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"},
    )
    timed = json.loads(done.stdout)
    print(
        f"search URL under Deno, files in memory, best of 3 (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):"
    )
    for label, part in (("one term", timed[:200]), ("two terms", timed[200:250])):
        for what in ("cpu", "ms"):
            v = sorted(t[what] for t in part)
            print(
                f"  {label}, {'CPU time' if what == 'cpu' else 'wall time'}: median {statistics.median(v):.2f} ms, "
                f"p95 {v[int(0.95 * (len(v) - 1))]:.2f} ms, max {v[-1]:.2f} ms"
            )
    for t in timed[250:]:
        print(
            f"  {t['query']}: CPU {t['cpu']:.1f} ms, wall {t['ms']:.1f} ms, answer {t['bytes'] / 1e6:.2f} MB, {t['neurons']:,} neurons"
        )


def _browser_timing(site: Path, model: str, tokens: list[str]) -> None:
    import os

    from playwright.sync_api import sync_playwright

    from sitegen.site.serve import make_server

    server = make_server(site, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/search.html?model={model}"
    chromium = os.environ.get("SITEGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    times, transferred = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(bypass_csp=True)  # Playwright's wait_for_function evaluates strings
            page.goto(url)
            sizes: list[int] = []
            page.on(
                "response",
                lambda r: sizes.append(int(r.headers.get("content-length", 0))) if "/search/" in r.url else None,
            )
            for token in tokens:
                sizes.clear()
                page.fill("#search-q", f"any:{token}")
                start = time.perf_counter()
                page.click("#search-form button[type=submit]")
                page.wait_for_function(
                    "!document.getElementById('search-status').textContent.startsWith('Searching')"
                    " && document.getElementById('search-status').textContent !== ''"
                )
                times.append(time.perf_counter() - start)
                transferred.append(sum(sizes))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    times.sort()
    print(
        f"time to results in headless Chromium, {len(times)} one-token queries (cache warm after the first meta.json): "
        f"median {1000 * statistics.median(times):.0f} ms, p95 {1000 * times[int(0.95 * (len(times) - 1))]:.0f} ms, max {1000 * times[-1]:.0f} ms; "
        f"uncompressed bytes fetched per query (shard, and preview files of the first 50 results): median {statistics.median(transferred) / 1e3:.1f} KB"
    )


if __name__ == "__main__":
    main()
