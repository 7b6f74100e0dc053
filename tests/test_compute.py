"""Compute on a tiny random-init model (no download): exactness against brute force, merge,
resume after kill -9, and weight-based logit tables against an independent computation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HAS_TORCH
from tests.reference import brute_force_intervals, brute_force_state

pytestmark = [pytest.mark.model, pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")]

SEQ_LEN, TOKENS, BATCH, TOP_K, N_RANDOM, SEED = 16, 1500, 4, 5, 3, 3


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


def _tables(store_root: Path) -> dict[str, object]:
    from sitegen.store import Store

    st = Store.open(store_root)
    out = {"sequences": st.sequences(), "vocab": st.vocab()}
    for service in st.manifest["services"]:
        for layer in range(st.manifest["model"]["num_layers"]):
            out[f"{service}/{layer}"] = st.read_layer(service, layer)
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if key == "vocab":
            assert ta[key] == tb[key]
        else:
            assert ta[key].equals(tb[key]), f"{key} differs"


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    from sitegen.compute.runner import run_compute

    out = tmp_path_factory.mktemp("whole") / "store"
    run_compute(_config(tiny_model_dir, tiny_corpus, out), log=lambda m: None)
    return out


def test_store_equals_brute_force(whole_run, tiny_model_dir, tiny_corpus):
    """Top-k, bottom-k, random sample, sums, histograms: the stored tables equal those derived from
    the full activation tensor (collected with the same batches, so bit-identical activations)."""
    import torch

    from sitegen.compute.models import load_model
    from sitegen.compute.packing import pack_sequences
    from sitegen.compute.runner import _batch_tensors
    from sitegen.corpus import load_corpus
    from sitegen.corpus_keys import random_key
    from sitegen.services.neuroscope import data as ns_data
    from sitegen.store import Store

    model = load_model(str(tiny_model_dir))
    seqs = list(pack_sequences(load_corpus(str(tiny_corpus)), model.tokenizer, SEQ_LEN, TOKENS, SEED))
    n_layers, n = model.n_layers, model.d_mlp
    acts = np.zeros((n_layers, len(seqs), SEQ_LEN, n), np.float32)
    for start in range(0, len(seqs), BATCH):
        batch = seqs[start : start + BATCH]
        tokens, *_ = _batch_tensors(batch, BATCH, SEQ_LEN, model.tokenizer.pad_token_id, 1, SEED, random_key, "cpu")
        captured = {}
        hooks = [
            (
                model.hook_name(layer),
                (lambda layer: lambda x, hook: captured.__setitem__(layer, x.detach().clone()))(layer),
            )
            for layer in range(n_layers)
        ]
        with torch.inference_mode():
            model.bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
        for layer in range(n_layers):
            acts[layer, start : start + len(batch)] = captured[layer][: len(batch)].numpy()
    lengths = np.array([len(s.token_ids) for s in seqs])
    seq_ids = np.array([s.seq_id for s in seqs])
    store = Store.open(whole_run)
    assert store.manifest["processed"]["sequences"] == len(seqs)
    for layer in range(n_layers):
        expected = ns_data.state_to_table(
            {
                **brute_force_state(acts[layer], lengths, seq_ids, 1, TOP_K, N_RANDOM, SEED),
                "interval": brute_force_intervals(acts[layer], lengths, seq_ids, 1, SEED),
            },
            TOP_K,
            N_RANDOM,
            dict(zip(seq_ids.tolist(), lengths.tolist())),
        )
        got = store.read_layer("neuroscope", layer)
        assert "interval_seq" in expected.column_names
        for col in expected.column_names:
            assert got.column(col).equals(expected.column(col)), f"layer {layer} column {col}"
        _check_intervals(got, acts[layer], lengths)
        # and the statistics mean what they say
        valid = acts[layer][:, 1:, :][np.arange(1, SEQ_LEN)[None, :] < lengths[:, None]]
        # the stored mean is exact (fixed-point sums): compare with a float64 mean, not numpy's float32 one
        np.testing.assert_allclose(got.column("mean").to_numpy(), valid.astype(np.float64).mean(0), atol=1e-6)
        np.testing.assert_allclose(got.column("std").to_numpy(), valid.astype(np.float64).std(0), rtol=1e-4)
        np.testing.assert_array_equal(got.column("max").to_numpy(), valid.max(0))
        assert got.column("top_max")[0].as_py()[0] == pytest.approx(float(valid[:, 0].max()))
    # stored token ids are the model input: sequences table holds them with BOS first
    first = store.sequences().column("token_ids")[0].as_py()
    assert first[0] == model.tokenizer.bos_token_id


def _check_intervals(table, acts: np.ndarray, lengths: np.ndarray) -> None:
    """What the interval columns claim, read against the activations: every kept example's maximum
    lies in its group's interval, groups hold at most PER_INTERVAL examples, and each group's token
    count is the number of counted tokens in its interval (np.histogram-free: a direct count)."""
    from sitegen.services.neuroscope import stats

    groups = stats.INTERVAL_GROUPS + 1
    valid = (np.arange(SEQ_LEN)[None, :] >= 1) & (np.arange(SEQ_LEN)[None, :] < lengths[:, None])
    counted = acts[valid]  # (V, n)
    filled = 0
    for u, row in enumerate(
        table.select(["interval_top", "interval_group", "interval_acts", "interval_tokens"]).to_pylist()
    ):
        top = row["interval_top"]
        if top < 0:
            assert not row["interval_group"] and counted[:, u].max() <= 0
            continue
        upper = [stats.interval_edge(top + 1 - g) for g in range(groups)]  # each group's upper edge
        lower = upper[1:] + [0.0]
        assert max(np.bincount(row["interval_group"], minlength=groups)) <= stats.PER_INTERVAL
        for g, trace in zip(row["interval_group"], row["interval_acts"]):
            peak = max(trace[1:])
            assert (lower[g] <= peak < upper[g]) if g < groups - 1 else (0 < peak < upper[g]), (u, g, peak)
            filled += 1
        want = [int(((counted[:, u] >= lo) & (counted[:, u] < hi)).sum()) for lo, hi in zip(lower[:-1], upper[:-1])]
        want.append(int(((counted[:, u] > 0) & (counted[:, u] < upper[-1])).sum()))
        assert row["interval_tokens"] == want, (u, row["interval_tokens"], want)
    assert filled > 0


def _hooked_glu(model, tiny_corpus):
    """(acts, gate, up) per layer, (layers, seqs, SEQ_LEN, d_mlp), hooked from the model in compute's
    batches, and the sequences' lengths and ids."""
    import torch

    from sitegen.compute.packing import pack_sequences
    from sitegen.compute.runner import _batch_tensors
    from sitegen.corpus import load_corpus
    from sitegen.corpus_keys import random_key

    seqs = list(pack_sequences(load_corpus(str(tiny_corpus)), model.tokenizer, SEQ_LEN, TOKENS, SEED))
    names = {"acts": "hook_post", "gate": "hook_pre", "up": "hook_pre_linear"}
    out = {k: np.zeros((model.n_layers, len(seqs), SEQ_LEN, model.d_mlp), np.float32) for k in names}
    for start in range(0, len(seqs), BATCH):
        batch = seqs[start : start + BATCH]
        tokens, *_ = _batch_tensors(batch, BATCH, SEQ_LEN, model.tokenizer.pad_token_id, 1, SEED, random_key, "cpu")
        captured = {}
        hooks = [
            (
                f"blocks.{layer}.mlp.{hook}",
                (lambda key: lambda x, hook: captured.__setitem__(key, x.detach().clone()))((k, layer)),
            )
            for layer in range(model.n_layers)
            for k, hook in names.items()
        ]
        with torch.inference_mode():
            model.bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
        for (k, layer), x in captured.items():
            out[k][layer, start : start + len(batch)] = x[: len(batch)].numpy()
    return out, np.array([len(s.token_ids) for s in seqs]), np.array([s.seq_id for s in seqs])


def test_glu_quadrants_equal_direct_computation_and_merge(whole_run, tiny_model_dir, tiny_corpus, tmp_path):
    """Per neuron and (gate sign, up sign) quadrant: token counts, activation mass (fixed point) and
    the top example (largest |activation|, ties to the lower sequence, then position) equal a direct
    computation from the hooked gate and up pre-activations over every counted token; two shards
    merged in either order give the whole run's columns."""
    from sitegen.compute.models import load_model
    from sitegen.compute.runner import run_compute
    from sitegen.merge import merge_stores
    from sitegen.store import Store

    model = load_model(str(tiny_model_dir))
    hooked, lengths, seq_ids = _hooked_glu(model, tiny_corpus)
    store = Store.open(whole_run)
    counted = (np.arange(SEQ_LEN)[None, :] >= 1) & (np.arange(SEQ_LEN)[None, :] < lengths[:, None])  # (seqs, T)
    for layer in range(model.n_layers):
        acts, gate, up = (hooked[k][layer] for k in ("acts", "gate", "up"))
        np.testing.assert_allclose(acts, gate / (1 + np.exp(-gate)) * up, rtol=1e-4, atol=1e-5)  # the hooks' meaning
        quadrant = 2 * (gate <= 0) + (up <= 0)
        t = store.read_layer("neuroscope", layer)
        got = {
            c: t.column(c).to_pylist()
            for c in ("glu_count", "glu_mass_fx", "glu_top_seq", "glu_top_pos", "glu_top_act")
        }
        for n in range(model.d_mlp):
            for q in range(4):
                mask = counted & (quadrant[:, :, n] == q)
                values = acts[:, :, n][mask]
                assert got["glu_count"][n][q] == mask.sum()
                assert got["glu_mass_fx"][n][q] == int(
                    np.rint(np.abs(values) * np.float32(2**24)).astype(np.int64).sum()
                )
                if not mask.any():
                    assert got["glu_top_seq"][n][q] == -1
                    continue
                rows, pos = np.nonzero(mask)
                best = np.abs(acts[rows, pos, n])
                pick = min(np.flatnonzero(best == best.max()), key=lambda i: (seq_ids[rows[i]], pos[i]))
                assert (got["glu_top_seq"][n][q], got["glu_top_pos"][n][q]) == (seq_ids[rows[pick]], pos[pick])
                assert got["glu_top_act"][n][q] == acts[rows[pick], pos[pick], n]
            assert sum(got["glu_count"][n]) == t.column("count")[n].as_py()
    shards = []
    for i in range(2):
        run_compute(_config(tiny_model_dir, tiny_corpus, tmp_path / f"s{i}", shard=(i, 2)), log=lambda m: None)
        shards.append(tmp_path / f"s{i}")
    for name, order in (("ab", shards), ("ba", shards[::-1])):
        merged = Store.open(merge_stores(order, tmp_path / name))
        for layer in range(model.n_layers):
            a, b = merged.read_layer("neuroscope", layer), store.read_layer("neuroscope", layer)
            for c in ("glu_count", "glu_mass_fx", "glu_top_seq", "glu_top_pos", "glu_top_act"):
                assert a.column(c).equals(b.column(c)), (name, layer, c)


def test_interval_examples_break_ties_by_the_lower_sequence_id():
    """Sequences whose interval keys tie (every score equal here) are kept lowest id first, in
    whatever batches and order they come: the state equals the rule applied to all of them."""
    import torch

    from sitegen.services.neuroscope import stats
    from sitegen.services.neuroscope.compute import IntervalExamples

    gen = np.random.default_rng(5)
    n, T, per, groups = 6, 4, stats.PER_INTERVAL, stats.INTERVAL_GROUPS + 1
    seq_max = (gen.lognormal(0, 1.2, size=(96, n)) * gen.choice([1, -1], size=(96, n), p=[0.8, 0.2])).astype(np.float32)
    ids = gen.permutation(96)
    iv = IntervalExamples(n, T, "cpu")
    for start in range(0, 96, 16):
        rows = slice(start, start + 16)
        acts = torch.from_numpy(np.repeat(seq_max[rows][:, None, :], T, axis=1))
        iv.update(torch.from_numpy(seq_max[rows]), torch.from_numpy(ids[rows]), torch.full((16,), -0.5), acts)
    state = iv.state()
    for u in range(n):
        codes = {int(ids[r]): int(stats.interval_code(seq_max[r, u])) for r in range(96) if seq_max[r, u] > 0}
        top = max(codes.values())
        assert state["top"][u] == top
        for g in range(groups):
            want = sorted(s for s, c in codes.items() if min(top - c, groups - 1) == g)[:per]
            got = sorted(int(s) for s in state["seq_id"][:, g, u] if s >= 0)
            assert got == want, (u, g, got, want)


@pytest.mark.parametrize("all_full", [True, False])
def test_torch_accumulator_std_exact_at_every_scale(all_full):
    """The torch accumulator compute uses: bit-identical raw sums to the numpy reference, and std
    within 1e-4 (relative) of float64 numpy for sigma 1e-4 .. 1e2 (was -70% at sigma 1e-3)."""
    import torch

    from sitegen.services.neuroscope import data as ns_data
    from sitegen.services.neuroscope.compute import LayerAccumulator

    sigmas = np.logspace(-4, 2, 13)
    rng = np.random.default_rng(11)
    S, T, B = 24, 17, 8
    acts = (rng.normal(0, 1, (S, T, len(sigmas))) * sigmas).astype(np.float32)
    lengths = np.full(S, T) if all_full else rng.integers(5, T + 1, S)
    ids = np.arange(S)
    acc = LayerAccumulator(len(sigmas), T, 4, 3, 1, "cpu")
    for start in range(0, S, B):
        rows = slice(start, start + B)
        valid = (np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] < lengths[rows, None])
        acc.update(
            torch.from_numpy(acts[rows]),
            torch.from_numpy(ids[rows]),
            torch.from_numpy(valid),
            torch.zeros(B),
            all_full=all_full,
        )
    got = acc.state()
    table = ns_data.state_to_table(got, 4, 3, dict(zip(ids.tolist(), lengths.tolist())))
    counted = acts[(np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] < lengths[:, None])].astype(np.float64)
    np.testing.assert_allclose(table.column("std").to_numpy(), counted.std(0), rtol=1e-4)
    ref = brute_force_state(acts, lengths, ids, 1, 4, 3, seed=SEED)
    for name in ("sum_fx", "sumsq_fx", "sumsq_lo", "hist"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_three_shards_merge_to_whole_run(whole_run, tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.runner import run_compute
    from sitegen.merge import merge_stores
    from sitegen.store import Store

    parts = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        run_compute(_config(tiny_model_dir, tiny_corpus, out, shard=(i, 3)), log=lambda m: None)
        parts.append(out)
    merged = merge_stores(parts, tmp_path / "merged")
    _assert_same(merged, whole_run)
    a, b = Store.open(merged).manifest, Store.open(whole_run).manifest
    for key in ("processed", "run_hash", "corpus", "config", "services", "shard"):
        assert a[key] == b[key], key


def test_merge_refuses_incomplete_or_foreign_shards(whole_run, tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError
    from sitegen.merge import merge_stores

    s0 = tmp_path / "s0"
    run_compute(_config(tiny_model_dir, tiny_corpus, s0, shard=(0, 2)), log=lambda m: None)
    with pytest.raises(StoreError, match="missing: \\[1\\]"):
        merge_stores([s0], tmp_path / "m1")
    with pytest.raises(StoreError, match="whole store, not a shard"):
        merge_stores([s0, whole_run], tmp_path / "m2")
    other = tmp_path / "other"
    run_compute(_config(tiny_model_dir, tiny_corpus, other, shard=(1, 2), seed=SEED + 1), log=lambda m: None)
    with pytest.raises(StoreError, match="other arguments"):
        merge_stores([s0, other], tmp_path / "m3")
    assert not (tmp_path / "m3").exists() or not any((tmp_path / "m3").iterdir())


def test_resume_after_kill_equals_uninterrupted(whole_run, tiny_model_dir, tiny_corpus, tmp_path):
    """kill -9 a running compute once it has checkpointed; the rerun finishes and equals the whole run."""
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "sitegen",
        "compute",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        str(tiny_corpus),
        "--out",
        str(out),
        "--tokens",
        str(TOKENS),
        "--seq-len",
        str(SEQ_LEN),
        "--seed",
        str(SEED),
        "--top-k",
        str(TOP_K),
        "--random",
        str(N_RANDOM),
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--checkpoint-seconds",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / ".work" / "checkpoint-0of1.npz"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get further, maybe mid-write of the next checkpoint
    assert proc.poll() is None, "compute finished before it could be killed; raise TOKENS"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _assert_same(out, whole_run)
    assert not (out / ".work").exists()


def test_resume_refuses_other_arguments(tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError

    out = tmp_path / "partial"
    from tests.reference import interrupt_after

    with pytest.raises(StoreError, match="interrupted after 8 of"):
        run_compute(_config(tiny_model_dir, tiny_corpus, out), log=lambda m: None, progress=interrupt_after(2))
    before = (out / ".work" / "checkpoint-0of1.npz").read_bytes()
    with pytest.raises(StoreError, match="other arguments"):
        run_compute(_config(tiny_model_dir, tiny_corpus, out, seed=SEED + 1), log=lambda m: None)
    assert (out / ".work" / "checkpoint-0of1.npz").read_bytes() == before  # nothing lost


def test_logit_tables_match_independent_computation(whole_run, tiny_model_dir):
    """W_out . W_U with ln_final's weight folded in, and the input-token activations, recomputed from
    the Hugging Face weights directly (not through transformer-lens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sitegen.store import Store

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    store = Store.open(whole_run)
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            t = store.read_layer("logits", layer)
            w_out = block.mlp.down_proj.weight.T  # (d_mlp, d_model)
            logits = (w_out * hf.model.norm.weight) @ hf.lm_head.weight.T  # (d_mlp, vocab)
            emb = hf.model.embed_tokens.weight
            e = (
                emb
                / torch.sqrt((emb * emb).mean(-1, keepdim=True) + hf.config.rms_norm_eps)
                * block.post_attention_layernorm.weight
            )
            act = torch.nn.functional.silu(e @ block.mlp.gate_proj.weight.T) * (
                e @ block.mlp.up_proj.weight.T
            )  # (vocab, d_mlp)
            for n in range(w_out.shape[0]):
                top = torch.topk(logits[n], 10)
                assert t.column("promoted_ids")[n].as_py() == top.indices.tolist()
                np.testing.assert_allclose(
                    t.column("promoted_vals")[n].as_py(), top.values.numpy(), rtol=1e-4, atol=1e-5
                )
                bottom = torch.topk(-logits[n], 10)
                assert t.column("suppressed_ids")[n].as_py() == bottom.indices.tolist()
                inp = torch.topk(act[:, n], 10)
                assert t.column("input_ids")[n].as_py() == inp.indices.tolist()
                np.testing.assert_allclose(t.column("input_vals")[n].as_py(), inp.values.numpy(), rtol=1e-4, atol=1e-5)


def test_logit_histogram_equals_np_histogram(whole_run, tiny_model_dir):
    """Each neuron's logit histogram (store and API) equals np.histogram(bins=40) of its direct effect
    on every vocabulary logit, W_out[n] . W_U with ln_final's weight folded in, recomputed from the
    Hugging Face weights: counts exactly, edges to the 6 digits the API gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from sitegen.services.logits.render import LogitsLayer
    from sitegen.store import Store

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    store = Store.open(whole_run)
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            view = LogitsLayer(store, layer, site=None)
            logits = ((block.mlp.down_proj.weight.T * hf.model.norm.weight) @ hf.lm_head.weight.T).numpy()
            for n, row in enumerate(logits):
                counts, edges = np.histogram(row, 40)
                got = view.histogram(n)  # the payload's logit_histogram
                assert got["counts"] == counts.tolist(), (layer, n)
                assert sum(got["counts"]) == hf.config.vocab_size
                np.testing.assert_allclose(got["edges"], edges, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_model_dir, tmp_path_factory):
    """A random-init GPT-2 (plain GELU MLP, LayerNorm with biases) on the tiny model's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_inner=40, n_positions=64)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial norm weights, so folding them in matters
        for block in model.transformer.h:
            block.ln_2.weight.uniform_(0.5, 1.5)
            block.ln_2.bias.normal_()
    out = tmp_path_factory.mktemp("tiny-gpt2") / "tiny-gpt2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _assert_connected(tables: dict, outs: list, ins: list) -> None:
    """Every neuron's connected units equal a brute force over the full virtual-weight matrix (float64
    from the HF weights): the 10 largest and 10 smallest weights of each side, largest first."""
    n_layers, n = len(outs), outs[0].shape[0]
    full = np.zeros((n_layers * n, n_layers * n))
    for a in range(n_layers):
        for b in range(a + 1, n_layers):
            full[a * n : (a + 1) * n, b * n : (b + 1) * n] = (
                outs[a].detach().double().numpy() @ ins[b].detach().double().numpy()
            )
    for layer in range(n_layers):
        t = tables[layer]
        for i in range(n):
            g = layer * n + i
            for side, row, units in (
                ("downstream", full[g], np.arange((layer + 1) * n, n_layers * n)),
                ("upstream", full[:, g], np.arange(0, layer * n)),
            ):
                order = sorted(range(len(units)), key=lambda k: (-row[units[k]], units[k]))
                chosen = order if len(order) <= 20 else order[:10] + order[-10:]
                assert t.column(f"{side}_units")[i].as_py() == units[chosen].tolist(), (layer, i, side)
                np.testing.assert_allclose(
                    t.column(f"{side}_weights")[i].as_py(), row[units[chosen]], rtol=1e-4, atol=1e-6
                )


def test_connected_units_equal_brute_force_gated(whole_run, tiny_model_dir):
    """SwiGLU (Llama): W_out[l] . (ln2 weight of m * up_proj of m), from the HF weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from sitegen.store import Store

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    store = Store.open(whole_run)
    tables = {layer: store.read_layer("logits", layer) for layer in range(len(hf.model.layers))}
    with torch.no_grad():
        outs = [b.mlp.down_proj.weight.T for b in hf.model.layers]
        ins = [b.post_attention_layernorm.weight[:, None] * b.mlp.up_proj.weight.T for b in hf.model.layers]
    _assert_connected(tables, outs, ins)


def test_connected_units_equal_brute_force_plain(tiny_gpt2_dir):
    """A plain GELU MLP with LayerNorm: the output direction centred, ln_2's weight folded in."""
    import torch
    from transformers import AutoModelForCausalLM

    from sitegen.compute.models import load_model
    from sitegen.services.logits.compute import weight_tables

    model = load_model(str(tiny_gpt2_dir))
    assert not model.gated_mlp and model.normalization.startswith("LN")
    tables = dict(weight_tables(model))
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32)
    with torch.no_grad():
        outs = [b.mlp.c_proj.weight - b.mlp.c_proj.weight.mean(-1, keepdim=True) for b in hf.transformer.h]
        ins = [b.ln_2.weight[:, None] * b.mlp.c_fc.weight for b in hf.transformer.h]
    _assert_connected(tables, outs, ins)


def test_existing_store_is_never_overwritten(whole_run, tiny_model_dir, tiny_corpus):
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError

    manifest = (whole_run / "manifest.json").read_bytes()
    messages = []
    run_compute(_config(tiny_model_dir, tiny_corpus, whole_run), log=messages.append)  # same arguments: nothing to do
    assert any("already complete" in m for m in messages)
    with pytest.raises(StoreError, match="use a new --out"):
        run_compute(_config(tiny_model_dir, tiny_corpus, whole_run, seed=99), log=lambda m: None)
    assert (whole_run / "manifest.json").read_bytes() == manifest


def test_model_forward_stops_after_the_last_wanted_layer(tiny_model_dir):
    """LoadedModel.run_mlp_activations, the one forward pass of compute, verify and neuron2graph:
    the wanted layers' MLP activations, in layer order, equal to a full run's; the pass ends right
    after the last wanted layer's (no later block and no unembedding runs)."""
    import torch

    from sitegen.compute.models import load_model

    model = load_model(str(tiny_model_dir))
    tok = model.tokenizer
    rows = [
        [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)[:10]
        for text in ("The nation shall trade", "With the world in peace and")
    ]
    ids = np.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    names = [model.hook_name(layer) for layer in range(model.n_layers)]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.from_numpy(ids), names_filter=lambda n: n in names)
    finished: list = []  # the blocks whose forward completed, then the unembedding
    handles = [
        block.register_forward_hook(lambda m, i, o, layer=layer: finished.append(layer))
        for layer, block in enumerate(model.bridge.blocks)
    ]
    handles.append(model.bridge.unembed.register_forward_hook(lambda m, i, o: finished.append("unembed")))
    try:
        for wanted in ([2, 0], [1], [0, 1, 2]):
            got: list = []
            finished.clear()
            model.run_mlp_activations(ids, wanted, lambda layer, acts: got.append((layer, acts.clone())))
            assert [layer for layer, _ in got] == sorted(wanted)
            for layer, acts in got:
                torch.testing.assert_close(acts, cache[names[layer]], rtol=0, atol=0)
            assert finished == list(range(max(wanted))), "block L stops inside its MLP: nothing after it runs"
        finished.clear()
        with torch.inference_mode():
            model.bridge(torch.from_numpy(ids))  # the hooks above do see a full pass
        assert finished == [*range(model.n_layers), "unembed"]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("presses", [1, 2])
def test_interrupt_mid_batch_resumes_exactly(whole_run, tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, presses):
    """Ctrl-C, or a cancelled Ray task (Ray calls _thread.interrupt_main), landing after a batch's
    activations reached the accumulators but before the position moved: one press is held to the end
    of the batch and the checkpoint holds the whole batch; a second press stops at once and keeps the
    previous checkpoint. Either way the rerun equals the uninterrupted run (a checkpoint of a
    half-applied batch would count that batch twice)."""
    import _thread

    from sitegen.compute import runner
    from sitegen.compute.runner import run_compute
    from sitegen.errors import StoreError

    out = tmp_path / "interrupted"
    forward, calls = runner._forward_units, [0]

    def interrupted_forward(*args, **kwargs):
        forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            for _ in range(presses):
                _thread.interrupt_main()
                sum(range(100))  # bytecode between presses: the handler runs for each one

    monkeypatch.setattr(runner, "_forward_units", interrupted_forward)
    checkpoint = out / ".work" / "checkpoint-0of1.npz"
    with pytest.raises(StoreError, match="mid-batch" if presses == 2 else "interrupted after 12 of"):
        run_compute(_config(tiny_model_dir, tiny_corpus, out, checkpoint_seconds=0), log=lambda m: None)
    assert int(np.load(checkpoint)["position"]) == (8 if presses == 2 else 12)  # whole batches of 4 sequences only
    monkeypatch.setattr(runner, "_forward_units", forward)
    run_compute(_config(tiny_model_dir, tiny_corpus, out), log=lambda m: None)
    _assert_same(out, whole_run)


def test_the_runner_seams_are_parameters(tiny_model_dir, tiny_corpus, tmp_path):
    """run_compute(progress=..., on_checkpoint=...): the corpus pass draws its bar through
    `progress` and reports each checkpoint to `on_checkpoint`; the store is the one a plain run writes."""
    from sitegen.compute.runner import run_compute

    bars: list = []
    saved: list[Path] = []

    class Bar:
        def __init__(self, total, initial):
            self.total, self.done, self.closed = total, initial, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    out = tmp_path / "store"
    run_compute(
        _config(tiny_model_dir, tiny_corpus, out, checkpoint_seconds=0),
        log=lambda m: None,
        progress=Bar,
        on_checkpoint=saved.append,
    )
    (bar,) = bars
    from sitegen.store import Store

    processed = Store.open(out).manifest["processed"]
    assert bar.closed and bar.total == bar.done == processed["tokens"]
    batches = -(-processed["sequences"] // BATCH)
    # a checkpoint after every batch but the last (checkpoint_seconds=0), and one before the store is written
    assert saved == [out / ".work" / "checkpoint-0of1.npz"] * batches
