"""URL rules and headers, read from netlify.toml (the single source of truth) and applied with
Netlify's documented semantics, so `sitegen serve` and the CDN answer alike:

- [[redirects]] are read in order until one matches (its `from` path, with :placeholders and a
  trailing * splat, and every parameter its `query` names); then processing stops. One trailing
  slash on the requested path is ignored for matching.
- Shadowing: if that rule is not `force = true` and a file exists at the requested path, the file
  is served. A path no rule matches is served if it is a file, else the 404 page.
- A rule's status: 301/302/303/307/308 redirect to `to`; any other status (200 = rewrite, 404, ...)
  serves the file at `to` with that status. The rewrite happens once: `to` is looked up as a
  file, never fed back into the rules, and a missing `to` answers the 404 page with status 404
  (no fall-through to the next rule).
- Every [[headers]] block whose `for` pattern matches the requested path adds its values.

Two guards Netlify does not have (README, "URL rules", lists the resulting differences):
- Placeholders named in INTEGER_PLACEHOLDERS (:layer, :neuron) stand for whole numbers. A
  redirect whose value is not one answers 400; a rewrite answers the 404 page (no such file can
  exist, which is what Netlify answers too).
- Placeholder values are percent-encoded before they reach a Location, and a Location never
  starts with `//`, so no request can inject a header or redirect off-site.

`Rules.match(path, query)` is the pure rule lookup (no files); `Rules.decide(path, query, exists)`
adds shadowing and missing targets and returns the `Decision` a server acts on.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, quote

from sitegen.errors import BuildError
from sitegen.resources import resource

NOT_FOUND_PAGE = "/404.html"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The rule-level convention netlify.toml's comments document: these placeholder names hold
# whole numbers (layer and neuron indices), wherever they appear (path or query).
INTEGER_PLACEHOLDERS = frozenset({"layer", "neuron"})
_INTEGER = re.compile(r"[0-9]{1,10}")
_PLACEHOLDER = re.compile(r":([A-Za-z_]\w*)")
# Characters a placeholder value keeps as is in a Location: RFC 3986's unreserved characters and
# the sub-delimiters that are harmless inside one path segment. Everything else ('/', '\\', '?',
# '#', '%', controls, non-ASCII) is percent-encoded, so a value stays one segment of the path.
_SEGMENT_SAFE = "-._~!$'()*+,;=:@"


@dataclass(frozen=True)
class Rule:
    """One [[redirects]] table, in file order."""

    source: str  # `from`
    to: str
    status: int
    force: bool
    query: tuple[tuple[str, str], ...]  # (parameter name, ":placeholder"), sorted
    pattern: re.Pattern

    @property
    def redirects(self) -> bool:
        return self.status in REDIRECT_STATUSES

    def bind(self, path: str, params: dict[str, str]) -> dict[str, str] | None:
        """The placeholder values if PATH and PARAMS satisfy this rule, else None."""
        m = self.pattern.match(path)
        if not m or any(name not in params for name, _ in self.query):
            return None
        values = {k: v for k, v in m.groupdict().items() if v is not None}
        for name, placeholder in self.query:
            values[placeholder.lstrip(":")] = params[name]
        return values


@dataclass(frozen=True)
class Match:
    """The first rule a request matches, with its placeholder values bound."""

    rule: Rule
    values: dict[str, str]

    def bad_integers(self) -> list[str]:
        """The integer placeholders (INTEGER_PLACEHOLDERS) whose value is not a whole number."""
        return sorted(k for k, v in self.values.items() if k in INTEGER_PLACEHOLDERS and not _INTEGER.fullmatch(v))

    def target(self) -> str:
        """`to` with the placeholders filled in: raw for a site path (rewrite), percent-encoded
        per segment for a Location (redirect)."""
        encode = self.rule.redirects
        def fill(g: re.Match) -> str:
            name = g.group(1)
            if name not in self.values:
                return g.group(0)
            value = self.values[name]
            return quote(value, safe=_SEGMENT_SAFE + ("/" if name == "splat" else "")) if encode else value
        out = _PLACEHOLDER.sub(fill, self.rule.to)
        if encode and out.startswith("/"):
            out = "/" + out.lstrip("/")  # '//host/...' would leave the site
        return out


@dataclass(frozen=True)
class Decision:
    """What a request gets. status: the HTTP status. file: the site path whose bytes to send
    (None for a redirect, a bad request, or a missing 404 page). location: for a redirect.
    rule: the rule that decided (None when no rule did). reason: for a 400."""

    status: int
    file: str | None = None
    location: str | None = None
    rule: Rule | None = None
    reason: str = ""


def query_params(query: str) -> dict[str, str]:
    """The first value of each query parameter; blank values kept, undecodable bytes replaced."""
    return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True, errors="replace").items()}


def _compile(path_pattern: str) -> re.Pattern:
    out = []
    for part in re.split(r"(:[A-Za-z_]\w*|\*)", path_pattern):
        if part == "*":
            out.append(r"(?P<splat>.*)")
        elif part.startswith(":"):
            out.append(rf"(?P<{part[1:]}>[^/]+)")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$", re.DOTALL)


@dataclass(frozen=True)
class Rules:
    redirects: tuple[Rule, ...]
    headers: tuple[tuple[re.Pattern, tuple[tuple[str, str], ...]], ...]

    def match(self, path: str, query: str) -> Match | None:
        """The first rule whose `from` and `query` conditions PATH?QUERY meets (no file checks).
        As on Netlify, whose CDN normalises the URL before rules apply, one trailing slash does
        not matter: "/a/" matches a rule for "/a"."""
        params = query_params(query)
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        for rule in self.redirects:
            values = rule.bind(path, params)
            if values is not None:
                return Match(rule, values)
        return None

    def decide(self, path: str, query: str, exists) -> Decision:
        """What a request for PATH (percent-decoded) ?QUERY (raw) gets; exists(site_path) says
        whether the site has a file there."""
        m = self.match(path, query)
        if m is None or (not m.rule.force and exists(path)):
            return Decision(200, file=path) if exists(path) else self.not_found(m.rule if m else None)
        bad = m.bad_integers()
        if m.rule.redirects:
            if bad:
                return Decision(400, rule=m.rule, reason=f"{', '.join(bad)} must be a whole number")
            return Decision(m.rule.status, location=m.target(), rule=m.rule)
        target = m.target()
        if bad or not exists(target):
            return self.not_found(m.rule)
        return Decision(m.rule.status, file=target, rule=m.rule)

    def not_found(self, rule: Rule | None = None) -> Decision:
        return Decision(404, file=NOT_FOUND_PAGE, rule=rule)

    def headers_for(self, path: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for pattern, values in self.headers:
            if pattern.match(path):
                out.extend(values)
        return out


def parse_rules(doc: dict, source: str = "netlify.toml") -> Rules:
    """Rules from a parsed netlify.toml document."""
    try:
        redirects = tuple(
            Rule(r["from"], r["to"], int(r.get("status", 301)), bool(r.get("force", False)),
                 tuple(sorted((r.get("query") or {}).items())), _compile(r["from"]))
            for r in doc.get("redirects", [])
        )
        headers = tuple((_compile(h["for"]), tuple(sorted(h.get("values", {}).items()))) for h in doc.get("headers", []))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BuildError(f"{source}: a [[redirects]] or [[headers]] table is malformed ({e!r}); each needs from/to (for)") from None
    return Rules(redirects, headers)


@lru_cache(maxsize=4)
def load_rules(path: Path | None = None) -> Rules:
    """The rules of `path`, by default the netlify.toml that ships with sitegen (the repository's own)."""
    path = path or resource("netlify.toml")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(f"{path}: cannot read the URL rules ({e}); restore netlify.toml") from None
    return parse_rules(doc, str(path))
