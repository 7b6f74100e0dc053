"""One neuron-selection grammar (sitegen/services/selection.py) for `compute --n2g`,
`explain --neurons` and `verify --neurons`: the same forms, the same one-line errors; N means the
most active neurons (n2g, explain) or a seeded random sample (verify)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sitegen.errors import ConfigError
from sitegen.services.selection import GRAMMAR, parse_selection, sample_neurons, select_neurons

LAYERS, SIZE = 3, 6


class _Store:
    """The one thing select_neurons reads for N: each layer's neuroscope maxima."""

    def __init__(self):
        self.maxima = {layer: np.random.default_rng(layer).permutation(SIZE).astype(float) for layer in range(LAYERS)}

    def read_layer(self, service, layer, columns):
        assert service == "neuroscope" and columns == ["max"]
        return pa.table({"max": self.maxima[layer]})


def _all(store):
    """The three commands' selections of one spec."""
    return {
        "--n2g": select_neurons,
        "--neurons (explain)": lambda *a, **k: select_neurons(*a, option="--neurons", **k),
        "--neurons (verify)": lambda spec, n_layers, d_mlp, store: sample_neurons(spec, n_layers, d_mlp, seed=0),
    }


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", {layer: list(range(SIZE)) for layer in range(LAYERS)}),
        ("layers:2,0", {0: list(range(SIZE)), 2: list(range(SIZE))}),
        (" layers: 1 ", {1: list(range(SIZE))}),
        ("2:5, 0:1,2:3,2:5", {0: [1], 2: [3, 5]}),
    ],
)
def test_every_command_reads_the_forms_alike(spec, expected):
    store = _Store()
    for option, select in _all(store).items():
        assert select(spec, LAYERS, SIZE, store) == expected, option


def test_n_is_the_most_active_for_n2g_and_explain_and_a_seeded_sample_for_verify():
    store = _Store()
    top2 = {layer: sorted(np.argsort(-store.maxima[layer], kind="stable")[:2].tolist()) for layer in range(LAYERS)}
    assert select_neurons("2", LAYERS, SIZE, store) == top2
    assert select_neurons("2@1", LAYERS, SIZE, store, option="--neurons") == {1: top2[1]}
    sample = sample_neurons("2@0,2", LAYERS, SIZE, seed=0)
    assert sorted(sample) == [0, 2] and all(len(v) == 2 for v in sample.values())
    assert (
        sample == sample_neurons("2@0,2", LAYERS, SIZE, seed=0)
        and sample_neurons("2", LAYERS, SIZE, seed=0)[2] == sample[2]
    )
    assert select_neurons("0", LAYERS, SIZE, store) == {}  # --n2g 0: none (the default)
    with pytest.raises(ConfigError, match="^--neurons 0: must be at least 1 neuron per layer$"):
        sample_neurons("0", LAYERS, SIZE, seed=0)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("some", f"use {GRAMMAR}, e.g. OPTION 10"),
        ("-1", f"use {GRAMMAR}, e.g. OPTION 10"),
        ("3:1:2", f"use {GRAMMAR}, e.g. OPTION 10"),
        ("layers:", f"use {GRAMMAR}, e.g. OPTION 10"),
        ("5:0", f"5:0 is not a neuron of this model ({LAYERS} layers x {SIZE})"),
        ("0:6", f"0:6 is not a neuron of this model ({LAYERS} layers x {SIZE})"),
        ("layers:0,3", f"layers must be numbers from 0 to {LAYERS - 1}, e.g. OPTION layers:0,{LAYERS - 1}"),
        ("2@7", f"layers must be numbers from 0 to {LAYERS - 1}, e.g. OPTION layers:0,{LAYERS - 1}"),
    ],
)
def test_one_error_style_for_every_command(spec, problem):
    store = _Store()
    for option, select in _all(store).items():
        flag = option.split()[0]
        with pytest.raises(ConfigError) as e:
            select(spec, LAYERS, SIZE, store)
        assert str(e.value) == f"{flag} {spec}: {problem.replace('OPTION', flag)}", option


def test_a_layer_task_gets_its_part_of_the_selection():
    """--n2g's Ray layer tasks: each runs the selection restricted to its layer, in the same grammar."""
    store = _Store()
    for spec in ("all", "layers:0,2", "2", "2@1,2", "0:1,2:3,2:4"):
        whole = select_neurons(spec, LAYERS, SIZE, store)
        for layer in range(LAYERS):
            part = (
                select_neurons(parse_selection(spec, "--n2g").for_layer(layer), LAYERS, SIZE, store)
                if layer in whole
                else {}
            )
            assert part == ({layer: whole[layer]} if layer in whole else {}), (spec, layer)


def test_compute_checks_the_n2g_form_before_any_work():
    from sitegen.compute.runner import ComputeConfig

    with pytest.raises(ConfigError, match=r"^--n2g 3:x: use 'all'"):
        ComputeConfig(options={"n2g": "3:x"}).validate()
    ComputeConfig(options={"n2g": "3:17,5:2"}).validate()  # the pairs form, as explain and verify read it
