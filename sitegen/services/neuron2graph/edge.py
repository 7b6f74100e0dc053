"""DeepDecipher's search URL as an edge function: the Python port `sitegen serve` runs (hook
`Neuron2Graph.edge_functions`),

    /api/<model>/neuron2graph-search?query=type:token[,type:token...]

whose deployed version is neuron2graph-search.ts beside this file (Deno, on Netlify). Both read
the same static search files (sitegen/site/search.py writes them) and must answer identically: the
same status, headers and bytes (tests/test_search.py checks it under a real Deno on every query of
a small site). Change both together.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote

import orjson

from sitegen.services.base import EdgeRead, EdgeResponse, fnv1a
from sitegen.services.neuron2graph.tokenstore import parse_query

NAME = "neuron2graph-search"
PATH = "/api/*/neuron2graph-search"  # netlify.toml's [[edge_functions]] path
HEADERS = (
    ("Content-Type", "application/json"),
    ("Access-Control-Allow-Origin", "*"),
    ("Cache-Control", "public, max-age=300"),
    ("Netlify-CDN-Cache-Control", "public, max-age=31536000, must-revalidate"),
    ("Netlify-Vary", "query=query"),
    # netlify.toml's site-wide security headers, which Netlify does not add to an edge function's
    # own response (tests/test_search.py checks these equal netlify.toml's "/*" block).
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Permissions-Policy", "interest-cohort=()"),
)
USAGE = (
    "missing ?query=: ask for type:token[,type:token...] with type any, activating or important, "
    "e.g. ?query=any:the or ?query=any:the,activating:of (terms combine by AND)"
)
_PATH = re.compile(r"^/api/([^/]+)/neuron2graph-search/?$")
_BAD_MODEL = re.compile(r"[/\\\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_URI_COMPONENT_SAFE = "!*'()"  # what encodeURIComponent leaves alone beyond quote()'s letters, digits and _.-~


def _reply(status: int, body: bytes) -> EdgeResponse:
    return EdgeResponse(status, HEADERS, body)


def _error(status: int, message: str) -> EdgeResponse:
    return _reply(status, orjson.dumps({"error": message}))


def _js_quote(text: str) -> str:
    """JSON.stringify of a string (what the Deno version writes in its messages)."""
    return orjson.dumps(text).decode()


def _decode_uri_component(raw: str) -> str | None:
    """JavaScript's decodeURIComponent: None where it would throw (a bad escape, invalid UTF-8)."""
    if _BAD_ESCAPE.search(raw):
        return None
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None


def query_param(query_string: str, name: str) -> str | None:
    """URLSearchParams.get(name): the first value, '' for a bare name, None when absent."""
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        if key == name:
            return value
    return None


class _SiteError(Exception):
    pass


def _load(read: EdgeRead, path: str, data: bytes | None = None):
    data = read(path) if data is None else data
    try:
        if data is not None:
            return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    raise _SiteError(f"the site's search file {path} is missing or broken; rebuild the site")


def _undelta(d: list[int]) -> list[int]:
    out, x = [], 0
    for step in d:
        x += step
        out.append(x)
    return out


def neuron2graph_search(path: str, query_string: str, read: EdgeRead) -> EdgeResponse:
    """The answer to PATH?QUERY_STRING (PATH as sent, percent-encoded), reading site files via READ."""
    m = _PATH.match(path)
    model = _decode_uri_component(m.group(1)) if m else None
    if model is None or model in (".", "..") or _BAD_MODEL.search(model):
        return _error(
            404,
            "no such search URL: ask /api/<model>/neuron2graph-search?query=any:the (the models are listed at /api)",
        )
    query = query_param(query_string, "query")
    if query is None:
        return _error(404, USAGE)
    try:
        terms = parse_query(query)
    except ValueError as e:
        return _error(400, str(e))
    base = f"/search/{quote(model, safe=_URI_COMPONENT_SAFE)}/"
    meta_bytes = read(base + "meta.json")
    if meta_bytes is None:
        return _error(404, f"no model {_js_quote(model)} on this site (the models are listed at /api)")
    try:
        meta = _load(read, base + "meta.json", meta_bytes)
        files: dict[str, dict] = {}  # each shard and "more" file is read once per request

        def load(path: str) -> dict:
            if path not in files:
                files[path] = _load(read, path)
            return files[path]

        result: set[int] | None = None
        for kind, token in terms:  # distinct, at most MAX_TERMS (parse_query)
            shard = fnv1a(token) % meta["shards"]
            entry = load(f"{base}tokens/{shard}.json").get(token)
            if entry is None:
                ids: set[int] = set()
            else:
                capped = (kind != "important" and entry["na"] > len(entry["a"])) or (
                    kind != "activating" and entry["ni"] > len(entry["i"])
                )
                lists = load(f"{base}more/{shard}-{entry['m']}.json") if capped else entry
                a = [] if kind == "important" else _undelta(lists["a"])
                i = [] if kind == "activating" else _undelta(lists["i"])
                ids = set(a) | set(i)
            result = ids if result is None else result & ids
    except _SiteError as e:
        return _error(500, str(e))
    size = meta["layer_size"]
    return _reply(200, orjson.dumps([{"layer": x // size, "neuron": x % size} for x in sorted(result or ())]))
