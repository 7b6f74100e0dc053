"""Netlify Edge Functions, answered locally by `sitegen serve`.

netlify.toml's [[edge_functions]] declarations (path -> function) are the single source: serve
reads them and answers a matching request with the Python port of the function registered in
FUNCTIONS. The one function today is DeepDecipher's search URL,

    /api/<model>/neuron2graph-search?query=type:token[,type:token...]

whose deployed version is netlify/edge-functions/neuron2graph-search.ts (Deno). Both read the same
static search files (sitegen/site/search.py writes them) and must answer identically: the same
status, headers and bytes (tests/test_search.py checks it under a real Deno on every query of a
small site). Change both together.

The second, netlify/edge-functions/api-not-found.ts on /api/*, lets the request go on through the
rules and static files (context.next()) and replaces only a 404 answer's body with the API's JSON
error (NOT_FOUND_BODY), keeping the status and netlify.toml's headers: serve applies it after the
rules (not_found_body).

As on Netlify, an edge function's response carries only its own headers (netlify.toml's
[[headers]] do not apply to it), and it runs before the redirect rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, quote, unquote

import orjson
import tomllib

from sitegen.errors import BuildError
from sitegen.services.neuron2graph.tokenstore import parse_query
from sitegen.site.search import fnv1a

Read = Callable[[str], "bytes | None"]  # site path ("/search/m/meta.json") -> bytes, None when missing

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


@dataclass(frozen=True)
class EdgeResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


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


def _load(read: Read, path: str, data: bytes | None = None):
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


def neuron2graph_search(path: str, query_string: str, read: Read) -> EdgeResponse:
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


FUNCTIONS: dict[str, Callable[[str, str, Read], EdgeResponse]] = {"neuron2graph-search": neuron2graph_search}

# netlify/edge-functions/api-not-found.ts: the same bytes as its BODY (JSON.stringify's).
NOT_FOUND_BODY = orjson.dumps(
    {"error": "no such API URL: /api lists the models and each model's services; /api/openapi.json describes every URL"}
)
# Edge functions that let the request go on (context.next()) and replace only a 404 answer: name ->
# the JSON body it answers instead of the site's 404 page, with the 404's status and headers kept.
NOT_FOUND_FUNCTIONS: dict[str, bytes] = {"api-not-found": NOT_FOUND_BODY}


def _compile(path: str) -> re.Pattern:
    """A declaration's `path` (URLPattern syntax: `*` any characters, `:name` one segment) as Netlify
    routes it: the whole path, with an optional trailing slash."""
    out = []
    for part in re.split(r"(:[A-Za-z_]\w*|\*)", path.rstrip("/") or "/"):
        out.append("(.*)" if part == "*" else "([^/]+?)" if part.startswith(":") else re.escape(part))
    return re.compile("^" + "".join(out) + "/?$")


@lru_cache(maxsize=4)
def declarations(netlify_toml: Path) -> tuple[tuple[re.Pattern, str], ...]:
    """[[edge_functions]] of netlify.toml: (path pattern, function name), in declaration order."""
    try:
        doc = tomllib.loads(netlify_toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(
            f"{netlify_toml}: cannot read the edge function declarations ({e}); restore netlify.toml"
        ) from None
    out = []
    for d in doc.get("edge_functions", []):
        if d.get("function") not in FUNCTIONS and d.get("function") not in NOT_FOUND_FUNCTIONS:
            raise BuildError(
                f"{netlify_toml}: edge function {d.get('function')!r} has no Python port in sitegen/site/edge.py; add one to FUNCTIONS"
            )
        out.append((_compile(d["path"]), d["function"]))
    return tuple(out)


def handle(netlify_toml: Path, raw_path: str, query_string: str, read: Read) -> EdgeResponse | None:
    """The response of the first edge function declared for RAW_PATH that answers by itself, or
    None (static rules apply). A NOT_FOUND_FUNCTIONS function declared before it would see its
    answer: netlify.toml declares them after."""
    for pattern, name in declarations(netlify_toml):
        if name in FUNCTIONS and pattern.match(raw_path):
            return FUNCTIONS[name](raw_path, query_string, read)
    return None


def not_found_body(netlify_toml: Path, raw_path: str) -> bytes | None:
    """The JSON body a NOT_FOUND_FUNCTIONS function declared for RAW_PATH answers a 404 with (the
    status and netlify.toml's headers stay the static answer's), or None: the site's 404 page."""
    for pattern, name in declarations(netlify_toml):
        if name in NOT_FOUND_FUNCTIONS and pattern.match(raw_path):
            return NOT_FOUND_FUNCTIONS[name]
    return None
