"""A fifth service defined outside sitegen, for tests/test_service_contract.py: per-neuron
activation density (the fraction of counted tokens where the neuron's activation is > 0), split
into the first and the second half of each sequence's positions. Counts are integers, so shards
merge exactly by adding. Its own `sitegen compute` option, --dead-below FRACTION, asks for a stage
recording each layer's neurons active on fewer than that fraction of the tokens (manifest field
`sparsity`). Registered by an entry point (group `sitegen.services`), nothing else: sitegen's own
files never name it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import numpy as np
import pyarrow as pa
from markupsafe import Markup
from pydantic import Field

from sitegen.errors import ConfigError
from sitegen.services.base import (
    LAYER_NEURON,
    NEURON_INDEX_REF,
    Cell,
    Column,
    Service,
    Verification,
    VerifyRun,
    api_envelope,
    api_get,
)
from sitegen.store.manifest import Record

NAME = "sparsity"
_COUNTS = ("tokens", "positive", "early_tokens", "early_positive")
# Its layer table, declared once (Service.table_schema): written by _table, checked by Store.open.
TABLE_SCHEMA = pa.schema([("neuron", pa.int64()), *((k, pa.int64()) for k in _COUNTS)])
EARLY_SHARE = 0.5  # "early": this share of a sequence's positions (recorded in the manifest)


class SparsityRecord(Record):
    """The manifest record this service writes (field `sparsity`); Store.open checks it."""

    early_share: float = Field(gt=0, le=1)
    dead_below: Optional[float] = Field(default=None, gt=0, le=1)  # written by the --dead-below stage
    dead: Optional[list[list[int]]] = None


class _Accumulator:
    def __init__(self, layer_size: int, device: str):
        import torch

        self.counts = {k: torch.zeros(layer_size, dtype=torch.int64, device=device) for k in _COUNTS}

    def update(self, acts, batch) -> None:
        valid = batch.valid
        half = int(acts.shape[1] * EARLY_SHARE)
        for prefix, sl in (("", slice(None)), ("early_", slice(0, half))):
            a, v = acts[:, sl], valid[:, sl]
            self.counts[prefix + "tokens"] += v.sum()
            self.counts[prefix + "positive"] += ((a > 0) & v[..., None]).sum((0, 1))

    def state(self) -> dict:
        return {k: c.cpu().numpy() for k, c in self.counts.items()}

    def load(self, state: dict) -> None:
        import torch

        for k, c in self.counts.items():
            c.copy_(torch.from_numpy(state[k]))

    def table(self) -> pa.Table:
        st = self.state()
        return _table(st)


def _table(st: dict) -> pa.Table:
    n = len(st["positive"])
    return pa.table(
        {"neuron": pa.array(np.arange(n), pa.int64()), **{k: pa.array(np.asarray(st[k]), pa.int64()) for k in _COUNTS}},
        schema=TABLE_SCHEMA,
    )


class _Layer:
    def __init__(self, store, layer, site):
        self.layer = layer
        self.cols = store.read_layer(NAME, layer).to_pydict()

    def payload(self, n: int) -> dict:
        c = {k: self.cols[k][n] for k in _COUNTS}
        late_tokens, late_positive = c["tokens"] - c["early_tokens"], c["positive"] - c["early_positive"]
        return {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "tokens": c["tokens"],
            "positive": c["positive"],
            "density": round(c["positive"] / c["tokens"], 6) if c["tokens"] else None,
            "density_early": round(c["early_positive"] / c["early_tokens"], 6) if c["early_tokens"] else None,
            "density_late": round(late_positive / late_tokens, 6) if late_tokens else None,
        }

    def page(self, n: int) -> dict:
        return self.payload(n)

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.cols["neuron"])}


class _Verifier:
    """`sitegen verify`: the selected neurons' counts recounted from the rerun activations. They
    count every processed token, so they are checked only when the store keeps every processed
    sequence and verify reruns them all; token counts must match exactly, positive counts within
    rtol of the token count (a density is a fraction: its range is 1)."""

    def __init__(self, store, run: VerifyRun):
        self.run, self.checked = run, run.full and run.every_stored
        self.fv = int(store.manifest["config"]["first_valid_position"])
        self.early_share = store.manifest[NAME][
            "early_share"
        ]  # as the store was computed (typed: Store.open checked it)
        self.stored = (
            {
                layer: store.read_layer(NAME, layer).take(pa.array(neurons, pa.int64())).to_pydict()
                for layer, neurons in run.selection.items()
            }
            if self.checked
            else {}
        )
        self.counts = {
            layer: {k: np.zeros(len(neurons), np.int64) for k in _COUNTS} for layer, neurons in run.selection.items()
        }

    def sequences(self):
        return ()  # when it checks, verify reruns every stored sequence anyway

    def update(self, layer, acts, seq_ids, lengths) -> None:
        if not self.checked:
            return
        positions = np.arange(acts.shape[1])
        valid = (positions[None, :] >= self.fv) & (
            positions[None, :] < np.asarray(lengths)[:, None]
        )  # as compute's batch.valid
        half = int(acts.shape[1] * self.early_share)
        c = self.counts[layer]
        for prefix, sl in (("", slice(None)), ("early_", slice(0, half))):
            a, v = acts[:, sl], valid[:, sl]
            c[prefix + "tokens"] += int(v.sum())
            c[prefix + "positive"] += ((a > 0) & v[..., None]).sum((0, 1))

    def finish(self) -> Verification:
        if not self.checked:
            return Verification(
                summary="densities not checked",
                notes=[
                    "sparsity: densities not checked: they count every processed token, so they need the store to keep "
                    "every processed sequence and verify to rerun them all (--full)"
                ],
            )
        failed, lines, largest = [], [], 0.0
        for layer, neurons in sorted(self.run.selection.items()):
            stored, rec = self.stored[layer], self.counts[layer]
            for j, n in enumerate(neurons):
                problems = [
                    f"sparsity: {k} stored {stored[k][j]}, recomputed {rec[k][j]}"
                    for k in ("tokens", "early_tokens")
                    if stored[k][j] != rec[k][j]
                ]
                for k in ("positive", "early_positive"):
                    off = abs(stored[k][j] - int(rec[k][j])) / max(int(rec[k.replace("positive", "tokens")][j]), 1)
                    largest = max(largest, off)
                    if off > self.run.rtol:
                        problems.append(f"sparsity: {k} stored {stored[k][j]}, recomputed {rec[k][j]}")
                if problems:
                    failed.append((layer, n))
                    lines += [f"  FAIL layer {layer} neuron {n}: {p}" for p in problems]
        n = sum(len(v) for v in self.run.selection.values())
        return Verification(
            summary=f"densities of {n} neurons checked, {len(failed)} failed",
            lines=[
                f"sparsity: densities of {n} neurons recounted, largest difference {largest:.3g}, {len(failed)} failed",
                *lines,
            ],
            failed=failed,
            data={"sparsity": {"checked": n, "failed": failed, "max_density_error": largest}},
        )


@click.command("densest")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--layer", type=int, required=True)
def densest(store, layer):
    """Print the layer's most often active neuron and its density (a command this service adds)."""
    from sitegen.store import Store

    t = Store.open(store).read_layer(NAME, layer).to_pydict()
    best = max(range(len(t["neuron"])), key=lambda i: (t["positive"][i], -i))
    click.echo(f"layer {layer} neuron {t['neuron'][best]}: {t['positive'][best] / t['tokens'][best]:.6f}")


class Sparsity(Service):
    name = NAME
    title = "Activation density"
    description = "How often the neuron is active (> 0), over all counted tokens and by position."
    index_blurb = "The fraction of tokens on which each neuron is active, early and late in a sequence."
    table_schema = TABLE_SCHEMA  # Store.open refuses a layer table lacking a column or of another type
    complete_layers = True  # one row per neuron in every layer

    def open_layer(self, store, layer, site):
        return _Layer(store, layer, site)

    def template_dir(self):
        return Path(__file__).parent / "templates"

    def layer_columns(self):
        return [Column("Density")]

    def layer_cells(self, view, n, payload):
        d = payload["density"]
        return [Cell(Markup.escape("" if d is None else f"{d:.1%}"), str(-1 if d is None else d))]

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        return {"tokens": payloads[NAME]["tokens"]}  # the page's Provenance row (templates/provenance/sparsity.html)

    def openapi_paths(self):
        return {
            "/api/{model}/sparsity/{layer}/{neuron}": api_get(
                "A neuron's activation density", api_envelope("#/components/schemas/Sparsity"), LAYER_NEURON
            )
        }

    def openapi_schemas(self):
        return {
            "Sparsity": {
                "type": "object",
                "required": ["neuron_index", "tokens", "positive", "density"],
                "properties": {
                    "neuron_index": {"$ref": NEURON_INDEX_REF},
                    "tokens": {"type": "integer"},
                    "positive": {"type": "integer"},
                    "density": {"type": ["number", "null"]},
                    "density_early": {"type": ["number", "null"]},
                    "density_late": {"type": ["number", "null"]},
                },
            }
        }

    def cli_commands(self):
        return [densest]

    def accumulator(self, layer, run):
        return _Accumulator(run.layer_size, run.device)

    def manifest_records(self):
        return {NAME: {"early_share": EARLY_SHARE}}

    def manifest_schemas(self):
        return {NAME: SparsityRecord}

    def verifier(self, store, run):
        return _Verifier(store, run)

    def merge_tables(self, tables, run):
        parts = [t.to_pydict() for t in tables]
        return _table({k: np.sum([np.asarray(p[k], np.int64) for p in parts], axis=0) for k in _COUNTS})

    def compute_options(self):
        return [
            click.Option(
                ["--dead-below"],
                type=float,
                default=None,
                metavar="FRACTION",
                help="Record each layer's neurons active on fewer than FRACTION of the tokens.",
            )
        ]

    def check_compute_config(self, cfg):
        fraction = cfg.options.get("dead_below")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(
                f"--dead-below {fraction}: must be a fraction of the tokens, above 0 and at most 1, e.g. --dead-below 0.01"
            )

    def stage_requested(self, cfg):
        return cfg.options.get("dead_below") is not None

    def run_stage(self, model, store, cfg, log):
        fraction = cfg.options["dead_below"]
        dead = []
        for layer in range(store.manifest["model"]["num_layers"]):
            t = store.read_layer(NAME, layer).to_pydict()
            dead.append([n for n, p, k in zip(t["neuron"], t["positive"], t["tokens"]) if p < fraction * k])
        store.add_service(NAME, {**store.manifest[NAME], "dead_below": fraction, "dead": dead})
