"""The fast tier's import guard in a child Python process (tests/tiers.py puts this folder on the
child's PYTHONPATH): importing a heavy library fails and is written to the parent's log."""

import importlib.abc
import importlib.machinery
import os
import sys

_test, _, _log = os.environ.get("SITEGEN_TEST_TIER_GUARD", "").partition("\t")
# Heavy libraries and the marker a test that imports one needs (tests/tiers.py reads this too).
HEAVY_IMPORTS = {
    "torch": "model",
    "transformer_lens": "model",
    "transformers": "model",
    "numba": "model",
    "ray": "ray",
    "playwright": "browser",
    "llama_cpp": "llm",
}


class _Refused(importlib.abc.Loader):
    def __init__(self, message):
        self.message = message

    def create_module(self, spec):
        with open(_log, "a") as f:
            f.write(self.message + "\n")
        raise ImportError(self.message)

    def exec_module(self, module):
        raise ImportError(self.message)


class _Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        mark = HEAVY_IMPORTS.get(name.partition(".")[0])
        if mark is None:
            return None
        message = (
            f"{_test} runs a Python process that imports {name}, which the fast tier may not do: "
            f"mark it @pytest.mark.{mark} (see tests/README.md)"
        )
        return importlib.machinery.ModuleSpec(name, _Refused(message))


if _test and _log:
    sys.meta_path.insert(0, _Guard())
