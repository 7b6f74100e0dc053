"""`sitegen build`: stores -> static site + JSON API. Reads top to bottom:

    load theme -> open stores (collect) -> per model: per layer, read each service's table once
    and render every neuron (HTML + JSON), gathering layer summaries -> layer, model and index
    pages, API index and OpenAPI -> assets and content pages -> remove stale files (only those an
    earlier build recorded), record this build's files, report.

Never imports torch (an import-linter contract and a test check it).
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import resource as _rusage
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import orjson
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import escape

from sitegen import __version__
from sitegen.errors import BuildError, ConfigError, SitegenError
from sitegen.names import model_name_problem
from sitegen.resources import default_theme, resource
from sitegen.services import registry
from sitegen.services.base import fmt_num, fmt_pct
from sitegen.services.tokens import escaped_shown_vocab, escaped_vocab, shown
from sitegen.site.provenance import model_provenance, neuron_provenance
from sitegen.site.publisher import NETLIFY_DIR_LIMIT, Publisher, open_output
from sitegen.store import Store

# numpy arrays too: orjson writes a float64 array's values byte for byte as it writes Python floats
_JSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps(obj) -> bytes:
    return orjson.dumps(obj, option=_JSON_OPTS)


@dataclass
class BuildReport:
    models: int
    neurons: int
    written: int
    unchanged: int
    removed: int
    seconds: float
    out: Path
    warnings: tuple[str, ...] = ()
    files: int = 0  # the site's files (written + unchanged)
    bytes: int = 0  # their total size
    largest_folder: tuple[str, int] = ("", 0)
    jobs: int = 1
    peak_rss_mb: float = 0.0  # the largest of the build's processes (main or a worker)

    def summary(self) -> str:
        rate = self.neurons / self.seconds if self.seconds > 0 else 0.0
        folder, count = self.largest_folder
        lines = [
            f"built {self.out}: {self.models} model(s), {self.neurons:,} neurons in {self.seconds:.1f}s ({rate:,.0f} neurons/s, "
            f"{self.jobs} job{'s' if self.jobs != 1 else ''})",
            f"  {self.files:,} files, {self.bytes / 2**20:,.1f} MiB; {self.written:,} written, {self.unchanged:,} unchanged, "
            f"{self.removed:,} removed; largest folder {folder or '.'}/ ({count:,} files); peak memory {self.peak_rss_mb:,.0f} MB",
        ]
        return "\n".join([*lines, *(f"warning: {w}" for w in self.warnings)])


def default_jobs() -> int:
    """All the cores this process may run on (respects taskset / CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Progress:
    """Progress of the per-neuron rendering with an ETA, as lines through `log` (at most one every
    `every` seconds, and one at the end); quiet when `log` is None."""

    def __init__(self, total: int, log: Callable[[str], None] | None, every: float = 2.0):
        self.total, self.log, self.every = total, log, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def advance(self, neurons: int, what: str) -> None:
        self.done += neurons
        now = time.monotonic()
        if self.log is None or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.log(f"{what} · {self.done:,}/{self.total:,} neurons · {rate:,.0f} neurons/s · ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h {rest // 60:02d}m" if h else f"{rest // 60}m {rest % 60:02d}s"


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (the workers), the larger."""
    scale = 1 / 1024 if os.uname().sysname != "Darwin" else 1 / 2**20  # KiB on Linux, bytes on macOS
    own = _rusage.getrusage(_rusage.RUSAGE_SELF).ru_maxrss * scale
    children = _rusage.getrusage(_rusage.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, children)


class SiteModel:
    """What the build knows about one store's model; also the `site` the services' views read."""

    def __init__(self, store: Store):
        self.store = store
        m = store.manifest
        self.name = m["model"]["name"]
        if problem := model_name_problem(self.name):
            raise BuildError(
                f"{store.root}: model name {problem}; recompute with another --name (or edit model.name in its manifest.json)"
            )
        # What a unit is called on its pages: a dictionary's store (compute --sae) holds latents.
        self.unit = "latent" if m.get("dictionary") else "neuron"
        self.num_layers = int(m["model"]["num_layers"])
        self.layer_size = int(m["model"]["layer_size"])
        self.services = [s for s in registry() if s.available(store)]
        self.table_services = sorted(self.services, key=lambda s: s.column_order)  # stable: registry order on ties
        self.activations = next(
            (s.name for s in self.services if s.activations), None
        )  # the service the templates link for activations
        self.text_search = any(s.text_search for s in self.services)
        self.first_valid = int(m["config"]["first_valid_position"])
        self.provenance = model_provenance(m)
        self.provenance_services = sorted(
            self.services, key=lambda s: s.provenance_order
        )  # stable: registry order on ties
        self._vocab: list[str] | None = None
        self._esc: list[str] | None = None
        self._seqs: dict | None = None
        self._tokens: dict[int, list[str]] = {}
        self._docs: dict[int, str] = {}
        self._esc_closed: list[str] | None = None
        self._cache: dict[str, object] = {}

    def cached(self, key: str, make):
        """A per-model value a service computes once and reuses across layers (token store,
        similar neurons, explanations); `key` is prefixed with the service's name."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = self.store.vocab()
        return self._vocab

    @property
    def esc_vocab(self) -> list[str]:
        if self._esc is None:
            self._esc = escaped_vocab(self.vocab)
        return self._esc

    @property
    def esc_shown_vocab(self) -> list[str]:
        """Escaped tokens for a cell of their own (tokens.shown: whitespace tokens made visible)."""
        return self.cached("site.esc_shown_vocab", lambda: escaped_shown_vocab(self.vocab))

    @property
    def esc_vocab_closed(self) -> list[str]:
        """Escaped tokens with their closing tag, for joining token spans without a Python loop."""
        if self._esc_closed is None:
            self._esc_closed = [t + "</i>" for t in self.esc_vocab]
        return self._esc_closed

    def escaped_doc(self, seq_id: int) -> str:
        cached = self._docs.get(seq_id)
        if cached is None:
            cached = self._docs[seq_id] = str(escape(self.sequence(seq_id)["doc_id"]))
        return cached

    def tokens(self, seq_id: int) -> list[str]:
        """The sequence's token strings (cached: many neurons share a sequence)."""
        cached = self._tokens.get(seq_id)
        if cached is None:
            vocab = self.vocab
            cached = self._tokens[seq_id] = [vocab[i] for i in self.sequence(seq_id)["token_ids"]]
        return cached

    def sequence(self, seq_id: int) -> dict:
        if self._seqs is None:
            t = self.store.sequences()
            self._seqs = {
                s: {"doc_id": d, "char_start": a, "char_end": b, "token_ids": ids}
                for s, d, a, b, ids in zip(
                    *(t.column(c).to_pylist() for c in ("seq_id", "doc_id", "char_start", "char_end", "token_ids"))
                )
            }
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise BuildError(
                f"{self.store.root}: sequence {seq_id} is referenced but missing from sequences.parquet; recompute the store"
            ) from None

    def metadata(self) -> dict:
        """DeepDecipher's Metadata object (plus a few fields of ours)."""
        m = self.store.manifest
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "layer_size": self.layer_size,
            "activation_function": m["model"]["activation_function"],
            "num_total_neurons": self.num_layers * self.layer_size,
            "num_total_parameters": m["model"]["num_total_parameters"],
            "dataset": m["corpus"]["name"],
            "available_services": [s.name for s in self.services],
            "tokens_processed": m["processed"]["tokens"],
            "sequence_length": m["config"]["seq_len"],
            "provenance": self.provenance,
        }

    def random_neuron(self, layer: int, neuron: int) -> tuple[int, int]:
        """A fixed 'random' neuron for each page, so links work without JavaScript and builds are deterministic."""
        h = int.from_bytes(hashlib.sha256(f"{self.name}/{layer}/{neuron}".encode()).digest()[:8], "big")
        return (h >> 20) % self.num_layers, h % self.layer_size


def _neighbours(model: SiteModel, layer: int, neuron: int) -> dict:
    """Previous / next, wrapping across layer boundaries (and around the model)."""
    flat = layer * model.layer_size + neuron
    total = model.num_layers * model.layer_size
    prev_, next_ = (flat - 1) % total, (flat + 1) % total
    return {
        "prev": divmod(prev_, model.layer_size),
        "next": divmod(next_, model.layer_size),
        "random": model.random_neuron(layer, neuron),
    }


def theme_layers(theme: Path | None = None) -> list[Path]:
    """The theme folders to read, first match wins: a user's theme (--theme) over the default one.
    A user's theme holds any subset of the default's templates/ and static/ files."""
    if theme is None:
        return [default_theme()]
    if not theme.is_dir() or not ((theme / "templates").is_dir() or (theme / "static").is_dir()):
        raise ConfigError(
            f"--theme {theme}: not a theme folder (it needs templates/ or static/, laid out like sitegen's default theme)"
        )
    return [theme, default_theme()]


def _environment(assets: dict[str, str], themes: list[Path] | None = None) -> Environment:
    # the themes first, then the folders of services shipped outside the default theme
    folders = [t / "templates" for t in (themes or theme_layers())] + [
        d for s in registry() if (d := s.template_dir()) is not None
    ]
    loader = ChoiceLoader([FileSystemLoader(str(f)) for f in folders])
    # auto_reload off: a build never sees a template change, and the check costs a stat per include
    env = Environment(
        loader=loader,
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(assets=assets, version=__version__, once=_once({}))
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    return env


def _once(cache: dict):
    """The templates' `{% call once(key) %}...{% endcall %}`: the block's output the first time
    `key` is seen in this build, reused after (a fragment every page of a model shares)."""

    def once(key: str, caller) -> str:
        if key not in cache:
            cache[key] = caller()
        return cache[key]

    return once


def _publish_assets(pub: Publisher, themes: list[Path] | None = None) -> dict[str, str]:
    """Static files with a content hash in their names (immutable caching); returns name -> URL.
    A file of a user's theme replaces the default theme's file of the same name."""
    files: dict[str, Path] = {}
    for theme in reversed(themes or theme_layers()):
        static = theme / "static"
        if static.is_dir():
            files.update({p.name: p for p in static.iterdir() if p.is_file()})
    assets = {}
    for name in sorted(files):
        path = files[name]
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:10]
        rel = f"assets/{path.stem}.{digest}{path.suffix}"
        pub.publish(rel, data)
        assets[path.name] = "/" + rel
    return assets


def _site_services(models: list[SiteModel]) -> list:
    """The services some model of the site has, in registry order."""
    held = {s.name for m in models for s in m.services}
    return [s for s in registry() if s.name in held]


# Where the site's own address goes in the API examples when the build is given no --base-url:
# app.js writes the page's origin over it; without JavaScript it reads as an instruction.
SITE_ORIGIN = "https://<your-site>"


def _services_markdown(models: list[SiteModel]) -> str:
    return "\n".join(f"- `{s.name}`: {s.description}" for s in _site_services(models))


def _content_pages(pub: Publisher, env: Environment, models: list[SiteModel], base_url: str) -> None:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    example = models[0] if models else None
    texts = {}
    for path in sorted(resource("content").glob("*.md")):
        text = path.read_text()
        if example:  # API examples name a real model of this site, and the services its models have
            text = (
                text.replace("{{model}}", example.name)
                .replace("{{base_url}}", base_url.rstrip("/") or SITE_ORIGIN)
                .replace("{{services}}", _services_markdown(models))
            )
        texts[path.stem] = text
    pages = [
        {"slug": slug, "title": (t.splitlines()[0].lstrip("# ").strip() if t else slug)} for slug, t in texts.items()
    ]
    env.globals["content_pages"] = pages  # the header links to every content page
    for page in pages:
        pub.publish(
            f"{page['slug']}.html",
            env.get_template("page.html").render(title=page["title"], body=md.render(texts[page["slug"]])),
        )


def build_site(
    store_paths: list[Path],
    out: Path,
    base_url: str = "",
    theme: Path | None = None,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build the site. `jobs` > 1 renders layers in that many worker processes (the output is
    byte-identical to jobs=1); `log` gets progress lines with an ETA."""
    started = time.monotonic()
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: pass a number of processes >= 1 (default: every core, {default_jobs()})")
    stage = "collect"
    themes = theme_layers(theme)
    try:
        stores = [Store.open(p) for p in store_paths]
        # A store's dictionaries (compute --sae) are published beside its model, as models of their own.
        models = [SiteModel(s) for s in stores + [d for s in stores for d in s.dictionary_stores()]]
        names = [m.name for m in models]
        for name in set(names):
            if names.count(name) > 1:
                raise BuildError(
                    f"two stores hold a model named {name!r}; recompute one with --name to tell them apart"
                )
        for a in names:  # paths, not only names, must differ (names equal but for case: the publisher refuses them)
            for b in names:
                if a.lower() == f"{b.lower()}.json":
                    raise BuildError(
                        f"api/{b}.json would be both model {b!r}'s metadata and model {a!r}'s folder; recompute one with another --name"
                    )
        models.sort(key=lambda m: m.name)
        progress = Progress(sum(m.num_layers * m.layer_size for m in models), log)
        stage = "output folder"
        with open_output(out, store_paths) as pub:  # locked, checked; see publisher.py
            stage = "assets"
            assets = _publish_assets(pub, themes)
            env = _environment(assets, themes)
            stage = "content"
            _content_pages(pub, env, models, base_url)
            neurons = 0
            for model in models:
                stage = f"render {model.name}"
                neurons += _render_model(pub, env, model, jobs, progress)
            stage = "index"
            api_models = [m.metadata() for m in models]
            pub.publish(
                "index.html",
                env.get_template("index.html").render(
                    models=models, metadata=api_models, services=_site_services(models)
                ),
            )
            pub.publish("api/index.json", dumps({"models": api_models}))
            from sitegen.site.openapi import openapi_document

            pub.publish("api/openapi.json", dumps(openapi_document(models, registry())))
            pub.publish("404.html", env.get_template("404.html").render())
            pub.publish("search.html", env.get_template("search.html").render(models=models))
            from sitegen.site.rules import REDIRECTS_FILE, chooser_redirects

            pub.publish(REDIRECTS_FILE, chooser_redirects(names))  # the chooser's rules (rules.py says why)
            stage = "remove stale files"
            removed = pub.finish()  # last: the record of this build's files
    except SitegenError:
        raise
    except OSError as e:
        raise BuildError(f"build failed at stage '{stage}': {e}") from None
    folder, count = pub.largest_folder()
    warnings = ()
    if count > NETLIFY_DIR_LIMIT:
        warnings = (
            f"{folder or '.'}/ holds {count:,} files, over Netlify's {NETLIFY_DIR_LIMIT:,} per folder: the deploy would fail there (other hosts are fine)",
        )
    warnings += tuple(note for m in models for s in m.services for note in s.build_notes(m.store))
    return BuildReport(
        len(models),
        neurons,
        pub.written,
        pub.unchanged,
        removed,
        time.monotonic() - started,
        out,
        warnings,
        files=pub.written + pub.unchanged,
        bytes=pub.bytes_total,
        largest_folder=(folder, count),
        jobs=jobs,
        peak_rss_mb=_peak_rss_mb(),
    )


def _render_model(pub: Publisher, env: Environment, model: SiteModel, jobs: int, progress: Progress) -> int:
    """Every page and API file of one model: the layers (in worker processes when jobs > 1), then
    the model level."""
    meta = model.metadata()
    api = f"api/{model.name}"
    layer_payloads: dict[str, list[dict]] = {s.name: [] for s in model.services}
    layer_summaries = []
    for _layer, (summary, payloads) in _render_layers(pub, env, model, meta, jobs, progress):
        layer_summaries.append(summary)
        for name, lp in payloads.items():
            layer_payloads[name].append(lp)
    for s in model.services:
        pub.publish(
            f"{api}/{s.name}.json", dumps({"data": s.model_payload(model, layer_payloads[s.name]), "metadata": meta})
        )
    # The site-wide search (token and explanation search, DeepDecipher's search URL) reads several
    # services' data, so it is a site step, not one service's index.
    from sitegen.site.search import has_search, publish_search

    if has_search(model):
        publish_search(pub, model)
    pub.publish(f"{api}.json", dumps({"data": meta, "metadata": meta}))
    pub.publish(f"{api}/all.json", dumps({"metadata": meta, "services": [s.name for s in model.services]}))
    facts = {k: v for s in model.services for k, v in s.model_facts(model, layer_payloads[s.name]).items()}
    pub.publish(
        f"{model.name}/index.html",
        env.get_template("model.html").render(
            model=model, meta=meta, layers=layer_summaries, facts=facts, api=f"/{api}"
        ),
    )
    return model.num_layers * model.layer_size


def _render_layers(pub: Publisher, env: Environment, model: SiteModel, meta: dict, jobs: int, progress: Progress):
    """Yield (layer, (layer summary, {service: layer payload})) in layer order, rendering every
    layer's files: here, or with jobs > 1 in a pool of forked workers that inherit the model, the
    theme and the output folder and each write whole layers. Every file's bytes depend only on
    the store, so which process writes it changes nothing; the workers report the paths they
    published and the main process checks and records them as if it had written them itself."""
    workers = min(jobs, model.num_layers)
    what = lambda layer: f"{model.name}: layer {layer + 1}/{model.num_layers}"
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():  # POSIX only, as the output lock
        for layer in range(model.num_layers):
            result = _render_layer(pub, env, model, meta, layer)
            progress.advance(model.layer_size, what(layer))
            yield layer, result
        return
    global _FORKED
    _FORKED = (pub, env, model, meta)
    for s in model.services:  # model-wide data loaded once, here, so every worker shares it
        s.prepare(model)
    done: dict[int, tuple] = {}
    try:
        # concurrent.futures rather than multiprocessing.Pool: a worker that dies (the kernel's
        # OOM killer, a kill) breaks the pool with an error instead of leaving the build waiting.
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = [pool.submit(_render_layer_in_worker, layer) for layer in range(model.num_layers)]
            try:
                # Layers finish in any order; hand them on in layer order (the model page lists them so).
                next_layer = 0
                for future in as_completed(futures):
                    layer, result, files, counts = future.result()
                    pub.adopt(files, *counts)
                    progress.advance(model.layer_size, what(layer))
                    done[layer] = result
                    while next_layer in done:
                        yield next_layer, done.pop(next_layer)
                        next_layer += 1
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # no layer starts after a failure
                raise
    except BrokenProcessPool:
        raise BuildError(
            f"a build worker died while rendering {model.name} (killed, or out of memory); rerun to finish "
            f"(files already written are kept), with a smaller --jobs if memory is short"
        ) from None
    finally:
        _FORKED = None


_FORKED: tuple | None = None  # (publisher, environment, model, metadata) the forked workers inherit


def _exit_with_parent(parent: int) -> None:
    """A worker outlives a build killed with SIGKILL otherwise (concurrent.futures' workers wait on
    a queue whose writing end they hold themselves), keeping the output folder's lock and the
    build's stdout open: it exits within a second of its parent instead."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _render_layer_in_worker(layer: int):
    pub, env, model, meta = _FORKED
    own = pub.for_worker()
    result = _render_layer(own, env, model, meta, layer)
    return layer, result, own.published(), (own.written, own.unchanged, own.bytes_written, own.bytes_total)


def _render_layer(
    pub: Publisher, env: Environment, model: SiteModel, meta: dict, layer: int
) -> tuple[dict, dict[str, dict]]:
    """One layer: each service's table read once, every neuron's page and API files, the layer's
    API files and page; returns the layer's summary (for the model page) and each service's layer
    payload (for the model-level API)."""
    neuron_tpl = env.get_template("neuron.html")
    api = f"api/{model.name}"
    meta_json = dumps(meta)
    views = [(s, s.open_layer(model.store, layer, model)) for s in model.services]
    view_of = {s.name: view for s, view in views}
    # The layer's tables and the model's caches are millions of long-lived objects: out of the
    # collector's sight, its full collections (every ~100,000 new containers) stop scanning them.
    gc.freeze()
    rows = []
    for n in range(model.layer_size):
        payloads, encoded = {}, {}
        for s, view in views:
            payloads[s.name] = view.payload(n)
            encoded[s.name] = dumps(payloads[s.name])  # serialised once, spliced into the envelopes below
            pub.publish(
                f"{api}/{s.name}/{layer}/{n}.json", b'{"data":' + encoded[s.name] + b',"metadata":' + meta_json + b"}"
            )
        # A service the model lacks gets no files: its URLs answer the API's JSON 404 (netlify.toml).
        pub.publish(f"{api}/all/{layer}/{n}.json", _all(encoded, meta_json))
        pages = {s.name: view.page(n) for s, view in views}
        summary = [item for s, view in views for item in s.neuron_summary(view, n, payloads[s.name])]
        pub.publish(
            f"{model.name}/{layer}/{n}.html",
            neuron_tpl.render(
                model=model,
                meta=meta,
                layer=layer,
                neuron=n,
                nav=_neighbours(model, layer, n),
                services=pages,
                summary=summary,
                templates={s.name: s.template for s in model.services},
                api=f"/{api}",
                provenance=neuron_provenance(model.provenance_services, model.provenance, layer, n, payloads),
            ),
        )
        row = {"neuron": n, "cells": []}
        for s in model.table_services:
            row["cells"].extend(s.layer_cells(view_of[s.name], n, payloads[s.name]))
            row.update(s.layer_facts(view_of[s.name], n, payloads[s.name]))
        rows.append(row)
    layer_json, layer_payloads = {}, {}
    for s, view in views:
        lp = layer_payloads[s.name] = view.layer_payload()
        layer_json[s.name] = {"data": lp}
        pub.publish(f"{api}/{s.name}/{layer}.json", dumps({"data": lp, "metadata": meta}))
    pub.publish(f"{api}/all/{layer}.json", dumps({"metadata": meta} | layer_json))
    columns = [c for s in model.table_services for c in s.layer_columns()]
    pub.publish(
        f"{model.name}/{layer}/index.html",
        env.get_template("layer.html").render(
            model=model, meta=meta, layer=layer, rows=rows, columns=columns, api=f"/{api}"
        ),
    )
    return _layer_summary(layer, [r for r in rows if "max" in r]), layer_payloads


def _all(encoded: dict[str, bytes], meta_json: bytes) -> bytes:
    """DeepDecipher's `all` object (one {"data": ...} per service the model has) plus the model's
    metadata, from already-serialised parts, keys sorted like dumps() sorts them."""
    parts = {name: b'{"data":' + data + b"}" for name, data in encoded.items()} | {"metadata": meta_json}
    return b"{" + b",".join(dumps(k) + b":" + parts[k] for k in sorted(parts)) + b"}"


def _layer_summary(layer: int, rows: list[dict]) -> dict:
    if not rows:
        return {"layer": layer}
    best = max(rows, key=lambda r: r["max"])
    return {
        "layer": layer,
        "max": best["max"],
        "argmax": best["neuron"],
        "max_token": shown(best["top_token"]),
        "mean_frac": sum(r["frac"] for r in rows) / len(rows),
        "artefact": best.get("artefact"),
    }
