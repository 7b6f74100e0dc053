"""`sitegen verify` on the tiny random-init model: a fresh store passes; a store whose stored
activations were changed by 1% fails, naming the layer and neuron; the model recorded in the
manifest is the default and its weights hash is checked."""

from __future__ import annotations

import re
import shutil

import numpy as np
import orjson
import pyarrow as pa
import pytest
from click.testing import CliRunner

from tests.conftest import HAS_TORCH

pytestmark = [pytest.mark.model, pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")]

# Small enough that the top/bottom/random lists reference every sequence, so verify reruns every
# processed sequence and checks the statistics too (the full check).
SEQ_LEN, TOKENS, TOP_K, N_RANDOM, SEED = 16, 400, 5, 3, 2


@pytest.fixture(scope="module")
def fresh_store(tiny_model_dir, tiny_corpus, tmp_path_factory):
    from sitegen.compute.runner import ComputeConfig, run_compute

    out = tmp_path_factory.mktemp("verify") / "store"
    run_compute(
        ComputeConfig(
            model=str(tiny_model_dir),
            corpus=str(tiny_corpus),
            out=out,
            tokens=TOKENS,
            seq_len=SEQ_LEN,
            seed=SEED,
            top_k=TOP_K,
            n_random=N_RANDOM,
            batch_size=4,
            device="cpu",
            progress=False,
            weights=False,
        ),
        log=lambda m: None,
    )
    return out


def _verify(store, *args):
    from sitegen.cli import main

    return CliRunner().invoke(main, ["verify", str(store), "--neurons", "all", *args])


def test_manifest_records_provenance(fresh_store, tiny_model_dir):
    from sitegen import __version__
    from sitegen.compute.models import load_model, weights_fingerprint
    from sitegen.store import Store

    m = Store.open(fresh_store).manifest
    model = load_model(str(tiny_model_dir))
    assert m["model"]["weights_sha256"] == weights_fingerprint(model)
    assert m["model"]["weights_sha256"].startswith("sha256:") and len(m["model"]["weights_sha256"]) == 7 + 64
    assert m["versions"]["sitegen"] == __version__


def test_fresh_store_passes_with_every_check(fresh_store, tmp_path):
    report = tmp_path / "report.json"
    result = _verify(fresh_store, "--batch-size", "3", "--json", str(report))  # other batches than compute's 4
    assert result.exit_code == 0, result.output
    assert "OK: 144 neurons checked, 0 failed" in result.output
    assert "correlation" not in result.output  # a store without --correlations: verify as before
    r = orjson.loads(report.read_bytes())
    assert r["ok"] and not r["problems"]
    neurons = [n for layer in r["layers"] for n in layer["neurons"]]
    assert len(neurons) == 3 * 48
    # the full check ran: every sequence rerun, statistics compared, ranks checked
    assert all(
        n["stats"] is not None and n["stats"]["recomputed"]["count"] == n["stats"]["stored"]["count"] for n in neurons
    )
    assert all(n["top_unbeaten"] and n["top_order"] and n["bottom_unbeaten"] for n in neurons)
    assert r["max_rel_error"] <= 1e-4


def test_one_percent_change_fails_naming_the_neuron(fresh_store, tmp_path):
    from sitegen.store import Store

    broken = tmp_path / "broken"
    shutil.copytree(fresh_store, broken)
    st = Store.open(broken)
    layer, neuron = 1, 7
    t = st.read_layer("neuroscope", layer)
    acts = t.column("top_acts").to_pylist()
    acts[neuron] = [
        [a * 1.01 for a in trace] for trace in acts[neuron]
    ]  # 1% on every stored top activation of one neuron
    st.write_layer(
        "neuroscope",
        layer,
        t.set_column(t.schema.get_field_index("top_acts"), "top_acts", pa.array(acts, t.schema.field("top_acts").type)),
    )
    result = _verify(broken)
    assert result.exit_code == 1, result.output
    fails = [line for line in result.output.splitlines() if "FAIL layer" in line]
    assert fails and all(line.strip().startswith(f"FAIL layer {layer} neuron {neuron}:") for line in fails), (
        result.output
    )
    # 1% of each stored value, reported as a fraction of the neuron's largest |activation| (which
    # may be its minimum, so at most 0.01)
    err = float(re.search(r"activations differ by ([0-9.e-]+) of the neuron's range", result.output).group(1))
    assert 1e-3 < err <= 0.0101
    assert "1 of 144 neurons differ" in result.output


def test_changed_stats_and_order_fail(fresh_store, tmp_path):
    """A stored mean off by 1% of the range, and two top sequences swapped, are both caught."""
    from sitegen.store import Store

    broken = tmp_path / "broken"
    shutil.copytree(fresh_store, broken)
    st = Store.open(broken)
    t = st.read_layer("neuroscope", 2)
    rows = t.to_pylist()
    rows[3]["mean"] += 0.01 * max(abs(rows[3]["max"]), abs(rows[3]["min"]))
    for key in ("top_seq", "top_max", "top_acts"):
        rows[5][key][0], rows[5][key][1] = rows[5][key][1], rows[5][key][0]
    st.write_layer("neuroscope", 2, pa.Table.from_pylist(rows, schema=t.schema))
    result = _verify(broken, "--neurons", "2:3,2:5,0:0")
    assert result.exit_code == 1, result.output
    assert "FAIL layer 2 neuron 3: stats: mean stored" in result.output
    assert "FAIL layer 2 neuron 5: top sequences out of order" in result.output
    assert "neuron 0:" not in result.output


def test_interval_examples_are_rerun_and_held_to_their_intervals(fresh_store, tmp_path):
    """An interval example's trace is checked like a top one (1% off fails), and an example filed
    in the wrong group (its maximum outside that group's interval) fails, naming it."""
    from sitegen.store import Store

    t = Store.open(fresh_store).read_layer("neuroscope", 0)
    rows = t.to_pylist()
    j = next(i for i, r in enumerate(rows) if len(set(r["interval_group"])) >= 2)
    for tamper in ("trace", "group"):
        broken = tmp_path / tamper
        shutil.copytree(fresh_store, broken)
        changed = [dict(r) for r in rows]
        r = changed[j]
        if tamper == "trace":
            r["interval_acts"] = [[a * 1.01 for a in trace] for trace in r["interval_acts"]]
        else:  # the first example moved to another group's interval
            other = next(g for g in r["interval_group"] if g != r["interval_group"][0])
            r["interval_group"] = [other] + r["interval_group"][1:]
        Store.open(broken).write_layer("neuroscope", 0, pa.Table.from_pylist(changed, schema=t.schema))
        result = _verify(broken, "--neurons", f"0:{j},0:{(j + 1) % len(rows)}")
        assert result.exit_code == 1, result.output
        fails = [line for line in result.output.splitlines() if "FAIL layer" in line]
        assert fails and all(line.strip().startswith(f"FAIL layer 0 neuron {j}:") for line in fails), result.output
        if tamper == "trace":
            assert "activations differ" in result.output and "interval #" in result.output
        else:
            assert "outside its interval" in result.output


def test_other_model_is_refused_by_fingerprint(fresh_store, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(other)
    result = _verify(fresh_store, "--model", str(other), "--neurons", "0:0")
    assert result.exit_code == 1
    assert "FAIL: weights hash" in result.output and "FAIL: model fingerprint" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--neurons", "9:0"], "--neurons 9:0: 9:0 is not a neuron"),
        (["--neurons", "some"], "--neurons some: use 'all', 'layers:0,5', N"),
        (["--rtol", "0"], "--rtol 0.0: must be a positive fraction"),
    ],
)
def test_bad_options_get_one_line(fresh_store, args, message):
    result = _verify(fresh_store, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_sampled_neurons_are_reproducible():
    from sitegen.services.selection import sample_neurons

    a = sample_neurons("4", 3, 48, seed=0)
    assert a == sample_neurons("4", 3, 48, seed=0) and a != sample_neurons("4", 3, 48, seed=1)
    assert all(len(v) == 4 and len(set(v)) == 4 and all(0 <= n < 48 for n in v) for v in a.values())
    assert np.array_equal(sorted(a), [0, 1, 2])


def test_a_store_with_nothing_to_verify_gets_one_line(fresh_store, monkeypatch):
    """No service of the store has a verifier: one line, exit 2, before the model is loaded."""
    from sitegen.services.neuroscope.service import Neuroscope

    monkeypatch.setattr(Neuroscope, "verifier", lambda self, store, run: None)
    result = _verify(fresh_store)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: {fresh_store}: none of the store's services (neuroscope) has anything to verify; "
        "verify a store made by sitegen compute"
    ]
