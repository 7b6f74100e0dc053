"""Netlify Edge Functions, answered locally by `sitegen serve`.

netlify.toml's [[edge_functions]] declarations (path -> function) say which function runs for a
path and in which order, as on Netlify. A service's own functions (hook `edge_functions`: name,
path, cache, the Deno module in the service's folder and its Python port) must be declared there
with the same path and cache; serve answers a matching request with the function's Python port,
before the rules. A declaration no service and no site-level function has, or one that disagrees
with its service, is refused in one line.

The site's own function, netlify/edge-functions/api-not-found.ts on /api/*, lets the request go on
through the rules and static files (context.next()) and replaces only a 404 answer's body with the
API's JSON error (NOT_FOUND_BODY), keeping the status and netlify.toml's headers: serve applies it
after the rules (not_found_body).

As on Netlify, an edge function's response carries only its own headers (netlify.toml's
[[headers]] do not apply to it), and it runs before the redirect rules.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

import orjson
import tomllib

from sitegen.errors import BuildError
from sitegen.services import registry
from sitegen.services.base import EdgeFunction, EdgeRead, EdgeResponse

# netlify/edge-functions/api-not-found.ts: the same bytes as its BODY (JSON.stringify's).
NOT_FOUND_BODY = orjson.dumps(
    {"error": "no such API URL: /api lists the models and each model's services; /api/openapi.json describes every URL"}
)
# The site's own edge functions that let the request go on (context.next()) and replace only a 404
# answer: name -> the JSON body it answers instead of the site's 404 page, with the 404's status and
# headers kept.
NOT_FOUND_FUNCTIONS: dict[str, bytes] = {"api-not-found": NOT_FOUND_BODY}

Answer = Callable[[str, str, EdgeRead], EdgeResponse]


def service_functions() -> dict[str, tuple[str, EdgeFunction]]:
    """Every registered service's edge functions: name -> (the service's name, its declaration)."""
    out: dict[str, tuple[str, EdgeFunction]] = {}
    for service in registry():
        for fn in service.edge_functions():
            if fn.name in out or fn.name in NOT_FOUND_FUNCTIONS:
                owner = out[fn.name][0] if fn.name in out else "sitegen itself"
                raise BuildError(
                    f"service {service.name!r} declares the edge function {fn.name!r}, which {owner} has; rename one"
                )
            out[fn.name] = (service.name, fn)
    return out


def _compile(path: str) -> re.Pattern:
    """A declaration's `path` (URLPattern syntax: `*` any characters, `:name` one segment) as Netlify
    routes it: the whole path, with an optional trailing slash."""
    out = []
    for part in re.split(r"(:[A-Za-z_]\w*|\*)", path.rstrip("/") or "/"):
        out.append("(.*)" if part == "*" else "([^/]+?)" if part.startswith(":") else re.escape(part))
    return re.compile("^" + "".join(out) + "/?$")


@lru_cache(maxsize=4)
def declarations(netlify_toml: Path) -> tuple[tuple[re.Pattern, str, Answer | None], ...]:
    """[[edge_functions]] of netlify.toml, in declaration order: (path pattern, function name, the
    service's Python port, or None for a NOT_FOUND_FUNCTIONS function)."""
    try:
        doc = tomllib.loads(netlify_toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(
            f"{netlify_toml}: cannot read the edge function declarations ({e}); restore netlify.toml"
        ) from None
    functions = service_functions()
    out = []
    for d in doc.get("edge_functions", []):
        name = d.get("function")
        if name in NOT_FOUND_FUNCTIONS:
            out.append((_compile(d["path"]), name, None))
            continue
        if name not in functions:
            raise BuildError(
                f"{netlify_toml}: edge function {name!r} is declared, but no registered service has it "
                "(Service.edge_functions); install the service or remove the declaration"
            )
        owner, fn = functions[name]
        if (d.get("path"), d.get("cache")) != (fn.path, fn.cache):
            raise BuildError(
                f"{netlify_toml}: edge function {name!r} is declared with path {d.get('path')!r} and cache "
                f"{d.get('cache')!r}, its service {owner!r} with path {fn.path!r} and cache {fn.cache!r}; make them equal"
            )
        out.append((_compile(fn.path), name, fn.answer))
    declared = {name for _, name, _ in out}
    for name, (owner, fn) in functions.items():
        if name not in declared:
            cache = f', cache = "{fn.cache}"' if fn.cache else ""
            raise BuildError(
                f"{netlify_toml}: service {owner!r} has the edge function {name!r}, which is not declared; add "
                f'[[edge_functions]] path = "{fn.path}", function = "{name}"{cache} before the site\'s own functions'
            )
    return tuple(out)


def netlify_entry(fn: EdgeFunction, functions_dir: Path) -> str:
    """The module `functions_dir/<name>.ts` that Netlify bundles for a service's edge function:
    Netlify looks for edge functions only in that folder, and the function's module lives in its
    service's folder, so the entry re-exports it (by a relative path, which Deno resolves)."""
    target = Path(os.path.relpath(fn.source, functions_dir)).as_posix()
    return (
        "// Netlify bundles edge functions from this folder only; this one's module lives in its service's\n"
        "// folder (Service.edge_functions), so this entry re-exports it (sitegen.site.edge.netlify_entry).\n"
        f'export {{ default }} from "{target}";\n'
    )


def handle(netlify_toml: Path, raw_path: str, query_string: str, read: EdgeRead) -> EdgeResponse | None:
    """The response of the first edge function declared for RAW_PATH that answers by itself, or
    None (static rules apply). A NOT_FOUND_FUNCTIONS function declared before it would see its
    answer: netlify.toml declares them after."""
    for pattern, _name, answer in declarations(netlify_toml):
        if answer is not None and pattern.match(raw_path):
            return answer(raw_path, query_string, read)
    return None


def not_found_body(netlify_toml: Path, raw_path: str) -> bytes | None:
    """The JSON body a NOT_FOUND_FUNCTIONS function declared for RAW_PATH answers a 404 with (the
    status and netlify.toml's headers stay the static answer's), or None: the site's 404 page."""
    for pattern, name, answer in declarations(netlify_toml):
        if answer is None and pattern.match(raw_path):
            return NOT_FOUND_FUNCTIONS[name]
    return None
