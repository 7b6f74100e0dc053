"""The whole output tree of a tiny synthetic store, compared byte for byte with tests/golden/.

Regenerate after an intended change to pages or JSON (then review the diff before committing):

    SITEGEN_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sitegen.site.build import build_site
from tests.reference import write_synthetic_store

GOLDEN = Path(__file__).parent / "golden"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_tree_matches_golden(tmp_path):
    store = write_synthetic_store(
        tmp_path / "store",
        name="golden-model",
        n_layers=2,
        n_neurons=2,
        n_seqs=6,
        seq_len=12,
        top_k=2,
        n_random=1,
        gated=True,
    )
    out = tmp_path / "site"
    build_site([store.root], out)
    if os.environ.get("SITEGEN_REGENERATE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        shutil.copytree(out, GOLDEN)
    got, want = _files(out), _files(GOLDEN)
    assert sorted(got) == sorted(want), "file list changed; regenerate the golden tree if intended"
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs from tests/golden/{rel}; regenerate if intended"
