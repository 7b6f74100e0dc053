"""`sitegen compute` on a CUDA GPU: the store equals the CPU one (within float noise: other
kernels), `sitegen verify` on the CPU accepts it, and the per-neuron stage runs there too.

These need a CUDA GPU, which CI machines do not have: they run on a machine with one (docs/guide.md,
"Compute on a GPU"; the figures are in benchmarks/README.md). Everything they exercise
besides the device (the same code paths on CPU) is tested in test_compute.py and test_verify.py."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from tests.conftest import HAS_TORCH

pytestmark = [pytest.mark.model, pytest.mark.gpu]


@pytest.fixture(autouse=True)
def _needs_cuda():
    # At setup, not at import: collecting the suite must not import torch (tests/tiers.py).
    if not (HAS_TORCH and __import__("torch").cuda.is_available()):
        pytest.skip("needs a CUDA GPU (none visible to torch here)")


def _compute(tiny_model_dir, tiny_corpus, out, device, *more):
    args = [
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--tokens",
        2000,
        "--seq-len",
        32,
        "--top-k",
        5,
        "--random",
        3,
        "--device",
        device,
        "--quiet",
        "--out",
        out,
        *more,
    ]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_a_store_computed_on_the_gpu_matches_the_cpu_one_and_verifies_on_the_cpu(tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.store import Store

    _compute(
        tiny_model_dir, tiny_corpus, tmp_path / "gpu", "cuda"
    )  # the weight tables too (they crashed on CUDA before)
    _compute(tiny_model_dir, tiny_corpus, tmp_path / "cpu", "cpu")
    gpu, cpu = Store.open(tmp_path / "gpu"), Store.open(tmp_path / "cpu")
    assert gpu.manifest["run_hash"] == cpu.manifest["run_hash"] and gpu.manifest["services"] == cpu.manifest["services"]
    for layer in range(cpu.manifest["model"]["num_layers"]):
        g, c = gpu.read_layer("neuroscope", layer).to_pydict(), cpu.read_layer("neuroscope", layer).to_pydict()
        assert g["count"] == c["count"]
        scale = np.maximum(np.maximum(np.abs(c["max"]), np.abs(c["min"])), 1e-9)
        for key in ("mean", "std", "min", "max"):
            assert np.max(np.abs(np.asarray(g[key]) - np.asarray(c[key])) / scale) < 1e-4, (layer, key)
        lg, lc = gpu.read_layer("logits", layer).to_pydict(), cpu.read_layer("logits", layer).to_pydict()
        for key in ("promoted_vals", "suppressed_vals", "input_vals"):
            assert np.allclose(np.asarray(lg[key]), np.asarray(lc[key]), rtol=1e-4, atol=1e-5), (layer, key)
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "gpu"), "--device", "cpu", "--neurons", "all"])
    assert res.exit_code == 0 and "OK:" in res.output, res.output


def test_graphs_are_computed_on_the_gpu(tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.store import Store

    _compute(tiny_model_dir, tiny_corpus, tmp_path / "gpu", "cuda", "--n2g", "2@0,2")
    store = Store.open(tmp_path / "gpu")
    assert "neuron2graph" in store.manifest["services"]
    assert sum(store.read_layer("neuron2graph", layer).num_rows for layer in (0, 2)) == 4


def test_the_accumulators_never_synchronise_the_device():
    """The torch path (the GPU's) updates every neuroscope accumulator on full batches without a
    host synchronisation: torch's sync debug mode turns any (a .item(), a nonzero, a boolean
    index, a data-dependent shape) into an error."""
    import torch

    from sitegen.services.neuroscope.compute import GluQuadrants, IntervalExamples, LayerAccumulator

    n, T, B, dev = 96, 16, 8, "cuda"
    acc, intervals = LayerAccumulator(n, T, 4, 3, 1, dev), IntervalExamples(n, T, dev)
    glu = GluQuadrants(n, T, 1, dev)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    valid[:, 0] = False
    gen = torch.Generator(device=dev).manual_seed(0)
    for i in range(4):
        acts, gate, up = (torch.randn(B, T, n, device=dev, generator=gen) * (1 + i) for _ in range(3))
        ids = torch.arange(B, device=dev) + B * i
        keys = -torch.rand(B, device=dev, generator=gen)
        torch.cuda.set_sync_debug_mode("error")
        try:
            seq_max = acc.update(acts, ids, valid, keys, all_full=True)
            intervals.update(seq_max, ids, keys.flip(0), acts)
            glu.update(acts, gate, up, ids, valid, all_full=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (acc.state()["top"]["seq_id"] >= 0).all() and acc.count == 4 * B * (T - 1)
