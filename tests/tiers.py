"""Test tiers, enforced (tests/README.md says which tier a new test belongs to).

A test's tier follows from what it uses, not from what its author remembered to write:
- a fixture in FIXTURE_MARKS (the tiny model, the LLM server, a browser, ...) adds its marker;
- a marker in MARK_IMPLIES adds the markers it implies (`real_model` -> `model`, `slow`; a browser,
  Ray, Deno, Netlify's CLI, the LLM server, a GPU, a wheel build -> `slow`).
What a test does without such a fixture is caught while it runs: a test left in the fast tier
(neither `model` nor `slow`) that imports torch or another heavy library, or starts a browser, Deno,
Netlify's CLI, the LLM server, pip or venv, fails with a message naming the marker to add. Child
Python processes get the same import guard (tests/tierguard/sitecustomize.py). The fast tier runs
first, before anything has imported torch, so the guard also holds in a full run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.tierguard.sitecustomize import HEAVY_IMPORTS

# Fixtures whose use puts a test in a tier.
FIXTURE_MARKS = {
    "tiny_model_dir": ("model",),
    "real_store": ("real_model",),
    "llama_server": ("llm",),
    "browser": ("browser",),
    "explained_site": ("browser",),
    "ray_cluster": ("ray",),
    "netlify_dev": ("netlify",),
    "wheel": ("wheel",),
}
# Markers that imply others (applied until nothing changes).
MARK_IMPLIES = {
    "real_model": ("model", "slow"),
    "browser": ("slow",),
    "ray": ("slow",),
    "llm": ("slow",),
    "deno": ("slow",),
    "netlify": ("slow",),
    "gpu": ("slow",),
    "wheel": ("slow",),
}
# Programs (by file name) and `python -m` modules a fast-tier test may not start.
HEAVY_PROGRAMS = {
    "chromium": "browser",
    "chromium-browser": "browser",
    "chrome": "browser",
    "deno": "deno",
    "netlify": "netlify",
    "node": "netlify",
    "npm": "netlify",
    "npx": "netlify",
    "ray": "ray",
    "nvidia-smi": "gpu",
}
HEAVY_MODULES = {"llama_cpp.server": "llm", "pip": "wheel", "venv": "wheel", "build": "wheel", "ensurepip": "wheel"}
GUARD_DIR = Path(__file__).resolve().parent / "tierguard"
GUARD_ENV = "SITEGEN_TEST_TIER_GUARD"  # names the test; read by tierguard/sitecustomize.py in child processes
TIERS = ("model", "slow")


def is_fast(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(m) for m in TIERS)


def _advice(test: str, what: str, mark: str) -> str:
    return f"{test} {what}, which the fast tier may not do: mark it @pytest.mark.{mark} (see tests/README.md)"


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        todo = [m for f in item.fixturenames for m in FIXTURE_MARKS.get(f, ())] + [
            m for n in marks for m in MARK_IMPLIES.get(n, ())
        ]
        while todo:
            name = todo.pop()
            if name not in marks:
                marks.add(name)
                item.add_marker(name)
                todo.extend(MARK_IMPLIES.get(name, ()))
    # Fast tier first (stable within a tier), so its import guard runs before any model test imports torch.
    items.sort(key=lambda it: 0 if is_fast(it) else 1 if not it.get_closest_marker("slow") else 2)


class _Refused(importlib.abc.Loader):
    """Loads nothing: importing a heavy module in the fast tier raises (and is recorded), while
    importlib.util.find_spec still answers that it is installed."""

    def __init__(self, message: str, found: list[str]):
        self.message, self.found = message, found

    def create_module(self, spec):
        self.found.append(self.message)
        raise ImportError(self.message)

    def exec_module(self, module):  # never reached: create_module raises
        raise ImportError(self.message)


class _ImportGuard(importlib.abc.MetaPathFinder):
    def __init__(self, test: str, found: list[str]):
        self.test, self.found = test, found

    def find_spec(self, name, path=None, target=None):
        mark = HEAVY_IMPORTS.get(name.partition(".")[0])
        if mark is None:
            return None
        return importlib.machinery.ModuleSpec(name, _Refused(_advice(self.test, f"imports {name}", mark), self.found))


def _program_mark(args) -> tuple[str, str] | None:
    """What a command line starts that the fast tier may not, and the marker that allows it."""
    if isinstance(args, (str, bytes)):
        args = shlex.split(os.fsdecode(args))
    argv = [os.fsdecode(a) for a in ([args] if isinstance(args, os.PathLike) else args)]
    if not argv:
        return None
    name = os.path.basename(argv[0])
    if name in HEAVY_PROGRAMS:
        return f"starts {name}", HEAVY_PROGRAMS[name]
    if name.startswith("python") and "-m" in argv[1:-1]:
        module = argv[argv.index("-m", 1) + 1]
        if module in HEAVY_MODULES:
            return f"runs python -m {module}", HEAVY_MODULES[module]
    return None


FOUND = pytest.StashKey[list]()
LOG = pytest.StashKey[Path]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not is_fast(item):
        return (yield)
    found = item.stash[FOUND] = []
    guard = _ImportGuard(item.nodeid, found)
    real_popen = subprocess.Popen
    log = item.config.stash[LOG]  # child processes append what they refused here

    class GuardedPopen(real_popen):
        def __init__(self, args, *a, **kw):
            hit = _program_mark(args)
            if hit:
                found.append(_advice(item.nodeid, *hit))
                raise PermissionError(found[-1])
            env = dict(os.environ if kw.get("env") is None else kw["env"])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD_DIR), env.get("PYTHONPATH")]))
            if (
                env.get(GUARD_ENV, "").partition("\t")[2] not in _ACTIVE_LOGS
            ):  # else a nested session's guard (tests/test_tiers.py)
                env[GUARD_ENV] = f"{item.nodeid}\t{log}"
            kw["env"] = env
            super().__init__(args, *a, **kw)

    log.write_text("")
    sys.meta_path.insert(0, guard)
    subprocess.Popen = GuardedPopen
    try:
        return (yield)
    finally:
        subprocess.Popen = real_popen
        sys.meta_path.remove(guard)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    found = item.stash.get(FOUND, None)
    if found is None:
        return report
    found.extend(line for line in item.config.stash[LOG].read_text().splitlines() if line)
    item.config.stash[LOG].write_text("")
    if found and not item.stash.get(REPORTED, False):
        # Fails the phase even where the test swallowed the refusal (an expected error, a skip).
        item.stash[REPORTED] = True
        report.outcome, report.longrepr = "failed", "\n".join(dict.fromkeys(found))
    return report


REPORTED = pytest.StashKey[bool]()
COLLECTION_IMPORTS = pytest.StashKey[dict]()  # heavy module -> the test file whose collection imported it


WATCHED_AT_COLLECTION = tuple(HEAVY_IMPORTS)


def _heavy_loaded() -> set[str]:
    return {name for name in WATCHED_AT_COLLECTION if name in sys.modules}


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    before = _heavy_loaded()
    report = yield
    if isinstance(collector, pytest.Module):
        found = collector.config.stash.setdefault(COLLECTION_IMPORTS, {})
        for name in sorted(_heavy_loaded() - before):
            found.setdefault(name, collector.nodeid)
    return report


def pytest_collection_finish(session):
    """A test file that imports a heavy library at its top level (or while pytest inspects its
    names) loads it before the fast tier runs, and the import guard can no longer see a fast test
    use it: refuse the run, naming the file."""
    found = session.config.stash.get(COLLECTION_IMPORTS, {})
    if found and any(is_fast(item) for item in session.items):
        name, where = next(iter(sorted(found.items())))
        raise pytest.UsageError(
            f"collecting {where} imported {name}, so the fast tier's import guard cannot hold: "
            "import it inside the tests or fixtures that use it (tests/README.md)"
        )


_ACTIVE_LOGS: set[str] = set()  # the guard logs of the sessions running in this process


def pytest_sessionstart(session):
    fd, name = tempfile.mkstemp(prefix="sitegen-tier-guard-")
    os.close(fd)
    session.config.stash[LOG] = Path(name)
    _ACTIVE_LOGS.add(name)


def pytest_sessionfinish(session):
    _ACTIVE_LOGS.discard(str(session.config.stash[LOG]))
    session.config.stash[LOG].unlink(missing_ok=True)
