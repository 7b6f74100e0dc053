"""Sparse dictionaries: SAELens's folder format (round trips, an independent numpy encode, the
one-line refusals), the TopK trainer (a planted dictionary recovered, its figures, resume) and
`sitegen train-sae` on the tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as load_numpy

from sitegen.cli import main
from sitegen.errors import ConfigError


class _Lazy:
    """A name imported on first use, so collecting this file imports no torch (the fast tier's
    import guard, tests/tiers.py, holds only while no collected module has imported it)."""

    def __init__(self, module: str, name: str | None = None):
        self._module, self._name = module, name

    def _get(self):
        import importlib

        module = importlib.import_module(self._module)
        return getattr(module, self._name) if self._name else module

    def __getattr__(self, attr):
        if attr.startswith("_"):  # pytest's collection probes names such as `_pytestfixturefunction`
            raise AttributeError(attr)
        return getattr(self._get(), attr)

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)


torch = _Lazy("torch")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # format.py's names for SAELens's files
check_fits, load_dictionary, random_dictionary, save_dictionary = (
    _Lazy("sitegen.dictionaries.format", n)
    for n in ("check_fits", "load_dictionary", "random_dictionary", "save_dictionary")
)
TrainOptions, evaluate, result_dictionary, train_topk = (
    _Lazy("sitegen.dictionaries.train", n) for n in ("TrainOptions", "evaluate", "result_dictionary", "train_topk")
)

pytestmark = pytest.mark.model  # imports torch

HOOK = "blocks.1.hook_resid_post"
CASES = {
    "standard": dict(architecture="standard"),
    "topk": dict(architecture="topk", k=5),
    "jumprelu": dict(architecture="jumprelu"),
    "skip_transcoder": dict(architecture="standard", hook_out="blocks.1.hook_mlp_out", d_out=12, skip=True),
    "constant_norm_rescale": dict(architecture="topk", k=3, normalize_activations="constant_norm_rescale"),
}


def numpy_encode(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's encode and decode written from the files alone: (latents, reconstruction)."""
    cfg = json.loads((folder / CFG_FILE).read_text())
    w = {k: v.astype(np.float64) for k, v in load_numpy(str(folder / WEIGHTS_FILE)).items()}
    x = x.astype(np.float64)
    coeff = np.ones((len(x), 1))
    if cfg["normalize_activations"] == "constant_norm_rescale":
        coeff = math.sqrt(cfg["d_in"]) / np.linalg.norm(x, axis=-1, keepdims=True)
    sae_in = x * coeff - (w["b_dec"] if cfg["apply_b_dec_to_input"] else 0)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "topk":
        z = np.zeros_like(pre)
        top = np.argsort(-pre, axis=-1)[:, : cfg["k"]]
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    elif arch.startswith("jumprelu"):
        z = np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    else:
        z = np.maximum(pre, 0)
    out = (z @ w["W_dec"] + w["b_dec"]) / coeff
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return z, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_and_numpy_encode(tmp_path, case):
    d = random_dictionary(d_in=10, d_sae=40, hook_name=HOOK, seed=3, **CASES[case])
    if d.threshold is not None:  # negative thresholds too: SAELens's JumpReLU is relu(pre) where pre > threshold
        d = replace(d, threshold=torch.linspace(-0.5, 0.5, 40))
    folder = tmp_path / "my sae!"
    save_dictionary(d, folder)
    back = load_dictionary(str(folder))
    assert back.name == "my-sae-"
    assert back.source == str(folder)
    for name in ("architecture", "hook_name", "hook_out", "d_in", "d_sae", "d_out", "k", "apply_b_dec_to_input"):
        assert getattr(back, name) == getattr(d, name), name
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
        a, b = getattr(d, name), getattr(back, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    import hashlib

    want = hashlib.sha256((folder / CFG_FILE).read_bytes() + (folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert back.sha256 == "sha256:" + want
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(1)) * 3
    z, recon = numpy_encode(folder, x.numpy())
    got = back.encode(x)
    assert got.dtype == torch.float32 and got.shape == (64, 40)
    np.testing.assert_allclose(got.numpy(), z, rtol=1e-5, atol=1e-5)
    assert (got > 0).sum() > 0  # not a trivially empty encode
    np.testing.assert_allclose(back.decode(got, x).numpy(), recon, rtol=1e-4, atol=1e-4)
    assert back.is_transcoder == (d.hook_out is not None)


def test_saelens_reads_our_folder(tmp_path):
    try:
        from sae_lens import SAE
    except ImportError as e:  # sae-lens 6.54 imports transformer_lens.HookedTransformer, gone in transformer-lens 4
        pytest.skip(f"sae-lens does not import here ({type(e).__name__}: {e})")
    for case in sorted(CASES):
        if case == "constant_norm_rescale":
            continue
        d = random_dictionary(d_in=10, d_sae=40, hook_name=HOOK, seed=4, **CASES[case])
        save_dictionary(d, tmp_path / case)
        sae = SAE.load_from_disk(str(tmp_path / case))
        x = torch.randn(8, 10)
        torch.testing.assert_close(sae.encode(x), d.encode(x))


def _saved(tmp_path, **kw) -> Path:
    folder = tmp_path / "sae"
    save_dictionary(random_dictionary("topk", 10, 40, HOOK, k=4, **kw), folder)
    return folder


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CFG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / CFG_FILE).write_text(json.dumps(cfg))


def _edit_weights(folder: Path, **changes) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS_FILE))
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(folder / WEIGHTS_FILE))


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (lambda f: _edit_cfg(f, d_in=11), WEIGHTS_FILE, ["W_enc", "(11, 40)", "d_in"]),
        (lambda f: _edit_cfg(f, architecture="gated"), CFG_FILE, ["architecture", "gated", "standard"]),
        (lambda f: _edit_cfg(f, architecture="mystery"), CFG_FILE, ["architecture", "mystery", "unknown"]),
        (lambda f: _edit_cfg(f, d_sae=None), CFG_FILE, ["d_sae", "missing"]),
        (lambda f: _edit_cfg(f, k=41), CFG_FILE, ["field k", "41"]),
        (lambda f: _edit_cfg(f, metadata={}), CFG_FILE, ["hook_name", "missing"]),
        (lambda f: _edit_cfg(f, normalize_activations="layer_norm"), CFG_FILE, ["normalize_activations", "layer_norm"]),
        (lambda f: _edit_weights(f, b_enc=None), WEIGHTS_FILE, ["b_enc", "missing"]),
        (lambda f: _edit_weights(f, b_dec=torch.zeros(9)), WEIGHTS_FILE, ["b_dec", "(9,)", "(10,)"]),
        (lambda f: _edit_weights(f, extra=torch.zeros(3)), WEIGHTS_FILE, ["extra", "not understood"]),
        (lambda f: _edit_weights(f, W_dec=torch.full((40, 10), float("nan"))), WEIGHTS_FILE, ["W_dec", "NaN"]),
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"not safetensors"), WEIGHTS_FILE, ["safetensors"]),
        (lambda f: (f / CFG_FILE).unlink(), CFG_FILE, ["missing"]),
    ],
)
def test_bad_dictionary_is_one_line(tmp_path, damage, file, words):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(ConfigError) as e:
        load_dictionary(str(folder))
    message = str(e.value)
    assert "\n" not in message and str(folder / file) in message, message
    for word in words:
        assert word in message, (word, message)


def test_older_fields_and_log_threshold(tmp_path):
    """Pre-6 configs (hook_point, hook_point_layer, activation_fn_kwargs.k, no architecture) and a
    JumpReLU stored as log_threshold read as the same dictionary."""
    d = random_dictionary("topk", 10, 40, HOOK, k=4, seed=5)
    save_dictionary(d, tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / CFG_FILE).read_text())
    old = {k: cfg[k] for k in ("d_in", "d_sae", "apply_b_dec_to_input")}
    old.update(hook_point=HOOK, hook_point_layer=1, activation_fn="topk", activation_fn_kwargs={"k": 4})
    (tmp_path / "old" / CFG_FILE).write_text(json.dumps(old))
    back = load_dictionary(str(tmp_path / "old"))
    assert (back.architecture, back.k, back.hook_name) == ("topk", 4, HOOK)
    old["hook_point_layer"] = 2
    (tmp_path / "old" / CFG_FILE).write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="hook_layer"):
        load_dictionary(str(tmp_path / "old"))

    j = random_dictionary("jumprelu", 10, 40, HOOK, seed=6)
    save_dictionary(j, tmp_path / "jr")
    _edit_weights(tmp_path / "jr", threshold=None, log_threshold=j.threshold.double().log().float())
    x = torch.randn(16, 10)
    torch.testing.assert_close(load_dictionary(str(tmp_path / "jr")).encode(x), j.encode(x))


def test_no_such_dictionary_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        load_dictionary(str(tmp_path / "absent"))


# --- the trainer ---


def planted(n: int, d: int = 24, m: int = 48, active: int = 3, noise: float = 0.02, seed: int = 0):
    """Activations x = z @ D + offset + noise from a known dictionary D of m unit rows, each token
    with `active` features of magnitude 1..3."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(-1)[:, :active]
    z = torch.zeros(n, m).scatter_(1, idx, 1 + 2 * torch.rand(n, active, generator=g))
    return z @ D + 0.3 + noise * torch.randn(n, d, generator=g), D


def test_planted_dictionary_is_recovered_and_figures_are_direct():
    x, D = planted(9000)
    train, held = x[:8000], x[8000:]
    result = train_topk(train, TrainOptions(d_sae=96, k=4, batch_size=256, epochs=6, seed=0))
    best = (D @ result.W_dec.T).max(-1).values
    assert float(best.mean()) >= 0.9, best
    torch.testing.assert_close(result.W_dec.norm(dim=-1), torch.ones(96))
    d = result_dictionary(result, HOOK, "planted")
    got = evaluate(d, held)
    # Directly, in numpy: the TopK latents, their count and the unexplained variance.
    X = held.numpy().astype(np.float64)
    pre = (X - d.b_dec.numpy()) @ d.W_enc.numpy() + d.b_enc.numpy()
    z = np.zeros_like(pre)
    top = np.argsort(-pre, -1)[:, :4]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    recon = z @ d.W_dec.numpy() + d.b_dec.numpy()
    fvu = ((X - recon) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert got["l0"] == pytest.approx((z > 0).sum(-1).mean(), rel=1e-6)
    assert got["dead_fraction"] == pytest.approx((z > 0).any(0).__invert__().mean())
    assert got["fvu"] < 0.1


class Stop(Exception):
    pass


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    x, _ = planted(3000, seed=1)
    opts = TrainOptions(d_sae=64, k=4, batch_size=200, epochs=3, seed=2)
    whole = train_topk(x, opts)
    ckpt = tmp_path / "checkpoint.pt"

    def interrupt(path):
        raise Stop

    with pytest.raises(Stop):
        train_topk(x, opts, checkpoint=ckpt, checkpoint_steps=7, on_checkpoint=interrupt)
    assert ckpt.exists()
    resumed = train_topk(x, opts, checkpoint=ckpt, checkpoint_steps=7)
    assert resumed.steps == whole.steps == 45
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    again = train_topk(x, opts)
    assert torch.equal(again.W_enc, whole.W_enc)  # deterministic for a seed


# --- the command on the tiny model ---


def test_train_sae_cli(tmp_path, tiny_model_dir, tiny_corpus, monkeypatch):
    from sitegen.compute.models import load_model

    out = tmp_path / "tiny-sae"
    args = ["train-sae", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--hook", HOOK]
    args += ["--d-sae", "64", "--k", "4", "--tokens", "1500", "--epochs", "3", "--batch-size", "128"]
    args += ["--device", "cpu", "--quiet", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    d = load_dictionary(str(out))
    model = load_model(str(tiny_model_dir))
    check_fits(d, model)
    assert (d.architecture, d.d_in, d.d_sae, d.k, d.hook_name) == ("topk", 32, 64, 4, HOOK)
    report = json.loads((out / "training.json").read_text())
    figures = [report["heldout"][k] for k in ("l0", "fvu", "dead_fraction", "loss_increase", "loss_clean")]
    assert all(math.isfinite(v) for v in figures), report
    assert 0 < report["heldout"]["l0"] <= 4 and report["tokens"]["heldout"] > 0
    assert report["arguments"]["k"] == 4 and not (out / ".work").exists()

    # Interrupted after its first training checkpoint (Ctrl-C), then the same command again: it resumes
    # from .work/ (harvest chunks, checkpoint) and writes the uninterrupted run's weights.
    import sitegen.dictionaries.train as train_module

    save = train_module._save_checkpoint

    def save_then_interrupt(path, state):
        save(path, state)
        raise KeyboardInterrupt

    cut = tmp_path / "cut"
    cut_args = [a if a != str(out) else str(cut) for a in args] + ["--checkpoint-seconds", "0"]
    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_interrupt)
    res = CliRunner().invoke(main, cut_args)
    monkeypatch.undo()
    assert res.exit_code != 0 and (cut / ".work" / "checkpoint.pt").exists() and not (cut / WEIGHTS_FILE).exists()
    assert CliRunner().invoke(main, cut_args).exit_code == 0
    assert (cut / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()
    assert json.loads((cut / "training.json").read_text())["heldout"] == report["heldout"]

    # The same command again: nothing to do; another --k: one line naming it.
    assert CliRunner().invoke(main, args).exit_code == 0
    res = CliRunner().invoke(main, [a if a != "4" else "5" for a in args])
    assert res.exit_code == 2 and "--k 4" in res.output and "Traceback" not in res.output, res.output

    # A dictionary that does not fit: the file and the field in one line.
    wide = random_dictionary("topk", 48, 64, HOOK, k=4)
    save_dictionary(wide, tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"wide/cfg.json: field d_in is 48 .* 32 wide"):
        check_fits(load_dictionary(str(tmp_path / "wide")), model)
    save_dictionary(random_dictionary("topk", 32, 64, "blocks.9.hook_resid_post", k=4), tmp_path / "deep")
    with pytest.raises(ConfigError, match=r"deep/cfg.json: field hook_name 'blocks.9.hook_resid_post'"):
        check_fits(load_dictionary(str(tmp_path / "deep")), model)
    tc = random_dictionary("standard", 32, 64, HOOK, hook_out="blocks.1.mlp.hook_post", d_out=32, skip=True)
    save_dictionary(tc, tmp_path / "tc")
    with pytest.raises(ConfigError, match=r"tc/cfg.json: field d_out is 32 .* 48 wide"):
        check_fits(load_dictionary(str(tmp_path / "tc")), model)


def test_train_sae_bad_options_are_one_line(tmp_path, tiny_model_dir, tiny_corpus):
    base = ["train-sae", "--model", str(tiny_model_dir), "--corpus", str(tiny_corpus), "--device", "cpu", "--quiet"]
    cases = [
        (["--hook", "blocks.7.hook_resid_post", "--out", str(tmp_path / "a")], "--hook blocks.7.hook_resid_post"),
        (["--hook", HOOK, "--k", "0", "--out", str(tmp_path / "b")], "--k 0"),
        (["--hook", HOOK, "--tokens", "100", "--out", str(tmp_path / "c")], "--tokens 100"),
        (["--hook", HOOK, "--seq-len", "4", "--out", str(tmp_path / "d")], "--seq-len 4"),
    ]
    for extra, words in cases:
        res = CliRunner().invoke(main, base + extra)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        # (transformers' own "Loading weights" bar may precede it)
        assert res.exit_code != 0 and len(errors) == 1 and words in errors[0], res.output
        assert "Traceback" not in res.output
    # A refused --tokens leaves nothing to resume: the corrected command runs.
    assert not (tmp_path / "c" / ".work").exists()
