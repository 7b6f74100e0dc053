"""`sitegen compute --ray` on a local two-worker Ray cluster and the tiny random-init model: the
store equals a single process's file for file, a worker that dies mid-shard is retried from its
checkpoint, and a failed run resumes when rerun. Runs whenever ray is installed (the test extra)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import HAS_TORCH

HAS_RAY = importlib.util.find_spec("ray") is not None


class DieAfterCheckpoint:
    """run_compute's on_checkpoint seam: shard `shard`'s worker process exits right after its first
    checkpoint, as a killed or preempted worker would; a marker beside the checkpoint makes only the
    first attempt die."""

    def __init__(self, shard: int):
        self.shard = shard

    def __call__(self, checkpoint: Path) -> None:
        marker = checkpoint.parent / "died-once"
        if checkpoint.name.startswith(f"checkpoint-{self.shard}of") and not marker.exists():
            marker.touch()
            os._exit(1)


def _dying(shard: int) -> DieAfterCheckpoint:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this test module
    return DieAfterCheckpoint(shard)


def needs_ray(test):
    for mark in (
        pytest.mark.model,
        pytest.mark.ray,
        pytest.mark.skipif(not (HAS_TORCH and HAS_RAY), reason="needs the compute and ray extras"),
    ):
        test = mark(test)
    return test


SEQ_LEN, TOKENS, BATCH, TOP_K, N_RANDOM, SEED = 16, 600, 4, 5, 3, 3
# Manifest fields allowed to differ from a single run's: none today (a --ray store records what a
# single run started in the same folder records). Fields that name the machine or the time of a run
# would belong here.
MANIFEST_FIELDS_THAT_DIFFER: set[str] = set()


def _config(model_dir, corpus, out, **kw):
    from sitegen.compute.runner import ComputeConfig

    base = dict(
        model=str(model_dir),
        corpus=str(corpus),
        out=out,
        tokens=TOKENS,
        seq_len=SEQ_LEN,
        seed=SEED,
        top_k=TOP_K,
        n_random=N_RANDOM,
        batch_size=BATCH,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return ComputeConfig(**base)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_identical(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "manifest.json":
            ma, mb = orjson.loads(fa[name]), orjson.loads(fb[name])
            assert {k: v for k, v in ma.items() if k not in MANIFEST_FIELDS_THAT_DIFFER} == {
                k: v for k, v in mb.items() if k not in MANIFEST_FIELDS_THAT_DIFFER
            }
        else:
            assert fa[name] == fb[name], f"{name} differs"


def test_ray_option_without_ray_names_the_extra(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from sitegen.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    res = CliRunner().invoke(main, ["compute", "--out", str(tmp_path / "s"), "--ray", "--tokens", "100"])
    assert res.exit_code != 0
    assert res.output.strip() == "error: --ray needs Ray, which is not installed: pip install 'sitegen[ray]'"
    assert not (tmp_path / "s").exists()


# Before the tests that start a cluster: with Ray already running, --ray uses that cluster.
@pytest.mark.ray
@pytest.mark.skipif(not HAS_RAY, reason="needs the ray extra")
def test_ray_address_nobody_answers_is_one_line(tmp_path):
    from click.testing import CliRunner

    from sitegen.cli import main
    from tests.conftest import free_port

    res = CliRunner().invoke(main, ["compute", "--out", str(tmp_path / "s"), "--ray", f"127.0.0.1:{free_port()}"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --ray 127.0.0.1:") and "nothing answers there" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """The reference: one process, no Ray (torch's own thread count; the Ray tasks use one thread
    each), with and without graphs."""
    from sitegen.compute.runner import run_compute

    root = tmp_path_factory.mktemp("single")
    run_compute(_config(tiny_model_dir, tiny_corpus, root / "plain"), log=lambda m: None)
    run_compute(_config(tiny_model_dir, tiny_corpus, root / "n2g", options={"n2g": "2"}), log=lambda m: None)
    from sitegen.dictionaries.format import random_dictionary, save_dictionary

    save_dictionary(random_dictionary("topk", 32, 40, "blocks.1.hook_resid_post", k=4, name="sae"), root / "sae")
    sae = {"options": {"n2g": "2"}, "dictionaries": (str(root / "sae"),)}
    run_compute(_config(tiny_model_dir, tiny_corpus, root / "n2g+sae", **sae), log=lambda m: None)
    return root


def _ray_opts(**kw):
    from sitegen.compute.distributed import RayOptions

    return RayOptions(**{"shards": 2, "cpus_per_shard": 1, "report_seconds": 1.0, **kw})


@needs_ray
@pytest.mark.parametrize("n2g", ["0", "2", "2+sae"])
@pytest.mark.usefixtures("ray_cluster")
def test_ray_store_equals_single_process(single, tiny_model_dir, tiny_corpus, tmp_path, n2g):
    """Two shard tasks merged into --out (and, with --n2g, one graph task per layer) give the bytes
    of a single run; with a dictionary (--sae), its store of latents and their graphs too."""
    from sitegen.compute.distributed import run_compute_ray

    out = tmp_path / "store"
    logs: list[str] = []
    extra = {"dictionaries": (str(single / "sae"),)} if n2g.endswith("+sae") else {}
    cfg = _config(tiny_model_dir, tiny_corpus, out, options={"n2g": n2g.removesuffix("+sae")}, **extra)
    run_compute_ray(cfg, _ray_opts(), log=logs.append)
    _assert_identical(out, single / {"0": "plain", "2": "n2g", "2+sae": "n2g+sae"}[n2g])
    assert any(line.startswith("ray summary: 2 shards") for line in logs), logs
    if n2g != "0":
        assert any("3 layer task(s)" in line for line in logs), logs
    if extra:  # the latents' graphs: one more layer task
        assert any("1 layer task(s)" in line for line in logs), logs
        assert (out / "dictionaries" / "sae" / "neuron2graph" / "layer=0" / "data.parquet").exists()


@needs_ray
@pytest.mark.usefixtures("ray_cluster")
def test_worker_killed_mid_shard_is_retried_from_its_checkpoint(single, tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.distributed import run_compute_ray

    out = tmp_path / "store"
    logs: list[str] = []
    cfg = _config(tiny_model_dir, tiny_corpus, out, checkpoint_seconds=0)  # a checkpoint after every batch
    run_compute_ray(cfg, _ray_opts(), log=logs.append, on_checkpoint=_dying(1))
    _assert_identical(out, single / "plain")
    shard1 = next(line for line in logs if line.strip().startswith("shard 1:"))
    assert "2 attempt(s), resumed at" in shard1, logs  # the retry started from the dead attempt's checkpoint
    assert not (out / ".work").exists()


@needs_ray
@pytest.mark.usefixtures("ray_cluster")
def test_failed_run_resumes_when_rerun(single, tiny_model_dir, tiny_corpus, tmp_path):
    """No retries left: the command fails with one line and keeps the dead shard's checkpoint; the same
    command run again (here on a cluster that would now pick one shard) keeps the recorded two shards
    and finishes from there."""
    from sitegen.compute.distributed import run_compute_ray
    from sitegen.errors import StoreError

    out = tmp_path / "store"
    cfg = _config(tiny_model_dir, tiny_corpus, out, checkpoint_seconds=0)
    with pytest.raises(StoreError, match="rerun the same command"):
        run_compute_ray(cfg, _ray_opts(max_retries=0), log=lambda m: None, on_checkpoint=_dying(0))
    assert not (out / "manifest.json").exists()
    assert list((out / ".work" / "ray").glob("shard-0of2/.work/checkpoint-*.npz"))
    logs: list[str] = []
    run_compute_ray(
        cfg, _ray_opts(shards=None, cpus_per_shard=2), log=logs.append
    )  # alone, 2 CPUs per shard would mean 1 shard
    _assert_identical(out, single / "plain")
    assert "ray: 2 shard task(s), each 2 CPU(s)" in logs, logs
    assert any("shard 0:" in line and "resumed at" in line for line in logs), logs
