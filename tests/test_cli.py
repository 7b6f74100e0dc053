"""Bad input: one line naming the option or file and the fix, a non-zero exit, no traceback, and
nothing already computed lost."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tests.conftest import HAS_TORCH


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sitegen", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def _one_line_error(res, *needles):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--tokens", "0"], ["--tokens 0", "positive"]),
        (["--seq-len", "500"], ["--seq-len 500"]),
        (["--shard", "3/2"], ["--shard 3/2"]),
        (["--shard", "x"], ["--shard x", "I/N"]),
        pytest.param(
            ["--corpus", "/no/such/corpus.txt"],
            ["--corpus /no/such/corpus.txt", "no such file"],
            marks=pytest.mark.model,
        ),  # checked after torch loads
        pytest.param(
            ["--model", "./no-such-model"], ["--model ./no-such-model", "no such file"], marks=pytest.mark.model
        ),
    ],
)
def test_compute_rejects_bad_options(tmp_path, args, needles):
    res = _run("compute", "--out", str(tmp_path / "store"), *args)
    _one_line_error(res, *needles)
    assert not (tmp_path / "store").exists()


@pytest.mark.model  # compute imports torch before it reads the corpus
def test_empty_and_malformed_corpora(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_run("compute", "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "s")), "holds no .txt")
    (tmp_path / "blank.txt").write_text("   \n")
    _one_line_error(
        _run("compute", "--corpus", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "s")), "no text found"
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    _one_line_error(
        _run("compute", "--corpus", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "s")),
        "bad.jsonl:2",
        "not valid JSON",
    )
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    _one_line_error(
        _run("compute", "--corpus", str(tmp_path / "notext.jsonl"), "--out", str(tmp_path / "s")), '"text" field'
    )


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_unreachable_hub_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text here " * 50)
    res = _run(
        "compute",
        "--model",
        "some-org/some-model",
        "--corpus",
        str(tmp_path / "a.txt"),
        "--out",
        str(tmp_path / "s"),
        env={"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"},
    )
    _one_line_error(res, "--model some-org/some-model", "hub is unreachable", "local folder")


def test_compute_refuses_a_store_of_another_model(synthetic_store):
    before = (synthetic_store.root / "manifest.json").read_bytes()
    _one_line_error(_run("compute", "--out", str(synthetic_store.root)), "already holds a store", "toy-model")
    assert (synthetic_store.root / "manifest.json").read_bytes() == before


def test_merge_and_serve_errors(tmp_path, synthetic_store):
    _one_line_error(_run("merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m")), "not a sitegen store")
    _one_line_error(_run("merge", str(synthetic_store.root), "--out", str(tmp_path / "m")), "whole store, not a shard")
    _one_line_error(_run("serve", str(tmp_path)), "no index.html", "sitegen build")


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_full_disk_keeps_the_work(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """A full disk while writing the store: a StoreError naming the file, the checkpoint kept, and
    the rerun finishes from it without recomputing."""
    import pyarrow.parquet as pq

    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.errors import StoreError

    cfg = ComputeConfig(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=tmp_path / "store",
        tokens=600,
        seq_len=16,
        batch_size=4,
        device="cpu",
        progress=False,
    )
    real_write = pq.write_table

    def full_disk(table, where, **kw):
        if "layer=" in str(where):  # the store's per-layer tables
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(StoreError, match="disk full while writing .*data.parquet; free space and rerun"):
        run_compute(cfg, log=lambda m: None)
    assert (tmp_path / "store" / ".work" / "checkpoint-0of1.npz").exists()
    assert not (tmp_path / "store" / "manifest.json").exists()
    monkeypatch.setattr(pq, "write_table", real_write)
    messages = []
    run_compute(cfg, log=messages.append)
    assert any("resuming" in m and "already done" in m for m in messages)
    assert (tmp_path / "store" / "manifest.json").exists()
