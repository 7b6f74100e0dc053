"""`sitegen verify`: rerun the model on a store's stored token ids and check what the store claims.

Reads top to bottom:

    open the store -> choose the neurons (a seeded sample per layer, or all) -> ask every service
    the store holds for a verifier (hook `Service.verifier`; a service with nothing to verify has
    none) -> choose the sequences to run (every stored sequence for a small store, else the ones
    the verifiers ask for) -> load the store's model, compare its fingerprints with the manifest's
    -> one forward pass per batch that stops after the last checked layer, each layer's
    activations of the chosen neurons handed to every verifier -> each verifier reports -> one
    report joining them, failures named by layer:neuron.

What is checked is each service's own (its `verifier`, e.g. the stored traces, top-k claims and
statistics of the service that keeps them, in that service's verify.py); this module names no
service and owns only the run: which neurons and sequences, the model and its fingerprints, the
batches, the joined report and its exit status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sitegen.errors import ConfigError, SitegenError
from sitegen.services import registry
from sitegen.services.base import Verification, Verifier, VerifyRun
from sitegen.services.selection import sample_neurons
from sitegen.store import Store

# On a CPU (docs/methods.md, "Why 1e-4"): rerunning in other batches (sizes 1, 3, 5, 7 against
# compute's 4 and 32) and thread counts (1 against 2) reproduces every stored activation bit for bit,
# on the tiny test model and on SmolLM2-135M; the float64 statistics differ from the stored
# fixed-point ones by at most 8.2e-6 of a neuron's range. 1e-4 leaves room for other CPUs and
# kernels (not measured) and still catches a 0.1% change of a neuron's peak.
DEFAULT_RTOL = 1e-4
FULL_RUN_TOKENS = 50_000  # stores with at most this many stored tokens are rerun over every stored sequence
DEFAULT_NEURONS = "8"


class VerificationFailed(SitegenError):
    """The store disagrees with the model beyond the tolerance (the report names where)."""

    stage = "verify"
    exit_code = 1


@dataclass
class VerifyConfig:
    store: Path
    model: str | None = None  # None: the manifest's model source
    neurons: str = DEFAULT_NEURONS
    rtol: float = DEFAULT_RTOL
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None
    full: bool | None = None  # None: every stored sequence when the store is small (FULL_RUN_TOKENS)


@dataclass
class VerifyReport:
    store: Path
    model: dict
    rtol: float
    neurons: list[tuple[int, int]]  # every (layer, neuron) checked
    services: list[tuple[str, Verification]]  # each verifying service's part, in registry order
    notes: list[str]
    problems: list[str]  # store-level: the model's fingerprints, each service's, missing sequences
    seconds: float  # everything, model loading included
    check_seconds: float  # the forward passes and the comparisons: what grows with the neurons checked
    tokens_run: int

    @property
    def failed(self) -> list[tuple[int, int]]:
        """The neurons some service found wrong, (layer, neuron), each once."""
        return sorted({n for _, v in self.services for n in v.failed})

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failed

    def lines(self) -> list[str]:
        """The human-readable report: a header, notes and store-level failures, each service's
        lines (one per layer and per failing neuron), a total."""
        out = [
            f"verify {self.store}: model {self.model.get('name')} ({self.model.get('source')}), tolerance {self.rtol:g} of each "
            "neuron's largest |activation|"
        ]
        out += [f"note: {n}" for n in self.notes]
        out += [f"FAIL: {p}" for p in self.problems]
        for _, v in self.services:
            out += v.lines
        n = len(self.neurons)
        out.append(
            f"{'OK' if self.ok else 'FAILED'}: {'; '.join(v.summary for _, v in self.services)}; "
            f"{self.tokens_run} tokens run; {self.seconds:.1f} s in all, {self.check_seconds:.1f} s checking "
            f"({self.check_seconds / max(n, 1) * 1000:.1f} ms per neuron)"
        )
        return out

    def as_dict(self) -> dict:
        out = {
            "store": str(self.store),
            "model": self.model,
            "rtol": self.rtol,
            "ok": self.ok,
            "notes": self.notes,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "tokens_run": self.tokens_run,
        }
        owner = dict.fromkeys(out, "sitegen")
        for name, v in self.services:
            for key, value in v.data.items():
                if key in owner:
                    raise ConfigError(
                        f"service {name!r} reports the verify field {key!r}, which {owner[key]!r} reports: rename it"
                    )
                owner[key], out[key] = name, value
        return out


def run_verify(cfg: VerifyConfig, log: Callable[[str], None] = lambda m: None) -> VerifyReport:
    """Check a store against its model; returns the report (the CLI prints it and exits non-zero
    when report.ok is false)."""
    if not cfg.rtol > 0:
        raise ConfigError(f"--rtol {cfg.rtol}: must be a positive fraction, e.g. --rtol {DEFAULT_RTOL:g}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be at least 1 (or leave it out for automatic)")
    started = time.perf_counter()
    store = Store.open(cfg.store)
    m = store.manifest
    n_layers, d_mlp, seq_len = int(m["model"]["num_layers"]), int(m["model"]["layer_size"]), int(m["config"]["seq_len"])
    selection = sample_neurons(cfg.neurons, n_layers, d_mlp, cfg.seed)  # N: a random sample, seeded by --seed
    seq_tokens = store.sequence_tokens()
    stored_tokens = sum(len(t) for t in seq_tokens.values())
    full = cfg.full if cfg.full is not None else stored_tokens <= FULL_RUN_TOKENS
    run = VerifyRun(
        selection=selection,
        rtol=cfg.rtol,
        full=full,
        every_stored=len(seq_tokens) == int(m["processed"]["sequences"]),
        seq_tokens=seq_tokens,
    )
    # Before the model loads: a service's damaged table fails fast.
    verifiers: list[tuple[str, Verifier]] = [
        (s.name, v) for s in registry() if s.available(store) and (v := s.verifier(store, run)) is not None
    ]
    if not verifiers:
        raise ConfigError(
            f"{cfg.store}: none of the store's services ({', '.join(m.get('services', []))}) has anything to verify; "
            "verify a store made by sitegen compute"
        )
    wanted = sorted(seq_tokens) if full else sorted({int(s) for _, v in verifiers for s in v.sequences()})
    missing = [s for s in wanted if s not in seq_tokens]
    run_ids = [s for s in wanted if s in seq_tokens]

    from sitegen.compute.models import load_model, resolve_device, weights_fingerprint
    from sitegen.compute.runner import auto_batch_size

    device = resolve_device(cfg.device)
    source = cfg.model or m["model"]["source"]
    log(f"loading model {source}")
    record = m.get("dictionary")  # a dictionary's store: its latents, read through the model it was computed on
    model = load_model(source, device=device, name=record["base_model"] if record else m["model"]["name"])
    if record is not None:
        model = _dictionary_units(model, record, cfg.store, device)
    if (model.n_layers, model.d_mlp) != (n_layers, d_mlp):
        raise ConfigError(
            f"--model {source}: {model.n_layers} layers x {model.d_mlp} neurons, but the store {cfg.store} holds "
            f"{n_layers} x {d_mlp}; pass the model the store was computed with"
        )
    problems, notes = [], []
    if model.fingerprint != m["model"].get("fingerprint"):
        problems.append(
            f"model fingerprint {model.fingerprint} differs from the store's {m['model'].get('fingerprint')}: "
            "this is not the model the store was computed with"
        )
    weights = weights_fingerprint(model)
    if m["model"].get("weights_sha256") is None:
        notes.append(
            "the store records no weights hash (computed before sitegen recorded one); the file fingerprint was compared"
        )
    elif weights != m["model"]["weights_sha256"]:
        problems.append(f"weights hash {weights} differs from the store's {m['model']['weights_sha256']}")
    batch_size = cfg.batch_size or auto_batch_size(device, seq_len)
    loaded = time.perf_counter()
    log(
        f"running {len(run_ids)} sequences through layers {min(selection)}..{max(selection)} ({len(selection)} layers checked)"
    )
    tokens_run = recompute(
        model, [(s, seq_tokens[s]) for s in run_ids], selection, [v for _, v in verifiers], seq_len, batch_size
    )
    services = [(name, v.finish()) for name, v in verifiers]
    # What the services could not check comes first, then the model's note; the model's failures
    # first, then the services', then the sequences no run could have.
    notes = [n for _, v in services for n in v.notes] + notes
    problems += [p for _, v in services for p in v.problems]
    if missing:
        problems.append(f"{len(missing)} referenced sequences are missing from sequences.parquet (e.g. {missing[:3]})")
    model_info = {
        "name": m["model"]["name"],
        "source": source,
        "fingerprint": model.fingerprint,
        "weights_sha256": weights,
    }
    neurons = [(layer, n) for layer, ns in sorted(selection.items()) for n in ns]
    now = time.perf_counter()
    return VerifyReport(
        cfg.store, model_info, cfg.rtol, neurons, services, notes, problems, now - started, now - loaded, tokens_run
    )


def recompute(
    model,
    sequences: list[tuple[int, np.ndarray]],
    selection: dict[int, list[int]],
    verifiers: list[Verifier],
    seq_len: int,
    batch_size: int,
) -> int:
    """Run the sequences in fixed-shape right-padded batches (as compute does), stopping after the
    last selected layer, and hand each selected layer's activations of its selected neurons (float32
    numpy, [rows, seq_len, neurons]) to every verifier. Returns the model-input tokens run (padding
    included)."""
    import torch

    bos = model.bos
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or bos or 0)
    columns = {layer: torch.tensor(neurons, dtype=torch.long) for layer, neurons in selection.items()}
    tokens_run = 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids = np.full((batch_size, seq_len), pad_id, dtype=np.int64)
        for row, (_, toks) in enumerate(batch):
            ids[row, : len(toks)] = toks
        seq_ids, lengths = [s for s, _ in batch], [len(t) for _, t in batch]

        def check(layer: int, acts) -> None:
            chosen = acts[: len(batch)].index_select(2, columns[layer].to(acts.device)).float().cpu().numpy()
            chosen.flags.writeable = False  # one array for every verifier: none may change what the next one sees
            for v in verifiers:
                v.update(layer, chosen, seq_ids, lengths)

        model.run_mlp_activations(ids, selection, check)
        tokens_run += ids.size
    return tokens_run


def _dictionary_units(model, record: dict, store: Path, device: str):
    """The store's dictionary (from the source its manifest records, checked against its sha256)
    as units read through MODEL."""
    import dataclasses

    from sitegen.dictionaries.format import load_dictionary
    from sitegen.dictionaries.units import DictionaryUnits

    d = load_dictionary(record["source"])
    if d.sha256 != record["sha256"]:
        raise ConfigError(
            f"{store}: the dictionary at {record['source']} (sha256 {d.sha256}) is not the one the store was computed "
            f"with ({record['sha256']}); put that dictionary back at {record['source']}"
        )
    return DictionaryUnits(model, dataclasses.replace(d, name=record["name"]), device)
