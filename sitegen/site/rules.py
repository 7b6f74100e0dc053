"""URL rules and headers, read from netlify.toml (the single source of truth) and applied the way
Netlify applies them, so `sitegen serve` and the CDN answer alike:

- a path that names an existing file is served as is (rules are not forced);
- otherwise the first [[redirects]] rule whose `from` (with :placeholders and a trailing * splat)
  and `query` conditions match decides: status 200 rewrites, 3xx redirects, 404 serves `to` with 404;
- every [[headers]] block whose `for` pattern matches adds its values.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

from sitegen.errors import BuildError
from sitegen.resources import resource



@dataclass(frozen=True)
class Redirect:
    pattern: re.Pattern
    to: str
    status: int
    query: tuple[tuple[str, str], ...]  # (param, placeholder)


@dataclass(frozen=True)
class Resolution:
    status: int  # 200 serve file, 3xx redirect, 404
    target: str  # a path in the site (for 200/404) or a Location (for 3xx)


def _compile(path_pattern: str) -> re.Pattern:
    out = []
    for part in re.split(r"(:[A-Za-z_]\w*|\*)", path_pattern):
        if part == "*":
            out.append(r"(?P<splat>.*)")
        elif part.startswith(":"):
            out.append(rf"(?P<{part[1:]}>[^/]+)")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


@dataclass(frozen=True)
class Rules:
    redirects: tuple[Redirect, ...]
    headers: tuple[tuple[re.Pattern, tuple[tuple[str, str], ...]], ...]

    def resolve(self, path: str, query: str, exists) -> Resolution:
        """Decide what a request for PATH?QUERY gets; exists(site_path) says whether a file is there."""
        if exists(path):
            return Resolution(200, path)
        params = {k: v[0] for k, v in parse_qs(query).items()}
        for rule in self.redirects:
            m = rule.pattern.match(path)
            if not m:
                continue
            values = {k: v for k, v in m.groupdict().items() if v is not None}
            if any(param not in params for param, _ in rule.query):
                continue
            for param, placeholder in rule.query:
                values[placeholder.lstrip(":")] = params[param]
            target = re.sub(r":(\w+)", lambda g: values.get(g.group(1), g.group(0)), rule.to)
            if rule.status == 200 and not exists(target):
                continue
            return Resolution(rule.status, target)
        return Resolution(404, "/404.html")

    def headers_for(self, path: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for pattern, values in self.headers:
            if pattern.match(path):
                out.extend(values)
        return out


@lru_cache(maxsize=4)
def load_rules(path: Path | None = None) -> Rules:
    """The rules of `path`, by default the netlify.toml that ships with sitegen (the repository's own)."""
    path = path or resource("netlify.toml")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(f"{path}: cannot read the URL rules ({e}); restore netlify.toml") from None
    redirects = tuple(
        Redirect(_compile(r["from"]), r["to"], int(r.get("status", 301)), tuple(sorted((r.get("query") or {}).items())))
        for r in doc.get("redirects", [])
    )
    headers = tuple((_compile(h["for"]), tuple(sorted(h.get("values", {}).items()))) for h in doc.get("headers", []))
    return Rules(redirects, headers)
