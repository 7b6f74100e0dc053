"""URL rules and headers, read from netlify.toml (the single source of truth) and applied with
Netlify's documented semantics, so `sitegen serve` and the CDN answer alike:

- The rules of the publish folder's `_redirects` file (the build writes one per site: the
  per-model chooser rules) come first, then netlify.toml's [[redirects]]; they are read in order
  until one matches (its `from` path, with :placeholders and a trailing * splat, and every
  parameter its `query` names); then processing stops. A rule that does not match the path as
  asked is tried on it without one trailing slash ("/api/" matches "/api"; a splat keeps the slash).
- A redirect passes the request's query parameters on to its Location when `to` has none.
- Headers: a [[headers]] `for` pattern matches as Netlify's header parser compiles it: whole
  path, case-insensitive, an optional trailing slash, and a standalone `*` segment also matches
  nothing (so "/api/*" covers "/api" and "/api.html").
- Shadowing: if that rule is not `force = true` and a file exists at the requested path, the file
  is served. A path no rule matches is served if it is a file, else the 404 page.
- A rule's status: 301/302/303/307/308 redirect to `to`; any other status (200 = rewrite, 404, ...)
  serves the file at `to` with that status. The rewrite happens once: `to` is looked up as a
  file, never fed back into the rules, and a missing `to` answers the 404 page with status 404
  (no fall-through to the next rule).
- Every [[headers]] block whose `for` pattern matches the requested path adds its values.
- Paths reach the rules as Netlify's CDN passes them: "." and ".." segments (also written %2e)
  removed (`remove_dot_segments`), then percent-decoded.

Two guards (docs/reference.md, "Differences from Netlify's own server", lists the differences kept):
- Placeholders named in INTEGER_PLACEHOLDERS (:layer, :neuron) stand for whole numbers. A
  redirect whose value is not one answers 400 (Netlify redirects to a page that answers 404); a
  rewrite answers the 404 page (no such file can exist, which is what Netlify answers too).
- Placeholder values are percent-encoded before they reach a Location, and a Location never
  starts with `//`, so no request can inject a header or redirect off-site.

`Rules.match(path, query)` is the pure rule lookup (no files); `Rules.decide(path, query, exists)`
adds shadowing and missing targets and returns the `Decision` a server acts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, quote, quote_plus, urlencode

import tomllib

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


def _passed_query(rule: Rule, query: str) -> str:
    """What Netlify appends to a redirect's Location: the request's query parameters, serialised
    as URLSearchParams does (form encoding; letters, digits and *-._ kept), when `to` has none."""
    pairs = parse_qsl(query, keep_blank_values=True, errors="replace")
    if "?" in rule.to or not pairs:
        return ""
    form = lambda text, safe, encoding, errors: quote_plus(text, safe="*").replace("~", "%7E")
    return "?" + urlencode(pairs, quote_via=form)


_DOT = frozenset({".", "%2e"})
_DOTDOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


def remove_dot_segments(raw_path: str) -> str:
    """RAW_PATH (still percent-encoded) with "." and ".." segments resolved as a WHATWG URL parser
    does (Netlify's CDN, a browser): "%2e" counts as a dot, ".." never climbs above the root, and a
    path ending in such a segment keeps its trailing slash. "%2F" is not a separator here."""
    out: list[str] = []
    segments = raw_path.split("/")[1:] if raw_path.startswith("/") else raw_path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        low = seg.lower()
        if low in _DOTDOT:
            if out:
                out.pop()
            if last:
                out.append("")
        elif low in _DOT:
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


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


def _compile_for(for_path: str) -> re.Pattern:
    """A [[headers]] `for` pattern as Netlify's header parser (@netlify/headers-parser) compiles
    it: segments joined by "/", `:name` one segment, a standalone `*` segment "?(.*)" (so "/api/*"
    also matches "/api" and "/api.html"), `*` inside a segment any text; whole path,
    case-insensitive, one optional trailing slash."""
    parts = []
    for part in (p.rstrip() for p in for_path.split("/")):
        if not part:
            continue
        if part.startswith(":"):
            parts.append("([^/]+)")
        elif part == "*":
            parts.append("?(.*)")
        else:
            parts.append("(.*)".join(re.escape(x) for x in part.split("*")))
    return re.compile("^/" + "/".join(parts) + "/?$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Rules:
    redirects: tuple[Rule, ...]
    headers: tuple[tuple[re.Pattern, tuple[tuple[str, str], ...]], ...]

    def match(self, path: str, query: str) -> Match | None:
        """The first rule whose `from` and `query` conditions PATH?QUERY meets (no file checks).
        As on Netlify, one trailing slash does not matter to a rule that does not match the path
        as asked: "/a/" matches a rule for "/a", while "/api/*" binds "/api/x/" with splat "x/"."""
        params = query_params(query)
        stripped = path[:-1] if len(path) > 1 and path.endswith("/") else None
        for rule in self.redirects:
            values = rule.bind(path, params)
            if values is None and stripped is not None:
                values = rule.bind(stripped, params)
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
            return Decision(m.rule.status, location=m.target() + _passed_query(m.rule, query), rule=m.rule)
        target = m.target()
        if bad or not exists(target):
            return self.not_found(m.rule)
        return Decision(m.rule.status, file=target, rule=m.rule)

    def not_found(self, rule: Rule | None = None) -> Decision:
        return Decision(404, file=NOT_FOUND_PAGE, rule=rule)

    def headers_for(self, path: str) -> list[tuple[str, str]]:
        """The values of every [[headers]] block matching PATH; a later block's value replaces an
        earlier one of the same name (as Netlify merges them)."""
        out: dict[str, tuple[str, str]] = {}
        for pattern, values in self.headers:
            if pattern.match(path):
                out.update((name.lower(), (name, value)) for name, value in values)
        return list(out.values())


def parse_rules(doc: dict, source: str = "netlify.toml") -> Rules:
    """Rules from a parsed netlify.toml document."""
    try:
        redirects = tuple(
            Rule(
                r["from"],
                r["to"],
                int(r.get("status", 301)),
                bool(r.get("force", False)),
                tuple(sorted((r.get("query") or {}).items())),
                _compile(r["from"]),
            )
            for r in doc.get("redirects", [])
        )
        headers = tuple(
            (_compile_for(h["for"]), tuple(sorted(h.get("values", {}).items()))) for h in doc.get("headers", [])
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BuildError(
            f"{source}: a [[redirects]] or [[headers]] table is malformed ({e!r}); each needs from/to (for)"
        ) from None
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


# ---- the publish folder's `_redirects` ------------------------------------------------------
# Netlify reads `_redirects` in the publish folder before netlify.toml's rules. The build writes
# one there with a chooser rule per model: a rule whose `to` starts with a :placeholder lets the
# request choose the Location's leading path ("/%5C%5Cevil.com/go" -> "//evil.com/..." on
# Netlify), so each rule names its model literally and a Location always starts "/<model>/".
REDIRECTS_FILE = "_redirects"
_REDIRECTS_HEADER = (
    "# Written by `sitegen build` (Netlify reads this file before netlify.toml's rules): the model\n"
    "# page's layer/neuron chooser, one rule per model, so the redirect's path is never a request's.\n"
)


def chooser_redirects(model_names: list[str]) -> str:
    """The `_redirects` text for MODEL_NAMES (sorted: the same site gives the same bytes)."""
    return _REDIRECTS_HEADER + "".join(
        f"/{name}/go  layer=:layer  neuron=:neuron  /{name}/:layer/:neuron.html  302\n" for name in sorted(model_names)
    )


def parse_redirects_file(text: str, source: str = REDIRECTS_FILE) -> tuple[Rule, ...]:
    """Rules from Netlify's `_redirects` syntax: `from [name=:value ...] to [status[!]]` per line,
    `#` comments. (Netlify's other forms, country/role conditions and proxies, are refused.)"""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        status, force = 301, False
        if len(fields) >= 3 and re.fullmatch(r"[0-9]{3}!?", fields[-1]):
            status, force = int(fields[-1].rstrip("!")), fields[-1].endswith("!")
            fields = fields[:-1]
        conditions = fields[1:-1]
        if (
            len(fields) < 2
            or not fields[0].startswith("/")
            or not all(re.fullmatch(r"[^=\s]+=:[A-Za-z_]\w*", c) for c in conditions)
        ):
            raise BuildError(
                f"{source}, line {number}: not a rule sitegen understands ({line.strip()!r}); "
                f"write `/from [name=:value ...] /to [status]`, or rebuild the site"
            )
        query = tuple(sorted(tuple(c.split("=", 1)) for c in conditions))
        rules.append(Rule(fields[0], fields[-1], status, force, query, _compile(fields[0])))
    return tuple(rules)


def site_rules(root: Path) -> Rules:
    """The rules a site at ROOT is served with: its `_redirects` (if any), then netlify.toml's."""
    base = load_rules()
    file = Path(root) / REDIRECTS_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return base
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{file}: cannot read the site's redirect rules ({e}); rebuild the site") from None
    return Rules(parse_redirects_file(text, str(file)) + base.redirects, base.headers)
