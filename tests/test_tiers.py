"""The test tiers are enforced (tests/tiers.py): a test's fixtures and markers put it in its tier,
and a test left in the fast tier that imports a heavy library or starts a heavy program, itself
or in a child Python, fails with a message naming the marker to add."""

from __future__ import annotations

import pytest

CONFTEST = """
import pytest

def pytest_configure(config):
    for name in ("model", "slow", "real_model", "deno", "llm", "wheel"):
        config.addinivalue_line("markers", name)
from tests.tiers import (pytest_collection_finish, pytest_collection_modifyitems, pytest_make_collect_report,
                         pytest_runtest_makereport, pytest_runtest_protocol, pytest_sessionfinish, pytest_sessionstart)

@pytest.fixture
def tiny_model_dir():
    return "model"

@pytest.fixture
def llama_server():
    return "http://127.0.0.1:1/v1"
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\naddopts = -p no:xdist -p no:benchmark\n"
    )  # plain sessions: no parallel workers, no timings
    return pytester


def test_fixtures_and_markers_put_a_test_in_its_tier_and_the_fast_tier_runs_first(inner):
    inner.makepyfile(
        test_x="""
        import pytest

        @pytest.mark.deno
        def test_deno(): pass

        def test_model(tiny_model_dir): pass

        def test_llm(llama_server): pass

        @pytest.mark.real_model
        def test_real(): pass

        def test_fast(): pass
    """
    )
    fast = inner.runpytest("-m", "not slow and not model", "--collect-only", "-q")
    assert [line for line in fast.outlines if "::" in line] == ["test_x.py::test_fast"]
    model_only = inner.runpytest("-m", "model and not slow", "--collect-only", "-q")
    assert [line for line in model_only.outlines if "::" in line] == ["test_x.py::test_model"]
    slow = inner.runpytest("-m", "slow", "--collect-only", "-q")
    assert [line for line in slow.outlines if "::" in line] == [
        "test_x.py::test_deno",
        "test_x.py::test_llm",
        "test_x.py::test_real",
    ]
    everything = inner.runpytest("--collect-only", "-q")  # fast first, then model, then slow, each in file order
    assert [line for line in everything.outlines if "::" in line] == [
        "test_x.py::test_fast",
        "test_x.py::test_model",
        "test_x.py::test_deno",
        "test_x.py::test_llm",
        "test_x.py::test_real",
    ]


def test_a_fast_test_that_imports_torch_fails_even_when_it_swallows_the_error(inner):
    inner.makepyfile(
        test_x="""
        import pytest

        def test_sneaky():
            try:
                import torch  # noqa: F401
            except ImportError:
                pytest.skip("no torch")
    """
    )
    res = inner.runpytest("-q")
    res.assert_outcomes(failed=1)
    assert (
        "test_x.py::test_sneaky imports torch, which the fast tier may not do: mark it @pytest.mark.model"
        in res.stdout.str()
    )


def test_a_test_file_that_imports_a_heavy_library_while_collected_stops_the_run(inner, monkeypatch):
    # A stand-in heavy module, so the outer session's own modules stay as they are.
    import tests.tiers

    monkeypatch.setattr(tests.tiers, "WATCHED_AT_COLLECTION", ("heavy_stand_in",))
    inner.makepyfile(heavy_stand_in="VALUE = 1\n")
    inner.makepyfile(
        test_top="""
        import heavy_stand_in

        def test_uses_it():
            assert heavy_stand_in.VALUE == 1
    """,
        test_other="""
        def test_plain():
            pass
    """,
    )
    inner.syspathinsert()
    res = inner.runpytest("-q")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "collecting test_top.py imported heavy_stand_in, so the fast tier's import guard cannot hold" in (
        res.stderr.str()
    )
    marked = inner.runpytest("-q", "-m", "model")  # no fast test selected: nothing for the guard to protect
    assert marked.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_a_fast_test_that_starts_deno_or_pip_fails(inner):
    inner.makepyfile(
        test_x="""
        import subprocess, sys

        def test_deno():
            try:
                subprocess.run(["deno", "--version"])
            except OSError:
                pass

        def test_wheel():
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "."])
    """
    )
    res = inner.runpytest("-q")
    res.assert_outcomes(failed=2)
    out = res.stdout.str()
    assert "test_x.py::test_deno starts deno, which the fast tier may not do: mark it @pytest.mark.deno" in out
    assert "test_x.py::test_wheel runs python -m pip, which the fast tier may not do: mark it @pytest.mark.wheel" in out


def test_a_child_python_that_imports_torch_fails_the_fast_test(inner):
    # (That marked tests run unguarded is what every model test, importing torch, shows.)
    inner.makepyfile(
        test_x="""
        import os, subprocess, sys

        def test_child():
            res = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env={**os.environ, "X": "1"})
            assert res.returncode != 0  # the test expected a failure: the guard still fails it
    """
    )
    res = inner.runpytest("-q")
    res.assert_outcomes(failed=1)
    assert (
        "test_x.py::test_child runs a Python process that imports torch, which the fast tier may not do: mark it @pytest.mark.model"
        in res.stdout.str()
    )
