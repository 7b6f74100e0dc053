"""The docs keep up with the code (Datasette's test_docs.py habit): every Service hook is in the
contributing guide's hook table and every hook the table names exists; every command and option
of `sitegen` (the built-in services' included) is in the reference, under its command; README.md
stays short; every relative link in the Markdown docs points to a file (and heading) that exists.
Each check is also run on a broken sample, so it is known to fail when the docs drift."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click
import pytest

from sitegen.cli import main
from sitegen.services import registry
from sitegen.services.base import Service

ROOT = Path(__file__).parents[1]
CONTRIBUTING = ROOT / "docs" / "contributing.md"
REFERENCE = ROOT / "docs" / "reference.md"
README_MAX_LINES = 220
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


# ---- helpers -----------------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.split("\n")
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if (m := re.match(r"(#+) ", lines[i])) and len(m.group(1)) <= level),
        len(lines),
    )
    return "\n".join(lines[start:end])


def _documented_hooks(text: str) -> set[str]:
    """The hook names of the first column of the "Service hooks" table."""
    table = _section(text, "### Service hooks")
    return {m.group(1) for m in re.finditer(r"^\| `([A-Za-z_][A-Za-z0-9_]*)[^`]*` \|", table, re.M)}


def _service_hooks() -> set[str]:
    return {name for name in [*vars(Service), *Service.__annotations__] if not name.startswith("_")}


def _builtin(service) -> bool:
    return type(service).__module__.startswith(
        "sitegen."
    )  # a plugin installed beside sitegen is documented by its own package


def _commands() -> dict[str, click.Command]:
    """sitegen's commands and those the built-in services add."""
    commands = dict(main.commands)
    for service in registry():
        if _builtin(service):
            commands.update({c.name: c for c in service.cli_commands()})
    return commands


def _options(command: click.Command) -> list[str]:
    own = [p for p in command.params if isinstance(p, click.Option)]
    if command.name == "compute":  # the options services add (the built-ins': --n2g)
        own += [o for s in registry() if _builtin(s) for o in s.compute_options()]
    return [flag for p in own for flag in (*p.opts, *p.secondary_opts)]


def _missing_options(reference: str, commands: dict[str, click.Command]) -> list[str]:
    """`sitegen CMD` or `sitegen CMD --flag` for each command without a section, or option not named in its section."""
    missing = []
    for name, command in sorted(commands.items()):
        heading = f"### `sitegen {name}`"
        if heading not in reference.split("\n"):
            missing.append(f"sitegen {name}")
            continue
        section = _section(reference, heading)
        missing += [
            f"sitegen {name} {flag}"
            for flag in _options(command)
            if not re.search("`" + re.escape(flag) + r"[` \[,]", section)
        ]
    return missing


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for line in _prose(text).split("\n"):
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            yield slug if n == 0 else f"{slug}-{n}"


def _prose(text: str) -> str:
    """The text without fenced code blocks (a `# comment` in a shell block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _broken_links(path: Path, text: str) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if file and not dest.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in set(_anchors(dest.read_text() if file else text)):
            broken.append(f"{path.name}: {target} (no such heading in {dest.name})")
    return broken


# ---- the checks ----------------------------------------------------------------------------------


def test_every_service_hook_is_in_the_contributing_guide_and_every_hook_it_names_exists():
    documented, hooks = _documented_hooks(CONTRIBUTING.read_text()), _service_hooks()
    assert hooks - documented == set(), (
        f"Service hooks missing from docs/contributing.md's table: {sorted(hooks - documented)}"
    )
    assert documented - hooks == set(), (
        f"docs/contributing.md names hooks Service does not have: {sorted(documented - hooks)}"
    )


def test_every_command_and_option_is_in_the_reference():
    commands = _commands()
    assert {"compute", "merge", "build", "serve", "verify", "explain", "import-explanations"} <= set(commands)
    assert "--n2g" in _options(commands["compute"])  # a service's compute option is walked too
    assert _missing_options(REFERENCE.read_text(), commands) == []
    reference = REFERENCE.read_text()
    assert all(
        f"`{flag}" in reference or f" {flag}`" in reference
        for p in main.params
        for flag in getattr(p, "opts", ())
        if flag != "--help"
    )


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(path):
    assert path.exists()
    assert _broken_links(path, path.read_text()) == []


# ---- each check fails on docs that drifted -------------------------------------------------------


def test_the_checks_catch_drift(tmp_path):
    text = CONTRIBUTING.read_text()
    dropped = text.replace("| `layer_facts(view, neuron, payload)` |", "| layer facts |")
    assert "layer_facts" in _service_hooks() - _documented_hooks(dropped)
    invented = text.replace("| `title` |", "| `no_such_hook()` | x |\n| `title` |")
    assert "no_such_hook" in _documented_hooks(invented) - _service_hooks()

    reference = REFERENCE.read_text()
    assert _missing_options(reference.replace("`--n2g`", "`--graphs`"), _commands()) == ["sitegen compute --n2g"]
    assert _missing_options(reference.replace("### `sitegen serve`", "### Serving"), _commands()) == ["sitegen serve"]

    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# Title\n\n## A `code` heading; here\n\n```sh\n# not a heading\n```\n")
    assert (
        _broken_links(page, "[a](there.md#a-code-heading-here) [b](https://example.org/x) [c](#local)\n\n# Local\n")
        == []
    )
    assert _broken_links(page, "[a](missing.md) [b](there.md#not-a-heading) [c](#nowhere)\n") == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#not-a-heading (no such heading in there.md)",
        "page.md: #nowhere (no such heading in page.md)",
    ]
