"""Correlated neurons (`sitegen compute --correlations`) on the tiny model: the stored sums equal
a brute-force computation from independently hooked activations, r equals np.corrcoef, shards
merge to identical bytes in either order, the flag off changes no store, and a run of the other
setting is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_a_dictionarys_latents_get_their_correlations_too(corr_run, tiny_model_dir, tiny_corpus, tmp_path):
    """With --sae, the latents (one layer of d_sae units) are correlated among themselves over the
    same counted tokens, and their site builds; latents that never fire have no r and list none."""
    import orjson

    from sitegen.compute.runner import run_compute
    from sitegen.dictionaries.format import random_dictionary, save_dictionary
    from sitegen.services.correlation.data import table_sums
    from sitegen.site.build import build_site
    from sitegen.store import Store

    save_dictionary(random_dictionary("topk", 32, 64, "blocks.1.hook_resid_post", k=6, name="res1"), tmp_path / "res1")
    out = tmp_path / "store"
    run_compute(
        _config(tiny_model_dir, tiny_corpus, out, correlations=True, dictionaries=(str(tmp_path / "res1"),)), **QUIET
    )
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
