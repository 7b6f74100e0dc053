"""Correlated neurons (`sitegen compute --correlations`) on the tiny model: the stored sums equal
a brute-force computation from independently hooked activations, r equals np.corrcoef, shards
merge to identical bytes in either order, the flag off changes no store, a run of the other
setting is refused in one line, and `sitegen verify` checks the stored sums (a fresh store passes;
each tampering fails, naming the layer and neuron)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import HAS_TORCH
from tests.test_compute import SEQ_LEN, _config, _hooked_glu

pytestmark = [pytest.mark.model, pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")]

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def corr_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    from sitegen.compute.runner import run_compute

    out = tmp_path_factory.mktemp("corr") / "store"
    run_compute(_config(tiny_model_dir, tiny_corpus, out, correlations=True), **QUIET)
    return out


@pytest.fixture(scope="module")
def counted_acts(tiny_model_dir, tiny_corpus):
    """Per layer, the activations of every counted token (n, d_mlp), hooked from the model itself
    (transformer-lens's hooks, not the runner's), counted as neuroscope counts: positions 1 (after
    the BOS) to the sequence's length."""
    from sitegen.compute.models import load_model

    model = load_model(str(tiny_model_dir))
    hooked, lengths, _ = _hooked_glu(model, tiny_corpus)
    positions = np.arange(SEQ_LEN)[None, :]
    counted = (positions >= 1) & (positions < lengths[:, None])
    return [hooked["acts"][layer][counted] for layer in range(model.n_layers)]


def test_sums_are_exact_and_r_equals_corrcoef(corr_run, counted_acts):
    """The int64 sums equal numpy's integer arithmetic on the same grid, exactly; r (the build's)
    equals np.corrcoef of the float32 activations within the quantisation's bound: rounding moves
    each value by at most d = 2^-11, so the centred vectors move by at most d per token in RMS and r
    by at most about 2 d / sigma for sigma the smaller standard deviation (4 d / sigma is the
    tolerance); the listed neurons are the 10 highest r, descending."""
    from sitegen.services.correlation.data import CLAMP, GRID_SHIFT, table_sums
    from sitegen.services.correlation.render import pearson, top_correlated
    from sitegen.store import Store

    store = Store.open(corr_run)
    assert "correlation" in store.manifest["services"] and store.manifest["identity"]["correlations"] is True
    for layer, x in enumerate(counted_acts):
        tokens, sums, clamped, gram = table_sums(store.read_layer("correlation", layer))
        scaled = x.astype(np.float64) * 2.0**GRID_SHIFT
        q = np.clip(np.rint(scaled), -CLAMP, CLAMP).astype(np.int64)
        assert tokens == len(x) > 1000
        assert np.array_equal(sums, q.sum(0)) and np.array_equal(gram, q.T @ q)
        assert np.array_equal(clamped, (np.abs(scaled) > CLAMP).sum(0))

        got, want = pearson(tokens, sums, gram), np.corrcoef(x.astype(np.float64).T)
        sigma = x.std(0)
        assert sigma.min() > 0.01  # the tiny model's neurons all vary: every r is defined
        tol = 4 * 2.0 ** -(GRID_SHIFT + 1) / np.minimum(sigma[:, None], sigma[None, :])
        assert np.all(np.abs(got - want) <= tol), np.abs(got - want).max()
        for n, top in enumerate(top_correlated(got)):
            others = np.delete(want[n], n)
            assert len(top) == 10 and [r for _, r in top] == sorted((r for _, r in top), reverse=True)
            assert min(r for _, r in top) >= np.sort(others)[-10] - tol.max()
            assert n not in {j for j, _ in top}


def test_shards_merge_in_either_order_to_the_same_bytes_and_the_whole_runs_sums(
    corr_run, tiny_model_dir, tiny_corpus, tmp_path
):
    from sitegen.compute.runner import run_compute
    from sitegen.merge import merge_stores
    from sitegen.store import Store

    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, out in enumerate(shards):
        run_compute(_config(tiny_model_dir, tiny_corpus, out, shard=(i, 2), correlations=True), **QUIET)
    ab, ba = (
        Store.open(merge_stores(order, tmp_path / name)) for name, order in (("ab", shards), ("ba", shards[::-1]))
    )
    whole = Store.open(corr_run)
    for layer in range(whole.manifest["model"]["num_layers"]):
        assert ab.layer_path("correlation", layer).read_bytes() == ba.layer_path("correlation", layer).read_bytes()
        assert ab.read_layer("correlation", layer).equals(whole.read_layer("correlation", layer)), layer
        parts = [Store.open(s).read_layer("correlation", layer).column("tokens")[0].as_py() for s in shards]
        assert all(parts) and sum(parts) == whole.read_layer("correlation", layer).column("tokens")[0].as_py()
    assert ab.manifest["run_hash"] == whole.manifest["run_hash"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_without_the_flag_a_store_is_what_it_was_without_the_service(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    """Off (the default), the service sits out: the store, its manifest and run hash included, is
    byte for byte the store a registry without the service computes."""
    from sitegen import services
    from sitegen.compute.runner import run_compute

    services.registry.cache_clear()
    run_compute(_config(tiny_model_dir, tiny_corpus, tmp_path / "with"), **QUIET)
    monkeypatch.setattr(services, "BUILTIN", {k: v for k, v in services.BUILTIN.items() if k != "correlation"})
    monkeypatch.setattr(services.metadata, "entry_points", lambda **kw: [])
    services.registry.cache_clear()
    try:
        assert "correlation" not in services.by_name()
        run_compute(_config(tiny_model_dir, tiny_corpus, tmp_path / "without"), **QUIET)
    finally:
        services.registry.cache_clear()
    with_, without = _files(tmp_path / "with"), _files(tmp_path / "without")
    with_manifest = with_.pop("manifest.json")
    without_manifest = without.pop("manifest.json")
    assert with_ == without and not any(k.startswith("correlation/") for k in with_)
    import orjson

    a, b = orjson.loads(with_manifest), orjson.loads(without_manifest)
    assert a.pop("versions") == b.pop("versions") and a == b and "correlations" not in a["identity"]


def test_a_run_of_the_other_setting_is_refused_in_one_line(corr_run, tiny_model_dir, tiny_corpus, tmp_path):
    """The setting is part of the run: a complete store, a checkpoint to resume and the shards to
    merge must all have the same; each mismatch is one line and changes nothing."""
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError
    from sitegen.merge import merge_stores
    from tests.reference import interrupt_after

    def refused(match, fn, *args, **kw):
        with pytest.raises(StoreError, match=match) as e:
            fn(*args, **kw)
        assert "\n" not in str(e.value)

    before = _files(corr_run)
    refused(
        "already holds a store .* with other arguments",
        run_compute,
        _config(tiny_model_dir, tiny_corpus, corr_run),
        **QUIET,
    )
    assert _files(corr_run) == before

    partial = tmp_path / "partial"
    with pytest.raises(StoreError, match="interrupted after"):
        run_compute(_config(tiny_model_dir, tiny_corpus, partial), progress=interrupt_after(2), **QUIET)
    checkpoint = (partial / ".work" / "checkpoint-0of1.npz").read_bytes()
    cfg = _config(tiny_model_dir, tiny_corpus, partial, correlations=True)
    refused("holds an unfinished run started with other arguments", run_compute, cfg, **QUIET)
    assert (partial / ".work" / "checkpoint-0of1.npz").read_bytes() == checkpoint

    on, off = tmp_path / "on", tmp_path / "off"
    run_compute(_config(tiny_model_dir, tiny_corpus, on, shard=(0, 2), correlations=True), **QUIET)
    run_compute(_config(tiny_model_dir, tiny_corpus, off, shard=(1, 2)), **QUIET)
    refused("computed with other arguments", merge_stores, [on, off], tmp_path / "merged")


def test_the_page_and_the_api_show_the_correlated_neurons(corr_run, tmp_path):
    """The neuron page's panel (links layer:neuron, r to 2 decimals, the token count) and the API's
    `correlated`, in the service's payload and the `all` aggregate, sorted by r descending."""
    import orjson

    from sitegen.services.correlation.data import table_sums
    from sitegen.services.correlation.render import pearson, top_correlated
    from sitegen.site.build import build_site
    from sitegen.store import Store

    store = Store.open(corr_run)
    name = store.manifest["model"]["name"]
    tokens, sums, _, gram = table_sums(store.read_layer("correlation", 1))
    top = top_correlated(pearson(tokens, sums, gram))[5]
    out = tmp_path / "site"
    build_site([corr_run], out)
    data = orjson.loads((out / "api" / name / "correlation" / "1" / "5.json").read_bytes())["data"]
    assert data["correlated"] == [{"layer": 1, "neuron": j, "r": round(r, 4)} for j, r in top]
    assert [e["r"] for e in data["correlated"]] == sorted((e["r"] for e in data["correlated"]), reverse=True)
    everything = orjson.loads((out / "api" / name / "all" / "1" / "5.json").read_bytes())
    assert everything["correlation"]["data"] == data
    assert everything["metadata"]["provenance"]["correlation"]["grid"] == 2.0**-10
    from tests.test_api import _documented, _spec, _validator

    spec = _spec(out)  # every API file of the model validates against the OpenAPI description
    for f in sorted((out / "api" / name).rglob("*.json")):
        url = "/api/" + f.relative_to(out / "api").with_suffix("").as_posix()
        template = _documented(spec, url)
        errors = list(_validator(spec, template).iter_errors(orjson.loads(f.read_bytes())))
        assert not errors, f"{url}: {errors[0].message} at {list(errors[0].absolute_path)}"
    page = (out / name / "1" / "5.html").read_text()
    assert "Correlated neurons" in page and f"computed over {tokens:,} tokens" in page
    assert (  # its provenance row
        f"<dt>Correlated neurons</dt><dd>Pearson's r over {tokens:,} counted tokens (BOS and padding excluded), from "
        "exact int64 sums of activations rounded to 2<sup>-10</sup> and cut to ±1024</dd>"
    ) in page
    j, r = top[0]
    assert f'<a href="/{name}/1/{j}.html">1:{j}</a> <small>r = {r:.2f}</small>' in page


def test_the_sums_do_not_depend_on_how_the_tokens_are_chunked(
    corr_run, tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    """Chunks of 7 tokens (other float64 products, added in another order) give the same bytes."""
    from sitegen.compute.runner import run_compute
    from sitegen.services.correlation import data

    monkeypatch.setattr(data, "CHUNK", 7)
    out = tmp_path / "chunked"
    run_compute(_config(tiny_model_dir, tiny_corpus, out, correlations=True), **QUIET)
    for layer in range(3):
        assert (
            out.joinpath(f"correlation/layer={layer}/data.parquet").read_bytes()
            == corr_run.joinpath(f"correlation/layer={layer}/data.parquet").read_bytes()
        )


def test_a_resumed_run_equals_the_uninterrupted_one(corr_run, tiny_model_dir, tiny_corpus, tmp_path):
    """The sums are checkpointed and loaded back: interrupted after 2 batches and resumed, the
    correlation tables are the uninterrupted run's bytes."""
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError
    from tests.reference import interrupt_after

    out = tmp_path / "resumed"
    cfg = _config(tiny_model_dir, tiny_corpus, out, correlations=True)
    with pytest.raises(StoreError, match="interrupted after"):
        run_compute(cfg, progress=interrupt_after(2), **QUIET)
    run_compute(cfg, **QUIET)
    for layer in range(3):
        rel = f"correlation/layer={layer}/data.parquet"
        assert (out / rel).read_bytes() == (corr_run / rel).read_bytes(), rel


# Two dictionaries of the tiny model (d_model 32, d_mlp 48): one reads after its layer's MLP, one
# before it (the neurons of its layer come later in the forward pass).
SAES = {
    "res1": dict(architecture="topk", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post", k=6),
    "pre2": dict(architecture="standard", d_in=32, d_sae=40, hook_name="blocks.2.hook_resid_pre"),
}


def _sae_config(tiny_model_dir, tiny_corpus, out, folders, **kw):
    return _config(
        tiny_model_dir, tiny_corpus, out, correlations=True, dictionaries=tuple(str(folders[n]) for n in SAES), **kw
    )


@pytest.fixture(scope="module")
def sae_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """The tiny model computed with --correlations and the two dictionaries: (store, folders)."""
    from sitegen.compute.runner import run_compute
    from sitegen.dictionaries.format import random_dictionary, save_dictionary

    root = tmp_path_factory.mktemp("sae")
    folders = {}
    for i, (name, kw) in enumerate(SAES.items()):
        kw = dict(kw)
        args = (kw.pop("architecture"), kw.pop("d_in"), kw.pop("d_sae"), kw.pop("hook_name"))
        save_dictionary(random_dictionary(*args, seed=i, name=name, **kw), root / name)
        folders[name] = root / name
    run_compute(_sae_config(tiny_model_dir, tiny_corpus, root / "store", folders), **QUIET)
    return root / "store", folders


def test_a_dictionarys_latents_get_their_correlations_too(corr_run, sae_run, tmp_path):
    """With --sae, the latents (one layer of d_sae units) are correlated among themselves over the
    same counted tokens, and their site builds; latents that never fire have no r and list none."""
    import orjson

    from sitegen.services.correlation.data import table_sums
    from sitegen.site.build import build_site
    from sitegen.store import Store

    out, _ = sae_run
    latents = Store.open(out / "dictionaries" / "res1")
    tokens, sums, _, gram = table_sums(latents.read_layer("correlation", 0))
    assert gram.shape == (64, 64) and tokens == table_sums(Store.open(corr_run).read_layer("correlation", 0))[0]
    site = tmp_path / "site"
    build_site([out], site)
    name = f"{Store.open(out).manifest['model']['name']}.res1"
    listed = []
    for n in range(64):
        data = orjson.loads((site / "api" / name / "correlation" / "0" / f"{n}.json").read_bytes())["data"]
        constant = int(sums[n]) ** 2 == tokens * int(gram[n, n])  # n * sum(q^2) = sum(q)^2: no variance
        assert (data["correlated"] == []) == constant, n
        listed.append(len(data["correlated"]))
    assert max(listed) == 10


def _hooked_latents(model, tiny_corpus, folders) -> dict[str, np.ndarray]:
    """Each dictionary's latents (seqs, SEQ_LEN, d_sae): its own encoder applied to the activation
    hooked at its hook point in compute's batches (transformer-lens's hooks, not the runner's)."""
    import torch

    from sitegen.compute.packing import pack_sequences
    from sitegen.compute.runner import _batch_tensors
    from sitegen.corpus import load_corpus
    from sitegen.corpus_keys import random_key
    from sitegen.dictionaries.format import load_dictionary
    from tests.test_compute import BATCH, SEED, TOKENS

    seqs = list(pack_sequences(load_corpus(str(tiny_corpus)), model.tokenizer, SEQ_LEN, TOKENS, SEED))
    dicts = {name: load_dictionary(str(folders[name])) for name in SAES}
    out = {name: np.zeros((len(seqs), SEQ_LEN, d.d_sae), np.float32) for name, d in dicts.items()}
    for start in range(0, len(seqs), BATCH):
        batch = seqs[start : start + BATCH]
        tokens, *_ = _batch_tensors(batch, BATCH, SEQ_LEN, model.tokenizer.pad_token_id, 1, SEED, random_key, "cpu")
        captured = {}
        hooks = [
            (d.hook_name, (lambda key: lambda x, hook: captured.__setitem__(key, x.detach().clone()))(name))
            for name, d in dicts.items()
        ]
        with torch.inference_mode():
            model.bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
            for name, d in dicts.items():
                out[name][start : start + len(batch)] = d.encode(captured[name])[: len(batch)].numpy()
    return out


def test_latents_and_neurons_of_one_layer_have_exact_cross_sums(sae_run, counted_acts, tiny_model_dir, tiny_corpus):
    """Each dictionary's table holds, per latent, the int64 products with every neuron of the layer
    it reads at (the MLP after it, for the one reading before its layer's MLP), equal to numpy's
    integer arithmetic on the grid from independently hooked neurons and latents; its own sums are
    the latents' and its token count the neurons'."""
    from sitegen.compute.models import load_model
    from sitegen.services.correlation.data import CLAMP, GRID_SHIFT, table_cross, table_sums
    from sitegen.store import Store
    from tests.test_compute import _hooked_glu

    out, folders = sae_run
    model = load_model(str(tiny_model_dir))
    latents = _hooked_latents(model, tiny_corpus, folders)
    _, lengths, _ = _hooked_glu(model, tiny_corpus)
    positions = np.arange(SEQ_LEN)[None, :]
    counted = (positions >= 1) & (positions < lengths[:, None])
    grid = lambda x: np.clip(np.rint(x.astype(np.float64) * 2.0**GRID_SHIFT), -CLAMP, CLAMP).astype(np.int64)
    for name, layer in (("res1", 1), ("pre2", 2)):
        table = Store.open(out / "dictionaries" / name).read_layer("correlation", 0)
        tokens, sums, _, gram = table_sums(table)
        cross = table_cross(table)
        ql, qn = grid(latents[name][counted]), grid(counted_acts[layer])
        assert tokens == len(ql) == len(qn)
        assert cross.shape == (SAES[name]["d_sae"], 48)
        assert np.array_equal(sums, ql.sum(0)) and np.array_equal(gram, ql.T @ ql), name
        assert np.array_equal(cross, ql.T @ qn), name
        assert np.abs(cross).max() > 0
    assert "neuron_gram" not in Store.open(out).read_layer("correlation", 1).column_names  # the neurons' own: none


def test_cross_sums_merge_in_either_order_and_resume(sae_run, tiny_model_dir, tiny_corpus, tmp_path):
    """Two shards merged in either order, and a run interrupted after 2 batches and resumed, give
    the whole run's latent tables byte for byte."""
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError
    from sitegen.merge import merge_stores
    from tests.reference import interrupt_after

    whole, folders = sae_run
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, out in enumerate(shards):
        run_compute(_sae_config(tiny_model_dir, tiny_corpus, out, folders, shard=(i, 2)), **QUIET)
    merged = [merge_stores(order, tmp_path / name) for name, order in (("ab", shards), ("ba", shards[::-1]))]
    resumed = tmp_path / "resumed"
    cfg = _sae_config(tiny_model_dir, tiny_corpus, resumed, folders)
    with pytest.raises(StoreError, match="interrupted after"):
        run_compute(cfg, progress=interrupt_after(2), **QUIET)
    run_compute(cfg, **QUIET)
    for name in SAES:
        rel = f"dictionaries/{name}/correlation/layer=0/data.parquet"
        want = (whole / rel).read_bytes()
        for other in (*merged, resumed):
            assert (other / rel).read_bytes() == want, (other, rel)


@pytest.mark.parametrize("all_full", [True, False])
def test_the_accumulator_counts_cuts_and_adds_as_numpy_does(all_full):
    """Activations beyond +-1024 are cut to the clamp and counted per neuron; the Gram matrix, the
    sums and the count equal numpy's integer arithmetic, through the full-batch path and the
    masked one (BOS column and a padding row left out)."""
    import torch

    from sitegen.services.base import Batch, CorpusRun
    from sitegen.services.correlation.compute import GramAccumulator
    from sitegen.services.correlation.data import CLAMP, GRID_SHIFT

    gen = torch.Generator().manual_seed(0)
    acts = torch.randn((4, 9, 6), generator=gen) * 300  # some beyond +-1024
    acts[1, 3, 2], acts[2, 5, 4] = 5000.0, -1e6
    valid = torch.ones((4, 9), dtype=torch.bool)
    valid[:, 0] = False
    if not all_full:
        valid[3] = False  # a padding row
        valid[1, 7:] = False  # a short sequence
    acc = GramAccumulator(CorpusRun(layer_size=6, seq_len=9, first_valid=1, top_k=1, n_random=0, seed=0))
    acc.update(
        acts,
        Batch(
            valid=valid,
            seq_ids=torch.arange(4),
            rand_score=torch.zeros(4),
            interval_score=torch.zeros(4),
            all_full=all_full,
        ),
    )
    x = acts[valid].double().numpy() * 2.0**GRID_SHIFT
    q = np.clip(np.rint(x), -CLAMP, CLAMP).astype(np.int64)
    state = acc.state()
    assert int(state["tokens"]) == len(q) == (32 if all_full else 22)
    assert np.array_equal(state["gram"], q.T @ q) and np.array_equal(state["sum"], q.sum(0))
    assert state["clamped"].tolist() == (np.abs(x) > CLAMP).sum(0).tolist() and state["clamped"].sum() >= 2


def _verify(store, *args):
    from click.testing import CliRunner

    from sitegen.cli import main

    return CliRunner().invoke(main, ["verify", str(store), *args])


def _tampered(corr_run, tmp_path, layer: int, change) -> Path:
    """A copy of the store whose correlation table of LAYER is CHANGE(tokens, sums, clamped, gram)
    (arrays changed in place), written back through the service's own table writer."""
    import shutil

    from sitegen.services.correlation.data import sums_table, table_sums
    from sitegen.store import Store

    out = tmp_path / "tampered"
    shutil.copytree(corr_run, out)
    st = Store.open(out)
    tokens, sums, clamped, gram = (
        np.array(a) if i else a for i, a in enumerate(table_sums(st.read_layer("correlation", layer)))
    )
    table = change(tokens, sums, clamped, gram) or sums_table(tokens, sums, clamped, gram)
    st.write_layer("correlation", layer, table)
    return out


def test_verify_checks_the_sums_and_reruns_them_on_a_small_store(corr_run, tmp_path):
    """A fresh store passes: every checked layer's sums are consistent, and the whole corpus pass
    being rerun (a small store keeps every sequence), the sampled neurons' sums are recomputed on
    the grid and equal the stored ones bit for bit on the CPU."""
    import orjson

    report = tmp_path / "report.json"
    result = _verify(corr_run, "--neurons", "4", "--batch-size", "3", "--json", str(report))
    assert result.exit_code == 0, result.output
    for layer in range(3):
        assert (
            f"correlation layer {layer}: 48 neurons' sums checked; 4 neurons' sums rerun, largest difference 0, 0 failed"
            in result.output
        ), result.output
    assert "correlation sums of 3 layers checked, 0 neurons failed" in result.output
    r = orjson.loads(report.read_bytes())["correlation"]
    assert r == {"layers": [0, 1, 2], "rerun": True, "max_sum_difference": 0, "failed": []}
    sampled = _verify(
        corr_run, "--neurons", "4", "--sampled"
    )  # only the sampled neurons' sequences: no rerun of the sums
    assert sampled.exit_code == 0, sampled.output
    assert "note: correlation: the sums checked for consistency only" in sampled.output
    assert "sums rerun" not in sampled.output


def _fails(result, layer: int, neurons: set[int], message: str) -> None:
    assert result.exit_code == 1, result.output
    fails = [line.strip() for line in result.output.splitlines() if "FAIL layer" in line]
    named = {int(re.match(r"FAIL layer (\d+) neuron (\d+):", f).group(2)) for f in fails}
    assert all(f.startswith(f"FAIL layer {layer} neuron ") for f in fails) and named == neurons, result.output
    assert any(message in f for f in fails), result.output


def test_verify_fails_naming_the_neuron_whose_stored_sum_changed(corr_run, tmp_path):
    """One stored sum off by one (the smallest change) breaks the parity of sum(q) and sum(q^2);
    verify names that neuron alone, also when it is not among the sampled ones."""

    def change(tokens, sums, clamped, gram):
        sums[17] += 1

    broken = _tampered(corr_run, tmp_path, 1, change)
    result = _verify(broken, "--neurons", "1:3")
    _fails(result, 1, {17}, "differ in parity")
    assert result.output.splitlines()[-1] == (
        f"error: {broken}: 0 of 1 neurons differ from the model beyond --rtol 0.0001, 1 neurons outside the sample "
        "fail a check of the stored data (see the report above)"
    )


def test_verify_fails_on_an_asymmetric_gram_matrix_and_a_changed_token_count(corr_run, tmp_path):
    def change(tokens, sums, clamped, gram):
        gram[4, 9] += 2  # even: the diagonal's parity holds; the mirror entry does not match
        from sitegen.services.correlation.data import sums_table

        table = sums_table(tokens, sums, clamped, gram)
        column = table.column("tokens").to_numpy().copy()
        column[30] += 1
        return table.set_column(1, "tokens", pa.array(column))

    broken = _tampered(corr_run, tmp_path, 2, change)
    _fails(_verify(broken, "--neurons", "2:0"), 2, {4, 9, 30}, "the Gram matrix is not symmetric")
    assert "FAIL layer 2 neuron 30: correlation: " in _verify(broken, "--neurons", "2:0").output


def test_verify_recomputes_the_sampled_neurons_gram_block(corr_run, tmp_path):
    """A symmetric, even change of one Gram entry keeps every identity (and r within +-1); only
    the rerun sums catch it, naming both neurons; verify without the rerun (--sampled) cannot."""
    from sitegen.services.correlation.data import table_sums
    from sitegen.services.correlation.render import pearson
    from sitegen.store import Store

    tokens, sums, _, gram = table_sums(Store.open(corr_run).read_layer("correlation", 0))
    r = pearson(tokens, sums, gram)
    i, j = np.unravel_index(np.argmin(np.abs(r) + np.eye(len(r))), r.shape)  # the least correlated pair
    # beyond what activations within rtol can move it: sum|q| <= sqrt(N sum q^2) per neuron, |dq| <= 1.5
    k = 2 * int(3 * (np.sqrt(tokens * gram[i, i]) + np.sqrt(tokens * gram[j, j])) + 3 * tokens)

    def change(tokens, sums, clamped, gram):
        gram[i, j] += k
        gram[j, i] += k

    broken = _tampered(corr_run, tmp_path, 0, change)
    after = pearson(tokens, sums, table_sums(Store.open(broken).read_layer("correlation", 0))[3])
    assert abs(after[i, j]) < 0.9 and abs(after[i, j] - r[i, j]) > 0.01  # r is defined, and visibly moved
    _fails(_verify(broken, "--neurons", f"0:{i},0:{j}"), 0, {int(i), int(j)}, "Gram entry with neuron")
    assert _verify(broken, "--neurons", f"0:{i},0:{j}", "--sampled").exit_code == 0


@pytest.mark.parametrize("tamper", ["diagonal", "sum"])
def test_verify_holds_the_sums_to_neuroscopes_and_to_r_within_one(corr_run, tmp_path, tamper):
    """A sampled neuron's sum of squares cut to the least its sum allows (parity kept, variance
    about 0) disagrees with neuroscope's sum of squares and puts r with other neurons beyond +-1;
    its sum moved by 2 per token (parity kept) disagrees with neuroscope's sum and the rerun."""
    n = 11

    def change(tokens, sums, clamped, gram):
        if tamper == "diagonal":
            s = int(sums[n])
            least = max(-(-(s * s) // tokens), abs(s))
            gram[n, n] = least + (least - s) % 2
        else:
            sums[n] += 2 * tokens

    broken = _tampered(corr_run, tmp_path, 1, change)
    result = _verify(broken, "--neurons", f"1:{n}")
    _fails(result, 1, {n}, "differs from neuroscope's")
    if tamper == "diagonal":
        assert f"FAIL layer 1 neuron {n}: correlation: sum of squares " in result.output
        assert re.search(rf"FAIL layer 1 neuron {n}: correlation: r with neuron \d+ is beyond", result.output)
    else:
        assert f"FAIL layer 1 neuron {n}: correlation: sum stored " in result.output


def test_latents_and_neurons_of_one_layer_list_each_other(sae_run, counted_acts, tiny_model_dir, tiny_corpus, tmp_path):
    """A latent's page and API list the 10 neurons of the layer its dictionary reads at with the
    highest r (`correlated_neurons`), a neuron of that layer the 10 latents (`correlated_latents`),
    each r equal to np.corrcoef of the hooked activations within the grid's bound and the same r
    both ways; a layer no dictionary reads at lists no latents; every API file validates."""
    import orjson

    from sitegen.compute.models import load_model
    from sitegen.site.build import build_site
    from sitegen.store import Store
    from tests.test_api import _documented, _spec, _validator
    from tests.test_compute import _hooked_glu

    out, folders = sae_run
    model = load_model(str(tiny_model_dir))
    latents = _hooked_latents(model, tiny_corpus, folders)
    _, lengths, _ = _hooked_glu(model, tiny_corpus)
    counted = (np.arange(SEQ_LEN)[None, :] >= 1) & (np.arange(SEQ_LEN)[None, :] < lengths[:, None])
    site = tmp_path / "site"
    build_site([out], site)
    base = Store.open(out).manifest["model"]["name"]
    api = lambda model, layer, n: orjson.loads((site / f"api/{model}/correlation/{layer}/{n}.json").read_bytes())[
        "data"
    ]
    bound = 4 * 2.0**-11
    for name, layer in (("res1", 1), ("pre2", 2)):
        z, x = latents[name][counted].astype(np.float64), counted_acts[layer].astype(np.float64)
        live = z.std(0) > 0
        want = np.corrcoef(np.concatenate([z[:, live], x], axis=1).T)[: live.sum(), live.sum() :]
        r = np.full((z.shape[1], x.shape[1]), np.nan)
        r[live] = want
        with np.errstate(divide="ignore"):  # a dead latent: no r, no tolerance needed
            tol = bound / np.minimum(z.std(0)[:, None], x.std(0)[None, :])
        sub = f"{base}.{name}"
        for latent in range(z.shape[1]):
            got = api(sub, 0, latent)["correlated_neurons"]
            if not live[latent]:
                assert got == [], (name, latent)
                continue
            assert len(got) == 10 and [e["r"] for e in got] == sorted((e["r"] for e in got), reverse=True)
            assert {e["layer"] for e in got} == {layer}
            for e in got:
                assert abs(e["r"] - r[latent, e["neuron"]]) <= tol[latent, e["neuron"]] + 5e-5, (name, latent, e)
            assert got[-1]["r"] >= np.sort(r[latent])[-10] - tol[latent].max() - 5e-5
        for n in range(48):
            got = api(base, layer, n)["correlated_latents"]
            assert len(got) == 10 and {e["model"] for e in got} == {sub}
            for e in got:
                assert abs(e["r"] - r[e["latent"], n]) <= tol[e["latent"], n] + 5e-5, (name, n, e)
                back = {f["neuron"]: f["r"] for f in api(sub, 0, e["latent"])["correlated_neurons"]}
                assert back.get(n, e["r"]) == e["r"]  # where the latent lists the neuron too, the same r
            assert got[0]["r"] >= np.nanmax(r[:, n]) - tol[live, n].max() - 5e-5
    assert "correlated_latents" not in api(base, 0, 0)  # no dictionary reads at layer 0
    e = api(base, 1, 5)["correlated_latents"][0]
    page = (site / base / "1" / "5.html").read_text()
    assert "<h3>Latents</h3>" in page
    assert (
        f'<a href="/{e["model"]}/0/{e["latent"]}.html">{e["model"]} {e["latent"]}</a> <small>r = {e["r"]:.2f}</small>'
        in page
    )
    assert "<h3>Latents</h3>" not in (site / base / "0" / "5.html").read_text()
    live = next(n for n in range(64) if api(f"{base}.res1", 0, n)["correlated_neurons"])
    e = api(f"{base}.res1", 0, live)["correlated_neurons"][0]
    page = (site / f"{base}.res1" / "0" / f"{live}.html").read_text()
    assert f"<h3>Neurons of {base}, layer 1</h3>" in page
    assert f'<a href="/{base}/1/{e["neuron"]}.html">1:{e["neuron"]}</a> <small>r = {e["r"]:.2f}</small>' in page
    spec = _spec(site)
    for model in (base, f"{base}.res1", f"{base}.pre2"):
        for f in sorted((site / "api" / model / "correlation").rglob("*.json")):
            url = "/api/" + f.relative_to(site / "api").with_suffix("").as_posix()
            errors = list(_validator(spec, _documented(spec, url)).iter_errors(orjson.loads(f.read_bytes())))
            assert not errors, f"{url}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_verify_checks_a_dictionarys_products_with_its_layers_neurons(sae_run, tmp_path):
    """A dictionary's store verifies (its latents' own sums, and their products with the neurons
    of the layer it reads at, against the model's store it sits in); one product of a sampled
    latent made larger than r within +-1 allows fails, naming that latent."""
    import shutil

    from sitegen.services.correlation.data import sums_table, table_cross, table_sums
    from sitegen.store import Store

    out, _ = sae_run
    for name in SAES:
        result = _verify(out / "dictionaries" / name, "--neurons", "4")
        assert result.exit_code == 0, result.output
        assert "correlation layer 0: " in result.output and "0 failed" in result.output
    shutil.copytree(out / "dictionaries" / "res1", tmp_path / "alone")  # away from its model's store: a note
    result = _verify(tmp_path / "alone", "--neurons", "4")
    assert result.exit_code == 0 and "note: correlation: the latents' products with the neurons" in result.output
    copy = tmp_path / "store"
    shutil.copytree(out, copy)
    sub = Store.open(copy / "dictionaries" / "res1")
    table = sub.read_layer("correlation", 0)
    tokens, sums, clamped, gram = table_sums(table)
    cross = table_cross(table).copy()
    latent = next(n for n in range(64) if gram[n, n] > 0)
    cross[latent, 7] = int(np.sqrt(float(gram[latent, latent]) * 4e12))  # beyond any neuron's sum of squares
    sub.write_layer("correlation", 0, sums_table(tokens, sums, clamped, gram, cross))
    _fails(
        _verify(copy / "dictionaries" / "res1", "--neurons", f"0:{latent}"),
        0,
        {latent},
        "r with neuron 7 of layer 1 is beyond +-1",
    )
