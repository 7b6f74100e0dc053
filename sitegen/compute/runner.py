"""`sitegen compute`: model + corpus -> store. Reads top to bottom:

    validate config -> open the store (refuse foreign stores, find a checkpoint) -> load model
    -> pack corpus -> stream batches through the model, updating per-layer accumulators
    (checkpointing as it goes) -> weight-based tables -> write the store, manifest last
    -> the stages the arguments ask for (work on the finished store, e.g. graphs).

What is computed is the registered services' business (hooks of sitegen/services/base.py:
`accumulator`, `weight_tables`, `sequences_used`, `manifest_records`, `run_stage`), and so are
their own options (`compute_options`, checked by `check_compute_config`); this module never
names one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import shutil
import signal
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import orjson
import pyarrow as pa

from sitegen import __version__
from sitegen import store as store_mod
from sitegen.corpus import load_corpus
from sitegen.errors import ConfigError, CorpusError, ModelError, StoreError
from sitegen.names import model_name_problem
from sitegen.services import registry
from sitegen.services.base import Batch, CorpusRun, Service
from sitegen.store.manifest import new_manifest

DEFAULT_SEQ_LEN = 32  # see docs/methods.md: "Why 32-token sequences"
MAX_SEQ_LEN = 128


@dataclass
class ComputeConfig:
    model: str = "smollm2"
    corpus: str = "sotu"
    out: Path = Path("store")
    tokens: int = 20_000
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    top_k: int = 20
    n_random: int = 15  # dealt calibration/valid/test by the explainer: 5 random on test, as the reference
    batch_size: int | None = None  # None: chosen from the device
    device: str = "auto"
    shard: tuple[int, int] = (0, 1)
    checkpoint_seconds: float = 300.0
    name: str | None = None
    weights: bool = True  # compute the services made from the weights alone (from_weights); --no-weights skips them
    publish_source: bool = (
        False  # the site may show a local --model/--corpus path as given (else its last component); not in the run hash
    )
    # The services' own compute options (hook compute_options) by parameter name. Only the
    # services' stages read them, so they are kept out of the run hash (a store resumes and is
    # recognised whatever they say) and are checked by the services (hook check_compute_config).
    options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    # Sparse dictionaries (SAEs, transcoders) whose latents the same corpus pass computes (--sae,
    # repeatable): each becomes a store of its own under <out>/dictionaries/<name>/.
    dictionaries: tuple[str, ...] = ()
    # The corpus pass also accumulates each layer's exact Gram matrix of the counted activations
    # (--correlations): a layer-sized matrix product per batch, so off by default. A corpus-pass
    # setting, unlike `options`: part of the run hash when set, read by the services' hook
    # in_corpus_pass.
    correlations: bool = False

    def without_stages(self, **changes) -> "ComputeConfig":
        """This config asking for no stage (a shard task, a check of an existing store): the
        services' options dropped, whose defaults ask for none."""
        return dataclasses.replace(self, options={}, **changes)

    def validate(self) -> None:
        if self.tokens <= 0:
            raise ConfigError(f"--tokens {self.tokens}: must be a positive number of tokens, e.g. --tokens 20000")
        if not 8 <= self.seq_len <= MAX_SEQ_LEN:
            raise ConfigError(f"--seq-len {self.seq_len}: must be between 8 and {MAX_SEQ_LEN}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k}: must be at least 1")
        if self.n_random < 0:
            raise ConfigError(f"--random {self.n_random}: must be 0 or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1 (or leave it out for automatic)")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {i}/{n}: must be I/N with 0 <= I < N, e.g. --shard 0/3")
        if self.name is not None and (problem := model_name_problem(self.name)):
            raise ConfigError(f"--name: {problem}")
        declared = {option.name for service in registry() for option in service.compute_options()}
        if unknown := sorted(set(self.options) - declared):
            raise ConfigError(
                f"compute options {unknown}: no registered service has such an option (they have {sorted(declared)})"
            )
        for service in registry():
            service.check_compute_config(self)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: must be I/N, e.g. --shard 0/3") from None
    return i, n


def _hash(obj: object) -> str:
    return "sha256:" + hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()


@contextmanager
def _lock(work: Path) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(
                f"another 'sitegen compute' is writing {work.parent}; wait for it or use another --out"
            ) from None
        yield


_SCALARS = ("position", "tokens_done", "run_hash")


def _flatten(prefix: str, state: dict, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A nested state dict as flat checkpoint entries: {"<layer>/<service>/<key>[/<key>...]": array}."""
    for key, value in state.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}/{key}", value, out)
        else:
            out[f"{prefix}/{key}"] = np.asarray(value)
    return out


def _save_checkpoint(path: Path, states: list[dict], position: int, tokens_done: int, run_hash: str) -> None:
    arrays: dict[str, np.ndarray] = {"position": np.array(position), "tokens_done": np.array(tokens_done)}
    for layer, st in enumerate(states):
        _flatten(str(layer), st, arrays)
    arrays["run_hash"] = np.array(run_hash)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temporary name
            np.savez(f, **arrays)

    store_mod.atomic_write(
        path, write
    )  # fsync'ed before the rename: a crash keeps the previous checkpoint, never an empty one


def _damaged_checkpoint(path: Path, why: str) -> StoreError:
    return StoreError(
        f"{path}: damaged checkpoint ({why}); delete it to start this run over (its progress is lost), "
        "or put back an intact copy and rerun"
    )


def _read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint, read in full, so a truncated or corrupted file (zip CRCs) fails
    here as one StoreError rather than as whatever numpy or zipfile raise."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _damaged_checkpoint(path, f"{type(e).__name__}: {e}") from None
    for key in _SCALARS:
        if key not in arrays or arrays[key].shape != ():
            raise _damaged_checkpoint(path, f"no scalar {key!r}")
    return arrays


def _load_checkpoint(path: Path, arrays: dict[str, np.ndarray], template: list[dict]) -> tuple[list[dict], int, int]:
    """Per-layer states from a checkpoint of THIS run (check run_hash first), each array checked
    against the shape a fresh accumulator state has (`template`), so a bad file cannot crash later."""
    want: dict[str, np.ndarray] = {}
    for layer, st in enumerate(template):
        _flatten(str(layer), st, want)
    for key in arrays:
        if key not in want and key not in _SCALARS:
            raise _damaged_checkpoint(path, f"unexpected entry {key!r}")
    states: list[dict] = [{} for _ in template]
    for key, ref in want.items():
        got = arrays.get(key)
        if not isinstance(got, np.ndarray) or got.shape != ref.shape or got.dtype.kind != ref.dtype.kind:
            raise _damaged_checkpoint(path, f"entry {key!r} is missing or has the wrong shape")
        layer, *parents, last = key.split("/")
        node = states[int(layer)]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = got
    return states, int(arrays["position"]), int(arrays["tokens_done"])


class _LayerAccumulators:
    """One layer's accumulators, one per service with an `accumulator` hook, behind the single
    `update` the forward hook calls. Their states share the layer's checkpoint entry, each under
    its service's name."""

    def __init__(self, parts: dict, extra: dict | None = None):
        self.parts = parts
        # State-only parts the runner updates itself (a dictionary's quality sums), checkpointed
        # with the rest under names no service can take (service names start with a letter).
        self.extra = extra or {}

    def update(self, acts, batch: Batch) -> None:
        for acc in self.parts.values():
            acc.update(acts, batch)

    def state(self) -> dict:
        return {name: acc.state() for name, acc in {**self.parts, **self.extra}.items()}

    def load(self, state: dict) -> None:
        for name, acc in {**self.parts, **self.extra}.items():
            acc.load(state.get(name, {}))  # an empty state leaves no checkpoint entries


class _FiniteGuard:
    """Which neurons have had a non-finite activation (NaN or +-inf) on a real token (BOS included:
    its activation is in the stored traces), per layer, as a bool tensor on the model's device:
    updated with no device sync per batch, read (`check`) before every checkpoint and before the
    store is written, so neither ever holds one. A float32 overflow is the model's (its weights or
    its arithmetic), not the corpus': the run stops, naming the first such layer and neuron."""

    def __init__(self, n_layers: int, d_mlp: int, first_valid: int, device: str):
        import torch

        self.seen = torch.zeros((n_layers, d_mlp), dtype=torch.bool, device=device)
        self.first_valid = first_valid

    def update(self, layer: int, acts, batch: Batch) -> None:
        import torch

        if batch.all_full:
            real = acts  # every row and position is a real token
        else:
            mask = batch.valid.clone()
            mask[:, : self.first_valid] = (batch.seq_ids >= 0)[:, None]  # the BOS position of real rows
            real = acts[mask]
        # A float64 sum of float32 values is finite exactly when every value is (no finite float32
        # sum can reach float64's range), and one reduction costs a third of isfinite + any.
        total = real.sum(dim=tuple(range(real.dim() - 1)), dtype=torch.float64)
        self.seen[layer] |= ~torch.isfinite(total)

    def check(self, model_spec: str) -> None:
        import torch

        if not bool(self.seen.any()):
            return
        layer, neuron = (int(i) for i in torch.nonzero(self.seen)[0])
        count = int(self.seen.sum())
        raise ModelError(
            f"--model {model_spec}: layer {layer} neuron {neuron} has a non-finite activation (NaN or infinity; "
            f"{count} neuron(s) in all): the model's float32 activations overflow, so its statistics would be "
            "meaningless; check the checkpoint's weights (no store or checkpoint holding them was written)"
        )


def _corpus_services(cfg: ComputeConfig) -> list:
    """The registered services that compute something in the corpus pass CFG describes (hooks
    `accumulator` and `in_corpus_pass`)."""
    return [s for s in registry() if type(s).accumulator is not Service.accumulator and s.in_corpus_pass(cfg)]


def auto_batch_size(device: str, seq_len: int) -> int:
    if device == "cuda":
        return max(8, 8192 // seq_len)
    return max(4, 1024 // seq_len)


class ProgressBar(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def run_compute(
    cfg: ComputeConfig,
    log: Callable[[str], None] = print,
    *,
    progress: Callable[[int, int], ProgressBar] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> Path:
    """Compute the store cfg.out (or resume it, or run the requested stages on a finished one).

    The seams, for a caller that runs this elsewhere (distributed.py's shard tasks) and for tests:
    `progress(total_tokens, tokens_done)` makes the corpus pass's progress bar (an object with
    update(n) and close(); default: a tqdm bar, silent without cfg.progress); `on_checkpoint(path)`
    is called after every checkpoint is saved (the checkpoint file's path)."""
    cfg.validate()
    from sitegen.compute.models import load_model, resolve_device
    from sitegen.compute.packing import bos_id

    out = store_mod.Store(cfg.out)
    existing = None
    if out.exists:  # the one time the store is opened: a complete store's manifest decides what is left to do
        out = store_mod.Store.open(cfg.out)
        existing = out.manifest
    if existing is not None:  # fail fast, before loading anything, when --out holds another model's store
        held = existing.get("model", {})
        if held.get("source") != cfg.model:
            raise StoreError(
                f"--out {cfg.out} already holds a store for model {held.get('name')!r}; use a new --out folder (nothing was changed)"
            )
    device = resolve_device(cfg.device)
    corpus = load_corpus(cfg.corpus)
    if note := corpus.skipped_note():  # links out of a --corpus folder and special files: said once, not read
        log(note)
    if not cfg.progress:  # --quiet silences transformers' own bars too, so an error is the only line on stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = load_model(cfg.model, device=device, name=cfg.name)
    if cfg.name is None and (
        problem := model_name_problem(model.name)
    ):  # the name --model gives, checked before any work
        raise ConfigError(f"--model {cfg.model}: its name {problem}; pass --name NAME")
    dictionaries = _load_dictionaries(cfg, model, device)
    bos = bos_id(model.tokenizer)
    first_valid = 1 if bos is not None else 0
    identity = {
        "model_fingerprint": model.fingerprint,
        "model_name": model.name,
        "corpus_hash": corpus.content_hash,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "tokens": cfg.tokens,
        "top_k": cfg.top_k,
        "n_random": cfg.n_random,
        "bos_token_id": bos,
        "weights": cfg.weights,
    }
    if cfg.correlations:  # only then: stores computed without it keep their run hash
        identity["correlations"] = True
    corpus_services = _corpus_services(cfg)
    _service_records(list(registry()))  # a clash of manifest fields fails here, before any work
    optional = [s.name for s in corpus_services if not s.always_stored]
    if optional:  # only then: stores computed without optional services (plugins) keep their run hash
        identity["services"] = optional
    if dictionaries:  # only then: stores computed without dictionaries keep their run hash
        identity["dictionaries"] = [units.dictionary.sha256 for units in dictionaries]
    run_hash = _hash(identity)
    stages = [s for s in registry() if s.stage_requested(cfg)]
    if existing is not None:
        if existing.get("run_hash") != run_hash or existing.get("shard") != _shard_record(cfg.shard):
            raise StoreError(
                f"--out {cfg.out} already holds a store for model {existing.get('model', {}).get('name')!r} with other arguments; "
                "use a new --out folder (nothing was changed)"
            )
        if not stages:
            log(f"{cfg.out} is already complete for these arguments; nothing to do")
            return cfg.out
    elif (
        out.root.exists()
        and any(p.name not in (store_mod.WORK_DIR, store_mod.LOCK) for p in out.root.iterdir())
        and not out.work_dir.exists()
    ):
        raise StoreError(
            f"--out {cfg.out} is a non-empty folder that is not a sitegen store; choose a new or empty folder"
        )

    done = None
    with _lock(out.work_dir):
        if existing is None:  # the corpus pass; a complete store goes straight to its stages
            done = _corpus_pass(
                cfg,
                out,
                model,
                corpus,
                run_hash,
                identity,
                bos,
                first_valid,
                device,
                corpus_services,
                log,
                progress,
                on_checkpoint,
                dictionaries,
            )
        for (
            svc
        ) in stages:  # add (or finish) the requested stages' work, on the neurons and on every dictionary's latents
            svc.run_stage(model, out, cfg, log)
            for units in dictionaries:
                svc.run_stage(units, store_mod.Store.open(out.dictionary_root(units.dictionary.name)), cfg, log)
    shutil.rmtree(out.work_dir, ignore_errors=True)
    if done:
        log(done)
    return cfg.out


def _load_dictionaries(cfg: ComputeConfig, model, device: str) -> list:
    """The --sae dictionaries as units read through MODEL's forward pass, each checked against the
    model (its width and hook) and given a URL-safe, distinct name, before any work."""
    if not cfg.dictionaries:
        return []
    from sitegen.dictionaries.format import check_fits, load_dictionary
    from sitegen.dictionaries.units import DictionaryUnits

    found: list = []
    for spec in cfg.dictionaries:
        d = load_dictionary(spec)
        check_fits(d, model)
        units = DictionaryUnits(model, d, device)
        if problem := model_name_problem(units.name):
            raise ConfigError(f"--sae {spec}: the latents' name {problem}; rename the dictionary's folder")
        if any(u.dictionary.name == d.name for u in found):
            raise ConfigError(f"--sae {spec}: two dictionaries are named {d.name!r}; rename one of their folders")
        found.append(units)
    model.dictionaries = tuple(u.dictionary for u in found)  # the weight tables relate neurons to their latents
    return found


@dataclass
class _Units:
    """One set of units the corpus pass computes, each into its own store: the model's MLP neurons,
    or one dictionary's latents (`model` a DictionaryUnits; `quality` its quality sums)."""

    model: Any
    out: "store_mod.Store"
    accs: list  # per layer: _LayerAccumulators
    finite: "_FiniteGuard"
    quality: Any = None


def _corpus_pass(
    cfg: ComputeConfig,
    out: "store_mod.Store",
    model,
    corpus,
    run_hash: str,
    identity: dict,
    bos: int | None,
    first_valid: int,
    device: str,
    corpus_services: list,
    log: Callable[[str], None],
    progress: Callable[[int, int], ProgressBar] | None,
    on_checkpoint: Callable[[Path], None] | None,
    dictionaries: list = (),
) -> str:
    """Stream this shard's sequences through the accumulators (from the checkpoint, if any) and
    write the store; returns the run's closing line."""
    from sitegen.compute.packing import pack_sequences

    shard_i, shard_n = cfg.shard
    tokenizer = model.tokenizer
    checkpoint = out.work_dir / f"checkpoint-{shard_i}of{shard_n}.npz"
    sequences = list(pack_sequences(corpus, tokenizer, cfg.seq_len, cfg.tokens, cfg.seed))
    if not sequences:
        raise CorpusError(f"--corpus {cfg.corpus}: no document yields a sequence of at least 4 tokens")
    mine = [s for s in sequences if s.seq_id % shard_n == shard_i]
    n_layers, d_mlp = model.n_layers, model.d_mlp
    corpus_run = CorpusRun(
        layer_size=d_mlp,
        seq_len=cfg.seq_len,
        first_valid=first_valid,
        top_k=cfg.top_k,
        n_random=cfg.n_random,
        seed=cfg.seed,
        seq_lengths={s.seq_id: len(s.token_ids) for s in mine},
        device=device,
        gated_mlp=model.gated_mlp,
    )
    accs = [
        _LayerAccumulators({s.name: s.accumulator(layer, corpus_run) for s in corpus_services})
        for layer in range(n_layers)
    ]
    units = [_Units(model, out, accs, _FiniteGuard(n_layers, d_mlp, first_valid, device))]
    for dict_units in dictionaries:
        from sitegen.dictionaries.units import QualitySums

        d = dict_units.dictionary
        latent_run = dataclasses.replace(corpus_run, layer_size=int(d.d_sae), gated_mlp=False, base_size=d_mlp)
        quality = QualitySums(int(d.d_out), int(d.d_sae))
        latent_accs = _LayerAccumulators(
            {s.name: s.accumulator(0, latent_run) for s in corpus_services}, extra={".quality": quality}
        )
        units.append(
            _Units(
                dict_units,
                store_mod.Store(out.dictionary_root(d.name)),
                [latent_accs],
                _FiniteGuard(1, int(d.d_sae), first_valid, device),
                quality,
            )
        )
    run = _Run(
        cfg=cfg,
        corpus=corpus,
        sequences=sequences,
        mine=mine,
        units=units,
        checkpoint=checkpoint,
        run_hash=run_hash,
        identity=identity,
        bos=bos,
        first_valid=first_valid,
        device=device,
        corpus_services=corpus_services,
        log=log,
        progress=progress or (lambda total, initial: _progress(cfg.progress, total, initial)),
        on_checkpoint=on_checkpoint,
    )
    position, tokens_done = _resume(run)
    position, tokens_done = _stream(run, position, tokens_done)
    _write_store(run, position, tokens_done)
    latents = "".join(f", {u.model.d_mlp} latents of {u.model.dictionary.name}" for u in units[1:])
    return (
        f"done: {cfg.out} ({len(mine)} sequences, {tokens_done} tokens, {n_layers} layers x {d_mlp} neurons{latents})"
    )


@dataclass
class _Run:
    """What the phases of one corpus pass (_resume, _stream, _write_store) share. The model, the
    stores and the accumulators are the units' (units[0]: the neurons)."""

    cfg: ComputeConfig
    corpus: object
    sequences: list  # every packed sequence of the corpus (all shards)
    mine: list  # this shard's
    units: list  # _Units: the neurons first, then each dictionary's latents
    checkpoint: Path
    run_hash: str
    identity: dict  # what the run hash hashes (recorded in the manifest)
    bos: int | None
    first_valid: int
    device: str
    corpus_services: list  # the services with an accumulator, in registry order
    log: Callable[[str], None]
    progress: Callable[[int, int], ProgressBar]
    on_checkpoint: Callable[[Path], None] | None
    loss_sample: Any = None  # _LossSample, made by _stream

    @property
    def tokenizer(self):
        return self.units[0].model.tokenizer

    @property
    def all_accs(self) -> list:
        """Every unit set's per-layer accumulators, in checkpoint order (the neurons' layers first,
        so a store without dictionaries keeps its checkpoint layout)."""
        return [acc for u in self.units for acc in u.accs]

    def check_finite(self) -> None:
        for u in self.units:
            u.finite.check(self.cfg.model)

    def save(self, position: int, tokens_done: int) -> None:
        """Checkpoint the accumulators at `position` (then tell on_checkpoint)."""
        self.loss_sample.flush()  # the queued loss rows are applied, never left out of a checkpoint
        _save_checkpoint(self.checkpoint, [a.state() for a in self.all_accs], position, tokens_done, self.run_hash)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint)


def _resume(run: _Run) -> tuple[int, int]:
    """Load this run's checkpoint into the accumulators, if there is one; (sequences done, tokens done)."""
    accs, mine, checkpoint, work = run.all_accs, run.mine, run.checkpoint, run.units[0].out.work_dir
    position = tokens_done = 0
    if checkpoint.exists():
        arrays = _read_checkpoint(checkpoint)
        if str(arrays["run_hash"]) != run.run_hash:  # before anything else: another model's checkpoint has other shapes
            raise StoreError(
                f"{work} holds an unfinished run started with other arguments; rerun that command, "
                f"or delete {work} to start over"
            )
        states, position, tokens_done = _load_checkpoint(checkpoint, arrays, [a.state() for a in accs])
        if not (0 <= position <= len(mine) and 0 <= tokens_done):
            raise _damaged_checkpoint(checkpoint, f"position {position} is outside this run's {len(mine)} sequences")
        for acc, st in zip(accs, states):
            acc.load(st)
        run.log(f"resuming {run.cfg.out}: {position} of {len(mine)} sequences already done")

    return position, tokens_done


def _stream(run: _Run, position: int, tokens_done: int) -> tuple[int, int]:
    """The corpus pass from `position` on, in fixed-shape batches, checkpointed every
    cfg.checkpoint_seconds and on Ctrl-C; returns (sequences done, tokens done)."""
    from sitegen.corpus_keys import random_key

    cfg, mine, device, first_valid = run.cfg, run.mine, run.device, run.first_valid
    batch_size = cfg.batch_size or auto_batch_size(device, cfg.seq_len)
    pad_id = int(getattr(run.tokenizer, "pad_token_id", None) or run.bos or 0)
    total_tokens = sum(len(s.token_ids) for s in mine)
    run.loss_sample = _LossSample(run, pad_id)
    n_layers = len(run.units[0].accs)
    run.log(f"corpus pass: {len(mine)} sequences, {total_tokens} tokens, {n_layers} layers, batches of {batch_size}")
    bar = run.progress(total_tokens, tokens_done)
    last_save = time.monotonic()
    guard = _BatchGuard()
    try:
        with guard.installed():
            while position < len(mine):
                batch = mine[position : position + batch_size]
                tokens, seq_ids, valid, rand_score, interval_score = _batch_tensors(
                    batch, batch_size, cfg.seq_len, pad_id, first_valid, cfg.seed, random_key, device
                )
                all_full = len(batch) == batch_size and all(len(s.token_ids) == cfg.seq_len for s in batch)
                with guard.batch():  # the accumulators and the position move together, or the checkpoint lies
                    _forward_units(run.units, tokens, seq_ids, valid, rand_score, interval_score, all_full)
                    run.loss_sample.add(tokens, valid, rand_score)
                    position += len(batch)
                    done = sum(len(s.token_ids) for s in batch)
                    tokens_done += done
                bar.update(done)
                if time.monotonic() - last_save > cfg.checkpoint_seconds and position < len(mine):
                    run.check_finite()
                    run.save(position, tokens_done)
                    last_save = time.monotonic()
    except KeyboardInterrupt:
        if guard.in_batch:  # a second Ctrl-C mid-batch: the accumulators hold part of a batch; keep the last checkpoint
            raise StoreError(
                f"interrupted mid-batch; rerun the same command to resume from the last checkpoint ({run.checkpoint})"
            ) from None
        run.check_finite()
        run.save(position, tokens_done)
        raise StoreError(
            f"interrupted after {position} of {len(mine)} sequences; rerun the same command to resume"
        ) from None
    finally:
        bar.close()
    return position, tokens_done


class _BatchGuard:
    """Holds a Ctrl-C that arrives mid-batch until the batch is applied, so the checkpoint written on
    interrupt never holds a half-applied batch (which a resume would apply again). A cancelled Ray
    task is interrupted the same way (Ray calls _thread.interrupt_main, which runs the SIGINT handler).
    A second Ctrl-C stops at once, and then nothing is saved. Python runs signal handlers in the
    main thread only, so elsewhere the guard only records whether a batch was in progress."""

    def __init__(self) -> None:
        self.in_batch = False
        self.held = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = (
            signal.signal(signal.SIGINT, self._on_sigint) or signal.default_int_handler
        )  # None: set outside Python
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002 - the signal handler signature
        if self.in_batch and not self.held:
            self.held = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def batch(self) -> Iterator[None]:
        self.in_batch = True
        yield  # not in a finally: an exception mid-batch leaves in_batch set, which is the truth
        self.in_batch = False
        if self.held:
            raise KeyboardInterrupt


def _write_store(run: _Run, position: int, tokens_done: int) -> None:
    """Every unit set's store: each dictionary's under <out>/dictionaries/<name>/, then the neurons'
    (its manifest last: its presence marks the whole store, dictionaries included, complete)."""
    run.check_finite()  # before anything is saved: a checkpoint or a store never holds a NaN or an infinity
    run.save(position, tokens_done)  # the write stage can fail; keep the work
    run.log(f"writing store {run.cfg.out}")
    for u in run.units[1:]:
        from sitegen.dictionaries.units import dictionary_record

        _write_units(run, u, tokens_done, {"dictionary": dictionary_record(u.model, u.quality)})
    names = [u.model.dictionary.name for u in run.units[1:]]
    _write_units(run, run.units[0], tokens_done, {"dictionaries": names} if names else {})


def _write_units(run: _Run, u: _Units, tokens_done: int, records: dict) -> None:
    """One unit set's tables, the sequences they refer to, the vocabulary, and its manifest last."""
    cfg, out, model, tokenizer, corpus, mine = run.cfg, u.out, u.model, run.tokenizer, run.corpus, run.mine
    shard_i = cfg.shard[0]
    referenced: set[int] = set()  # the sequences some table refers to: the store keeps these

    def write(svc: Service, layer: int, table: pa.Table) -> None:
        referenced.update(svc.sequences_used(table))
        out.write_layer(svc.name, layer, table)

    written = list(run.corpus_services)
    for svc in run.corpus_services:
        for layer, acc in enumerate(u.accs):
            write(svc, layer, acc.parts[svc.name].table())
    if cfg.weights and shard_i == 0:  # corpus-independent: the first shard computes them, merge copies them
        for svc in (s for s in registry() if s.from_weights):
            run.log(f"computing {svc.name} from the weights" + (f" ({model.name})" if u is not run.units[0] else ""))
            tables = 0
            with _stage_bar(cfg.progress, model.n_layers, f"{svc.name} from the weights", "layer") as bar:
                for layer, table in svc.weight_tables(model):
                    write(svc, layer, table)
                    tables += 1
                    bar.update(1)
            if tables:  # a service with nothing to say about these units (no dictionary at any layer) is not listed
                written.append(svc)
    out.write_sequences(_sequences_table([s for s in mine if s.seq_id in referenced]))
    out.write_vocab(display_tokens(tokenizer, model.d_vocab))
    from sitegen.compute.models import weights_fingerprint

    out.write_manifest(
        new_manifest(
            model={**model.metadata, "weights_sha256": weights_fingerprint(model)},
            corpus={
                "name": corpus.name,
                "source": cfg.corpus,
                "content_hash": corpus.content_hash,
                "source_kind": "embedded" if cfg.corpus == "sotu" else "hub" if corpus.documents is None else "local",
                "sequences_total": len(run.sequences),
                "tokens_total": sum(len(s.token_ids) for s in run.sequences),
            },
            processed={"sequences": len(mine), "tokens": tokens_done},
            config={
                "seq_len": cfg.seq_len,
                "seed": cfg.seed,
                "tokens": cfg.tokens,
                "top_k": cfg.top_k,
                "n_random": cfg.n_random,
                "bos_token_id": run.bos,
                "first_valid_position": run.first_valid,
            },
            run_hash=run.run_hash,
            shard=_shard_record(cfg.shard),
            services=[s.name for s in written],
            identity=run.identity,
            versions=_versions(),
            publish_source=cfg.publish_source,
            **records,
            **_service_records(written),
        )
    )


# Top-level manifest fields the runner writes itself (and the stamps encode() adds).
_OWN_FIELDS = frozenset(
    {
        "model",
        "corpus",
        "processed",
        "config",
        "run_hash",
        "shard",
        "services",
        "identity",
        "versions",
        "publish_source",
        "dictionaries",
        "dictionary",
        "schema_version",
        "sitegen_version",
    }
)


def _service_records(services: list[Service]) -> dict:
    """The top-level manifest fields the store's services contribute (hook manifest_records). A
    field the runner writes, a service's name (its record's place) or another service's field is refused."""
    taken = {name: "sitegen" for name in _OWN_FIELDS} | {s.name: s.name for s in registry()}
    records: dict = {}
    for svc in services:
        for key, value in svc.manifest_records().items():
            owner = records[key][0] if key in records else taken.get(key)
            if owner is not None and owner != svc.name:
                raise ConfigError(
                    f"service {svc.name!r} writes the manifest field {key!r}, which {owner!r} writes; "
                    "rename that field (or uninstall one of them)"
                )
            records[key] = (svc.name, value)
    return {key: value for key, (_, value) in records.items()}


def _shard_record(shard: tuple[int, int]) -> dict | None:
    return None if shard[1] == 1 else {"index": shard[0], "count": shard[1]}


def _versions() -> dict:
    from importlib.metadata import version

    import torch
    import transformer_lens  # noqa: F401

    # sitegen's own version as well: the manifest's top-level sitegen_version is rewritten by every
    # later writer (a service's command or stage), this one stays the version that computed the activations.
    return {
        "sitegen": __version__,
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
    }


def _progress(enabled: bool, total: int, initial: int):
    """The corpus pass's bar (tokens), the default of run_compute's `progress` seam."""
    return _stage_bar(enabled, total, "corpus pass", "tok", initial=initial, unit_scale=True, smoothing=0.1)


def _stage_bar(enabled: bool, total: int, desc: str, unit: str, **options):
    """A stage's bar (done/total, rate, ETA), so no stage runs silent for minutes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, desc=desc, **options)


def _batch_tensors(batch, batch_size, seq_len, pad_id, first_valid, seed, random_key, device):
    """Fixed-shape (batch_size, seq_len) inputs: padding rows and positions keep every batch's shape
    identical, so a sequence's activations do not depend on which batch (or shard) it landed in."""
    import torch

    from sitegen.corpus_keys import interval_key

    tokens = np.full((batch_size, seq_len), pad_id, dtype=np.int64)
    seq_ids = np.full(batch_size, -1, dtype=np.int64)
    valid = np.zeros((batch_size, seq_len), dtype=bool)
    rand_score = np.full(batch_size, -np.inf, dtype=np.float32)
    interval_score = np.full(batch_size, -np.inf, dtype=np.float32)
    for row, s in enumerate(batch):
        n = len(s.token_ids)
        tokens[row, :n] = s.token_ids
        seq_ids[row] = s.seq_id
        valid[row, first_valid:n] = True
        rand_score[row] = -np.float32(random_key(seed, s.seq_id))
        interval_score[row] = -np.float32(interval_key(seed, s.seq_id))
    as_t = lambda a: torch.from_numpy(a).to(device)
    return as_t(tokens), as_t(seq_ids), as_t(valid), as_t(rand_score), as_t(interval_score)


def _forward_units(units: list, tokens, seq_ids, valid, rand_score, interval_score, all_full: bool = False) -> None:
    """One batch through the model, once: every layer's MLP activations into the neurons'
    accumulators, and each dictionary's latents (its encoder at its hook) into its own, with its
    quality sums (reconstruction error against the hooked activation, or for a transcoder the
    activation at its output hook)."""
    batch = Batch(valid=valid, seq_ids=seq_ids, rand_score=rand_score, interval_score=interval_score, all_full=all_full)
    neurons = units[0]
    gated = neurons.model.gated_mlp
    pre: dict = {}  # a gated MLP's (layer, "gate" / "up") pre-activations, until its hook_post comes
    # The neuron activations of the layers dictionaries read at, kept for the latents' accumulators
    # (Batch.base), which run once the forward pass is done: a dictionary may read before its layer's MLP.
    base: dict = dict.fromkeys(u.model.layer for u in units[1:])
    latents: list = []  # (units, latents) of each dictionary, from its hook

    def on_layer(layer: int):
        def update(acts) -> None:
            neurons.finite.update(layer, acts, batch)
            if gated:
                layer_batch = dataclasses.replace(batch, gate=pre.pop((layer, "gate")), up=pre.pop((layer, "up")))
            else:
                layer_batch = batch
            neurons.accs[layer].update(acts, layer_batch)
            if layer in base:
                base[layer] = acts.detach().clone()

        return update

    def keep(layer: int, which: str):
        return lambda acts: pre.__setitem__((layer, which), acts)

    hooks = []
    for layer in range(len(neurons.accs)):
        if gated:
            gate_hook, up_hook = neurons.model.glu_hook_names(layer)
            hooks += [(gate_hook, keep(layer, "gate")), (up_hook, keep(layer, "up"))]
        hooks.append((neurons.model.hook_name(layer), on_layer(layer)))
    for u in units[1:]:
        hooks += _dictionary_hooks(u, batch, latents)
    neurons.model.run_hooks(tokens, hooks)
    for u, z in latents:
        u.accs[0].update(z, dataclasses.replace(batch, base=base[u.model.layer]))


def _dictionary_hooks(u: _Units, batch: Batch, latents: list) -> list:
    d = u.model.dictionary
    seen: dict = {}

    def on_input(x) -> None:
        z = d.encode(x)
        u.finite.update(0, z, batch)
        latents.append((u, z))
        if d.hook_out is None:
            u.quality.update(x, z, d.decode(z), batch.valid)
        else:
            seen["x"], seen["z"] = x, z

    def on_output(target) -> None:
        u.quality.update(target, seen["z"], d.decode(seen["z"], seen["x"]), batch.valid)
        seen.clear()

    return [(d.hook_name, on_input)] + ([(d.hook_out, on_output)] if d.hook_out is not None else [])


class _LossSample:
    """The dictionaries' next-token loss, clean and with each reconstruction spliced in, on the
    sequences whose random key is below LOSS_FRACTION: queued as the pass meets them and run in
    fixed-shape batches of LOSS_BATCH rows (padding rows masked), so each row's losses do not
    depend on which rows it shared a batch with, and the sums stay exact across shard splits."""

    def __init__(self, run: "_Run", pad_id: int):
        self.dictionaries = run.units[1:]
        self.pad_id = pad_id
        self.first_valid = run.first_valid
        self.rows: list = []  # (tokens row, valid row)

    def add(self, tokens, valid, rand_score) -> None:
        if not self.dictionaries:
            return
        from sitegen.dictionaries.units import LOSS_BATCH, LOSS_FRACTION

        picked = (-rand_score < LOSS_FRACTION).nonzero().flatten().tolist()  # padding rows have -inf: never
        self.rows += [(tokens[i], valid[i]) for i in picked]
        while len(self.rows) >= LOSS_BATCH:
            self._run(self.rows[:LOSS_BATCH])
            self.rows = self.rows[LOSS_BATCH:]

    def flush(self) -> None:
        if self.rows:
            self._run(self.rows)
            self.rows = []

    def _run(self, rows: list) -> None:
        import torch

        from sitegen.dictionaries.units import LOSS_BATCH

        tokens = torch.stack([t for t, _ in rows])
        valid = torch.stack([v for _, v in rows])
        if len(rows) < LOSS_BATCH:  # fixed shape: pad with masked rows
            n = LOSS_BATCH - len(rows)
            tokens = torch.cat(
                [tokens, torch.full((n, tokens.shape[1]), self.pad_id, dtype=tokens.dtype, device=tokens.device)]
            )
            valid = torch.cat([valid, torch.zeros((n, valid.shape[1]), dtype=valid.dtype, device=valid.device)])
        counted = valid[:, :-1] & valid[:, 1:]  # predictions from a counted position of a counted token
        base = self.dictionaries[0].model.base
        clean = base.next_token_loss(tokens)
        for u in self.dictionaries:
            spliced = base.next_token_loss(tokens, _splice(u.model.dictionary, self.first_valid))
            u.quality.update_loss(clean, spliced, counted)


def _splice(d, first_valid: int) -> list:
    """The hooks that replace what dictionary D reconstructs with its reconstruction (the BOS
    position keeps its own activation: its norm is far outside what a dictionary is trained on)."""
    seen: dict = {}

    def keep_bos(recon, original):
        recon[:, :first_valid] = original[:, :first_valid]
        return recon

    if d.hook_out is None:
        return [(d.hook_name, lambda x: keep_bos(d.decode(d.encode(x)), x))]

    def capture(x):
        seen["x"] = x
        return x

    return [(d.hook_name, capture), (d.hook_out, lambda out: keep_bos(d.decode(d.encode(seen["x"]), seen["x"]), out))]


def display_tokens(tokenizer, vocab_size: int) -> list[str]:
    """Each token id as the text it stands for (' the', not 'Ġthe'). Ids past the tokenizer's own
    vocabulary (padding rows of the embedding) show as <id>."""
    n = min(vocab_size, len(tokenizer))
    tokens = tokenizer.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return tokens + [f"<{i}>" for i in range(n, vocab_size)]


def _sequences_table(seqs) -> pa.Table:
    seqs = sorted(seqs, key=lambda s: s.seq_id)
    offsets = np.concatenate([[0], np.cumsum([len(s.token_ids) for s in seqs])]).astype(np.int32)
    values = np.concatenate([s.token_ids for s in seqs]) if seqs else np.zeros(0, np.int32)
    return pa.table(
        {
            "seq_id": pa.array([s.seq_id for s in seqs], pa.int64()),
            "doc_id": pa.array([s.doc_id for s in seqs], pa.string()),
            "char_start": pa.array([s.char_start for s in seqs], pa.int64()),
            "char_end": pa.array([s.char_end for s in seqs], pa.int64()),
            "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())),
        },
        schema=store_mod.SEQUENCES_SCHEMA,
    )
