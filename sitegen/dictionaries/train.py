"""`sitegen train-sae`: a TopK sparse autoencoder (Gao et al. 2024) trained offline on activations
harvested from the same corpus packing as `sitegen compute`.

Pipeline: pack the corpus (compute's packing, seed and sequence length) -> split the sequences by
id (every HELDOUT_EVERY-th is held out) -> harvest the hook's activations at every position but
the BOS one (chunks kept in OUT/.work/, so an interrupted harvest resumes) -> train (`train_topk`,
a function of an activation tensor; checkpoints in OUT/.work/) -> evaluate on the held-out tokens
(L0, FVU, dead fraction, next-token loss with the reconstruction spliced in) -> write OUT/cfg.json
and OUT/sae_weights.safetensors (SAELens's format) and OUT/training.json; .work/ is removed.

The trainer: decoder rows at unit norm (the gradient component parallel to each row removed
before every Adam step, the rows renormalised after it), encoder initialised as the decoder's
transpose, b_dec at the geometric median of a sample (Weiszfeld), TopK activation (ReLU of the k
largest pre-activations), loss = MSE + AUXK_COEF * AuxK (the top k_aux dead latents reconstruct
the main reconstruction's error; a latent is dead after `dead_tokens` training tokens without
firing), Adam, no L1. Inputs are scaled by one constant so that their mean squared norm is d_in
while training; the scale is folded into the saved weights (decoder rows stay at unit norm and
latents are in the activation's own units).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from sitegen.dictionaries.format import (
    CFG_FILE,
    WEIGHTS_FILE,
    Dictionary,
    load_dictionary,
    save_dictionary,
    url_safe_name,
)
from sitegen.errors import ConfigError, StoreError

HELDOUT_EVERY = 10  # sequence ids i with i % 10 == 9 are held out for the report
AUXK_COEF = 1 / 32  # Gao et al.'s AuxK coefficient
ADAM_EPS = 6.25e-10  # Gao et al.'s Adam epsilon
DECAY_FRACTION = 0.2  # the learning rate decays linearly to 0 over the last fifth of the steps
MEDIAN_SAMPLE = 4096  # tokens the geometric median of b_dec is computed on
MEDIAN_ITERATIONS = 20
HARVEST_CHUNK = 256  # sequences per harvested chunk file (the unit an interrupted harvest resumes from)
MAX_SEQ_LEN = 128
TRAINING_FILE = "training.json"


# --- the training core (no model) ---


@dataclass(frozen=True)
class TrainOptions:
    d_sae: int
    k: int
    batch_size: int = 1024
    lr: float | None = None  # None: Gao et al.'s 2e-4 / sqrt(d_sae / 16384)
    epochs: int = 10
    seed: int = 0
    k_aux: int | None = None  # None: d_in // 2 (Gao et al. use 512 for d_model 768)
    dead_tokens: int | None = None  # None: min(10M, half an epoch)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 16384)


def geometric_median(x: torch.Tensor, iterations: int = MEDIAN_ITERATIONS, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm from the mean: the point minimising the sum of distances to the rows of x."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iterations):
        w = 1 / (x - m).norm(dim=-1).clamp(min=eps)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m.float()


class TopKTrainer:
    """The SAE's parameters, Adam's state and the dead-latent counters; `step(x)` does one batch.
    Its state_dict holds everything a resumed run needs to continue bit for bit."""

    def __init__(self, d_in: int, opts: TrainOptions, b_dec: torch.Tensor, total_steps: int, dead_tokens: int):
        g = torch.Generator().manual_seed(opts.seed)
        W_dec = torch.randn(opts.d_sae, d_in, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = W_dec.T.clone().requires_grad_(True)
        self.b_enc = torch.zeros(opts.d_sae, requires_grad=True)
        self.W_dec = W_dec.requires_grad_(True)
        self.b_dec = b_dec.clone().float().requires_grad_(True)
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.lr = opts.learning_rate()
        self.opt = torch.optim.Adam(self.params, lr=self.lr, eps=ADAM_EPS)
        self.k, self.k_aux = opts.k, min(opts.k_aux or max(1, d_in // 2), opts.d_sae)
        self.total_steps, self.dead_tokens = total_steps, dead_tokens
        self.since_active = torch.zeros(opts.d_sae, dtype=torch.int64)  # training tokens since each latent last fired
        self.steps_done = 0
        self.scale = 1.0  # set by train_topk: the inputs are multiplied by it

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1, sorted=False)
        return pre, top.indices, top.values.relu()

    def _decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # Only k rows of W_dec per token: a bag sum instead of a dense (batch, d_sae) product.
        return torch.nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def step(self, x: torch.Tensor) -> dict[str, float]:
        pre, indices, values = self.encode(x)
        recon = self._decode(indices, values) + self.b_dec
        err = x - recon
        mse = err.pow(2).sum(-1).mean()
        fired = torch.zeros_like(self.since_active, dtype=torch.bool)
        fired[indices[values > 0]] = True
        dead = self.since_active >= self.dead_tokens
        aux = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead:
            k_aux = min(self.k_aux, n_dead)
            aux_pre = pre.masked_fill(~dead, -torch.inf)
            top = aux_pre.topk(k_aux, dim=-1, sorted=False)
            aux_recon = self._decode(top.indices, top.values.relu())
            # The dead latents fit what the live ones left (detached), scaled as SAELens does when few are dead.
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean() * min(n_dead / self.k_aux, 1.0)
        loss = mse + AUXK_COEF * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Remove the gradient component parallel to each decoder row (the rows stay at unit norm).
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
        decay_start = int(self.total_steps * (1 - DECAY_FRACTION))
        frac = (
            1.0
            if self.steps_done < decay_start
            else max(0.0, (self.total_steps - self.steps_done) / (self.total_steps - decay_start))
        )
        for group in self.opt.param_groups:
            group["lr"] = self.lr * frac
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)
            self.since_active += x.shape[0]
            self.since_active[fired] = 0
        self.steps_done += 1
        return {"mse": float(mse.detach()), "aux": float(aux.detach()), "dead": n_dead}

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [p.detach().clone() for p in self.params],
            "opt": self.opt.state_dict(),
            "since_active": self.since_active.clone(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                if p.shape != saved.shape:
                    raise ValueError(f"parameter of shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
                p.copy_(saved)
        self.opt.load_state_dict(state["opt"])
        self.since_active = state["since_active"].clone()
        self.steps_done = int(state["steps_done"])


@dataclass
class TrainResult:
    W_enc: torch.Tensor  # (d_in, d_sae), for the unscaled inputs (the scale folded in)
    b_enc: torch.Tensor
    W_dec: torch.Tensor  # (d_sae, d_in), rows at unit norm
    b_dec: torch.Tensor
    k: int
    scale: float  # the inputs were multiplied by this while training
    dead_fraction: float  # latents dead (no firing for dead_tokens training tokens) at the end
    steps: int
    final_mse: float  # the last step's MSE on the scaled inputs
    history: list[dict] = field(default_factory=list)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train_topk(
    acts: torch.Tensor,
    opts: TrainOptions,
    *,
    checkpoint: Path | None = None,
    checkpoint_steps: int | None = None,
    checkpoint_seconds: float = 60.0,
    on_checkpoint: Callable[[Path], None] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    on_step: Callable[[TopKTrainer], None] | None = None,
) -> TrainResult:
    """Train a TopK SAE on ACTS ((tokens, d_in), float32), deterministic for opts.seed on CPU.
    With CHECKPOINT (a file) the state is saved there every CHECKPOINT_STEPS steps (else every
    CHECKPOINT_SECONDS) and a run finding one continues from it (the caller checks it belongs
    to the same run). PROGRESS(total, initial) returns a bar (update(n), close()); ON_STEP(trainer)
    is called after every step (trainer.scale: the factor the inputs are multiplied by)."""
    acts = acts.float()
    n, d_in = acts.shape
    if not 1 <= opts.k <= opts.d_sae:
        raise ConfigError(f"--k {opts.k}: must be between 1 and --d-sae ({opts.d_sae})")
    batch = min(opts.batch_size, n)
    per_epoch = n // batch
    total = per_epoch * opts.epochs
    dead_tokens = opts.dead_tokens or min(10_000_000, max(batch, n // 2))
    # One scale for all inputs (mean squared norm d_in), so the learning rate means the same for any hook.
    scale = float(math.sqrt(d_in / acts.pow(2).sum(-1).mean().clamp(min=1e-12)))
    sample = acts[_permutation(n, opts.seed, -1)[:MEDIAN_SAMPLE]] * scale
    trainer = TopKTrainer(d_in, opts, geometric_median(sample), total, dead_tokens)
    trainer.scale = scale
    if checkpoint is not None and checkpoint.exists():
        try:
            trainer.load_state_dict(torch.load(checkpoint, weights_only=True))
        except Exception as e:
            raise StoreError(
                f"{checkpoint}: damaged training checkpoint ({type(e).__name__}); delete it to restart training "
                "(the harvested activations are kept)"
            ) from None
    bar = progress(total * batch, trainer.steps_done * batch) if progress else None
    last_save, saved_at = trainer.steps_done, time.monotonic()
    history: list[dict] = []
    stats = {"mse": float("nan")}
    try:
        while trainer.steps_done < total:
            epoch, i = divmod(trainer.steps_done, per_epoch)
            order = _permutation(n, opts.seed, epoch)
            stats = trainer.step(acts[order[i * batch : (i + 1) * batch]] * scale)
            if trainer.steps_done % max(1, total // 20) == 0 or trainer.steps_done == total:
                history.append({"step": trainer.steps_done, **stats})
            if bar is not None:
                bar.update(batch)
            if on_step is not None:
                on_step(trainer)
            due = (
                trainer.steps_done - last_save >= checkpoint_steps
                if checkpoint_steps
                else time.monotonic() - saved_at >= checkpoint_seconds
            )
            if checkpoint is not None and due and trainer.steps_done < total:
                _save_checkpoint(checkpoint, trainer.state_dict())
                last_save, saved_at = trainer.steps_done, time.monotonic()
                if on_checkpoint is not None:
                    on_checkpoint(checkpoint)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        # Fold the input scale in: pre/scale selects the same k latents, and z/scale decodes to x̂/scale.
        return TrainResult(
            W_enc=trainer.W_enc.detach().clone(),
            b_enc=trainer.b_enc.detach() / scale,
            W_dec=trainer.W_dec.detach().clone(),
            b_dec=trainer.b_dec.detach() / scale,
            k=opts.k,
            scale=scale,
            dead_fraction=float((trainer.since_active >= dead_tokens).float().mean()),
            steps=trainer.steps_done,
            final_mse=float(stats["mse"]),
            history=history,
        )


def _save_checkpoint(path: Path, state: dict) -> None:
    from sitegen.store import atomic_write

    atomic_write(path, lambda tmp: torch.save(state, tmp))


def evaluate(d: Dictionary, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """L0 (mean latents active per token), FVU (sum of squared errors over the total squared
    deviation from the mean token) and the fraction of latents never active, over ACTS."""
    acts = acts.float()
    sq_err = 0.0
    l0 = 0
    fired = torch.zeros(d.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, acts.shape[0], batch):
            x = acts[start : start + batch].to(d.W_enc.device)
            z = d.encode(x)
            sq_err += float((x - d.decode(z, x)).double().pow(2).sum())
            active = z > 0
            l0 += int(active.sum())
            fired |= active.any(0).cpu()
    total = float((acts.double() - acts.double().mean(0)).pow(2).sum())
    return {
        "l0": l0 / acts.shape[0],
        "fvu": sq_err / total if total > 0 else float("nan"),
        "dead_fraction": float((~fired).float().mean()),
    }


def result_dictionary(result: TrainResult, hook: str, name: str, source: str = "") -> Dictionary:
    d_sae, d_in = result.W_dec.shape
    return Dictionary(
        name=name,
        source=source or name,
        sha256="",
        cfg={},
        architecture="topk",
        hook_name=hook,
        hook_out=None,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_in,
        W_enc=result.W_enc,
        b_enc=result.b_enc,
        W_dec=result.W_dec,
        b_dec=result.b_dec,
        threshold=None,
        k=result.k,
        W_skip=None,
        apply_b_dec_to_input=True,
        normalize_activations="none",
    )


# --- the command ---


@dataclass(frozen=True)
class TrainConfig:
    hook: str
    out: Path
    model: str = "smollm2"
    corpus: str = "sotu"
    d_sae: int | None = None  # None: 8 x the hook's width
    k: int = 32
    tokens: int = 100_000
    seq_len: int = 32
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 1024
    lr: float | None = None
    epochs: int = 10
    checkpoint_seconds: float = 60.0
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.d_sae is None or self.d_sae >= 1, f"--d-sae {self.d_sae}: must be at least 1"),
            (self.k >= 1, f"--k {self.k}: must be at least 1"),
            (self.d_sae is None or self.k <= self.d_sae, f"--k {self.k}: must be at most --d-sae ({self.d_sae})"),
            (self.tokens >= 1, f"--tokens {self.tokens}: must be at least 1"),
            (8 <= self.seq_len <= MAX_SEQ_LEN, f"--seq-len {self.seq_len}: must be between 8 and {MAX_SEQ_LEN}"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"--lr {self.lr}: must be a positive number"),
            (self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def arguments(self) -> dict:
        """What a resumed run must share with the run that left .work/ (everything but the display)."""
        args = asdict(self)
        args.pop("progress")
        args.pop("checkpoint_seconds")
        args["out"] = str(self.out)
        return args


_OPTION = {"d_sae": "--d-sae", "seq_len": "--seq-len", "batch_size": "--batch-size"}


def _option(key: str) -> str:
    return _OPTION.get(key, "--" + key.replace("_", "-"))


def _check_out(cfg: TrainConfig) -> dict | None:
    """Refuse an --out that holds something else or another run's work; the finished report when
    the same command already finished there."""
    out, work = cfg.out, cfg.out / ".work"
    args = cfg.arguments()
    for where, label in ((work / "run.json", "an unfinished run"), (out / TRAINING_FILE, "a finished run")):
        if where.exists():
            try:
                saved = json.loads(where.read_text())
                saved = saved["arguments"] if "arguments" in saved else saved
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"{where}: unreadable; delete {out} to start over") from None
            diff = [k for k in args if k != "out" and saved.get(k) != args[k]]
            if diff:
                k = diff[0]
                raise ConfigError(
                    f"--out {out} holds {label} with {_option(k)} {saved.get(k)} (this command: {args[k]}); "
                    f"rerun it with the same arguments, or choose another --out (or delete {out})"
                )
            if label == "a finished run" and not work.exists():
                return json.loads(where.read_text())
    if out.exists() and not work.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: the folder exists and holds other files; choose a new or empty folder")
    return None


def split_heldout(seq_ids: Iterable[int]) -> tuple[list[int], list[int]]:
    """(training ids, held-out ids): every HELDOUT_EVERY-th sequence id is held out."""
    train, held = [], []
    for i in seq_ids:
        (held if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(i)
    return train, held


def _harvest_batch(device: str, seq_len: int) -> int:
    # Sequences per forward pass, as compute chooses them (runner.auto_batch_size).
    return max(8, 8192 // seq_len) if device == "cuda" else max(4, 1024 // seq_len)


def _batches(seqs: list, size: int, seq_len: int, pad_id: int):
    for start in range(0, len(seqs), size):
        part = seqs[start : start + size]
        tokens = np.full((len(part), seq_len), pad_id, dtype=np.int64)
        for row, s in enumerate(part):
            tokens[row, : len(s.token_ids)] = s.token_ids
        yield part, tokens


def harvest(model: Any, seqs: list, hook: str, seq_len: int, first_valid: int, device: str, bar=None) -> torch.Tensor:
    """The activations at HOOK of every real position from FIRST_VALID on, sequence after
    sequence, as one (tokens, width) float32 CPU tensor."""
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or model.bos or 0)
    rows: list[torch.Tensor] = []
    for part, tokens in _batches(seqs, _harvest_batch(device, seq_len), seq_len, pad_id):
        got: list[torch.Tensor] = []
        model.run_hooks(tokens, [(hook, got.append)])
        acts = got[0].float().cpu()
        for row, s in enumerate(part):
            rows.append(acts[row, first_valid : len(s.token_ids)].clone())
        if bar is not None:
            bar.update(sum(len(s.token_ids) - first_valid for s in part))
    width = model.hook_width(hook)
    return torch.cat(rows) if rows else torch.zeros(0, width)


def _harvest_cached(model, seqs, cfg: TrainConfig, first_valid: int, which: str, bar) -> torch.Tensor:
    """harvest() in chunks of HARVEST_CHUNK sequences saved under .work/, so a rerun reuses them."""
    from sitegen.store import atomic_write

    parts = []
    for c, start in enumerate(range(0, len(seqs), HARVEST_CHUNK)):
        chunk = seqs[start : start + HARVEST_CHUNK]
        path = cfg.out / ".work" / f"{which}-{c:05d}.npy"
        expected = sum(len(s.token_ids) - first_valid for s in chunk)
        if path.exists():
            try:
                acts = torch.from_numpy(np.load(path))
                if acts.shape[0] != expected:
                    raise ValueError("wrong length")
            except (OSError, ValueError) as e:
                raise StoreError(f"{path}: damaged harvest chunk ({e}); delete it and rerun the same command") from None
            if bar is not None:
                bar.update(expected)
        else:
            acts = harvest(model, chunk, cfg.hook, cfg.seq_len, first_valid, cfg.device, bar)
            atomic_write(path, lambda tmp, a=acts: _save_npy(tmp, a))
        parts.append(acts)
    return torch.cat(parts)


def _save_npy(path: Path, acts: torch.Tensor) -> None:
    with path.open("wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, acts.numpy())


def next_token_loss_increase(model, d: Dictionary, seqs: list, cfg: TrainConfig, first_valid: int) -> dict[str, float]:
    """Mean next-token loss over the held-out sequences' positions from FIRST_VALID on, with the
    model's own activation at the hook and with the dictionary's reconstruction spliced in there
    (the BOS position keeps its own activation: the SAE never saw it)."""
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or model.bos or 0)

    def splice(acts):
        out = acts.clone()
        x = acts[:, first_valid:]
        out[:, first_valid:] = d.decode(d.encode(x), x).to(acts.dtype)
        return out

    clean = spliced = 0.0
    count = 0
    for part, tokens in _batches(seqs, _harvest_batch(cfg.device, cfg.seq_len), cfg.seq_len, pad_id):
        mask = np.zeros((len(part), cfg.seq_len - 1), dtype=bool)
        for row, s in enumerate(part):
            mask[row, first_valid : len(s.token_ids) - 1] = True
        m = torch.from_numpy(mask)
        base = model.next_token_loss(tokens).cpu()
        swapped = model.next_token_loss(tokens, replace=[(cfg.hook, splice)]).cpu()
        clean += float(base[m].double().sum())
        spliced += float(swapped[m].double().sum())
        count += int(m.sum())
    if count == 0:
        return {"loss_clean": float("nan"), "loss_spliced": float("nan"), "loss_increase": float("nan")}
    return {"loss_clean": clean / count, "loss_spliced": spliced / count, "loss_increase": (spliced - clean) / count}


def run_train_sae(
    cfg: TrainConfig,
    open_model: Callable[[], Any],
    pack: Callable[[Any, Any], list],
    log: Callable[[str], None] = print,
    *,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict:
    """The whole command. OPEN_MODEL() returns the LoadedModel; PACK(corpus, tokenizer) returns
    the packed sequences (compute's pack_sequences with cfg's seq_len, tokens and seed). Returns
    the report written to training.json."""
    from sitegen.corpus import load_corpus
    from sitegen.store import atomic_write_bytes

    cfg.validate()
    done = _check_out(cfg)
    if done is not None:
        log(f"{cfg.out} already holds this run's dictionary; nothing to do")
        return done
    model = open_model()
    width = model.hook_width(cfg.hook)
    if width is None:
        raise ConfigError(
            f"--hook {cfg.hook}: not a hook sitegen reads on {model.name} ({model.n_layers} layers); use "
            f"blocks.<0-{model.n_layers - 1}>.<hook_resid_pre, hook_resid_mid, hook_resid_post, hook_mlp_out, mlp.hook_post, ...>"
        )
    d_sae = cfg.d_sae or 8 * width
    if cfg.k > d_sae:
        raise ConfigError(f"--k {cfg.k}: must be at most --d-sae ({d_sae})")
    corpus = load_corpus(cfg.corpus)
    seqs = pack(corpus, model.tokenizer)
    train_ids, held_ids = split_heldout(s.seq_id for s in seqs)
    if not held_ids or not train_ids:
        raise ConfigError(
            f"--tokens {cfg.tokens}: gives {len(seqs)} sequences; need at least {HELDOUT_EVERY} "
            f"(one in {HELDOUT_EVERY} is held out): raise --tokens"
        )
    # Only now is the run known to be possible: a refused --tokens leaves no unfinished run behind.
    work = cfg.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(work / "run.json", json.dumps(cfg.arguments(), indent=2, sort_keys=True).encode())
    by_id = {s.seq_id: s for s in seqs}
    train_seqs, held_seqs = [by_id[i] for i in train_ids], [by_id[i] for i in held_ids]
    first_valid = 1 if model.bos is not None else 0
    n_tokens = sum(len(s.token_ids) - first_valid for s in seqs)
    log(
        f"train-sae: {model.name} {cfg.hook} (width {width}), {len(seqs)} sequences, {n_tokens} tokens "
        f"({len(held_seqs)} sequences held out), d_sae {d_sae}, k {cfg.k}"
    )
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress)
    try:
        train_acts = _harvest_cached(model, train_seqs, cfg, first_valid, "train", bar)
        held_acts = _harvest_cached(model, held_seqs, cfg, first_valid, "heldout", bar)
    finally:
        bar.close()
    harvest_s = time.monotonic() - t0
    if not bool(torch.isfinite(train_acts).all()):
        raise ConfigError(
            f"--hook {cfg.hook}: the model's activations there hold NaN or infinite values; check the model"
        )

    opts = TrainOptions(d_sae=d_sae, k=cfg.k, batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed)
    t1 = time.monotonic()
    result = train_topk(
        train_acts,
        opts,
        checkpoint=work / "checkpoint.pt",
        checkpoint_seconds=cfg.checkpoint_seconds,
        on_checkpoint=on_checkpoint,
        progress=lambda total, initial: tqdm(
            total=total, initial=initial, unit="tok", unit_scale=True, desc="train", disable=not cfg.progress
        ),
    )
    train_s = time.monotonic() - t1
    name = url_safe_name(cfg.out.name)
    d = result_dictionary(result, cfg.hook, name, str(cfg.out))
    quality = evaluate(d, held_acts)
    quality.update(next_token_loss_increase(model, d, held_seqs, cfg, first_valid))
    report = {
        "arguments": cfg.arguments(),
        "model": {"name": model.name, "source": model.source, "fingerprint": model.fingerprint},
        "corpus": {"name": corpus.name, "content_hash": corpus.content_hash},
        "d_in": width,
        "d_sae": d_sae,
        "k": cfg.k,
        "sequences": {"train": len(train_seqs), "heldout": len(held_seqs)},
        "tokens": {"train": int(train_acts.shape[0]), "heldout": int(held_acts.shape[0])},
        "steps": result.steps,
        "learning_rate": opts.learning_rate(),
        "input_scale": result.scale,
        "heldout": quality,
        "dead_fraction_training": result.dead_fraction,
        "final_training_mse_scaled": result.final_mse,
    }
    save_dictionary(
        d,
        cfg.out,
        metadata={
            "model_name": model.name,
            "context_size": cfg.seq_len,
            "prepend_bos": model.bos is not None,
            "dataset_path": corpus.name,
        },
    )
    atomic_write_bytes(cfg.out / TRAINING_FILE, json.dumps(report, indent=2, sort_keys=True).encode() + b"\n")
    shutil.rmtree(work, ignore_errors=True)
    load_dictionary(str(cfg.out))  # what --sae will read: fail here, not later, if it does not
    log(f"harvest {harvest_s:.1f} s ({n_tokens / max(harvest_s, 1e-9):.0f} tokens/s), training {train_s:.1f} s")
    log(
        f"wrote {cfg.out}/{CFG_FILE} and {WEIGHTS_FILE}: held-out L0 {quality['l0']:.1f}, FVU {quality['fvu']:.3f}, "
        f"dead {quality['dead_fraction']:.1%}, next-token loss +{quality['loss_increase']:.3f} nats"
    )
    return report
