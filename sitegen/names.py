"""Which model names the site can use: a model's name is the first segment of its URLs
(`/<model>/<layer>/<neuron>`, `/api/<model>/...`, `/search/<model>/...`) and a folder of the build.

A name must be URL-safe (letters, digits, '.', '_', '-', not starting with a dot or dash) and must
not be one of the entries the build writes at the top of the site or at the top of `api/` (a
model called `api` or `about` would share a folder or a URL with the site's own files, one called
`openapi` would write its metadata over `api/openapi.json`). Compared case-insensitively:
on macOS and Windows `API` and `api` are the same folder.

No torch and nothing heavy: `sitegen compute` checks `--name` with this before loading a model,
the build checks every store's name, and the store's manifest schema checks the name's shape.
It sits at the bottom of the import layers (pyproject.toml), below the store and compute, which
both use it: inside sitegen.site it made store -> site -> store a cycle.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from sitegen.resources import resource

# What build_site writes at the top besides the content pages and one folder per model
# (tests/test_hostile.py builds a site and checks that every top-level entry is listed here).
TOP_LEVEL_FILES = ("index.html", "404.html", "search.html")
TOP_LEVEL_DIRS = ("api", "assets", "search")
# What build_site writes at the top of api/ besides api/<model>.json and api/<model>/ (same test).
API_FILES = ("index.json", "openapi.json")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LENGTH = 100  # a path segment; well under every file system's 255


@lru_cache(maxsize=1)
def reserved_names() -> frozenset[str]:
    """Lower-cased names a model may not take: every top-level entry of the site and of its api/
    folder, with and without its extension (`about` would be /about/ next to /about.html,
    `openapi` would publish api/openapi.json). The content pages are content/<slug>.md, published
    as <slug>.html."""
    entries = [
        *TOP_LEVEL_FILES,
        *TOP_LEVEL_DIRS,
        *API_FILES,
        *(f"{p.stem}.html" for p in resource("content").glob("*.md")),
    ]
    return frozenset(n.lower() for e in entries for n in (e, e.rsplit(".", 1)[0]))


def model_name_problem(name: object, reserved: Iterable[str] | None = None) -> str | None:
    """Why `name` cannot be a model's name, or None when it can. `reserved` defaults to reserved_names()."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # fullmatch: "toy\n" passes a `^...$` search
        return f"{name!r} is not URL-safe: use letters, digits, '.', '_' or '-', starting with a letter or digit"
    if len(name) > MAX_NAME_LENGTH:
        return f"{name[:20]!r}... is longer than {MAX_NAME_LENGTH} characters"
    if name.lower() in (reserved_names() if reserved is None else {r.lower() for r in reserved}):
        return f"{name!r} is taken by the site's own pages and folders ({', '.join(sorted(reserved_names()))}); choose another name"
    return None
