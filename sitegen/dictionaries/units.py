"""A dictionary's latents as a set of units: the same methods as a LoadedModel, so every service's
compute half (the corpus pass's accumulators, the weight tables, Neuron2Graph, verify) works on
latents unchanged.

A dictionary store is a model with ONE layer (index 0) of `d_sae` units; its hook, and the model
layer that hook belongs to, are in its manifest's `dictionary` record. A latent's activation is
the dictionary's encoder applied to the activation at its hook, in the model's forward pass.
A latent's output direction (what the logit tables read through the unembedding) is its decoder
row in the residual stream: for a dictionary over MLP activations (`blocks.L.mlp.hook_*`), the
decoder row through that layer's W_out.

Also here: the corpus pass's exact, mergeable quality sums of a dictionary (QualitySums): L0,
fraction of variance unexplained, and the next-token loss with the reconstruction spliced in.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterable

import numpy as np

from sitegen.dictionaries.quality import FIELDS, SCALE_BITS, quality_figures
from sitegen.hooks import HOOK_STAGES, MLP_WIDE, hook_order

# The next-token loss with the reconstruction spliced in needs a second full forward pass, so it
# is measured on a fixed sample of the sequences: those whose random key (corpus_keys.random_key,
# the seed's) falls below LOSS_FRACTION. One in sixteen keeps the pass's extra cost near 1/8.
LOSS_FRACTION = 1 / 16
LOSS_BATCH = 8  # the sampled sequences go through in fixed-shape batches of this many rows


class DictionaryUnits:
    """One dictionary's latents, read through `base`'s forward pass (the LoadedModel interface)."""

    def __init__(self, base: Any, dictionary: Any, device: str):
        self.base = base
        self.dictionary = dictionary.to(device)
        self.layer = hook_order(dictionary.hook_name)[0]  # the model layer the encoder reads at
        self.name = f"{base.name}.{dictionary.name}"
        self.source = base.source
        self.tokenizer = base.tokenizer
        self.fingerprint = "sha256:" + hashlib.sha256(f"{base.fingerprint}|{dictionary.sha256}".encode()).hexdigest()
        d = dictionary
        self.metadata = {
            **base.metadata,
            "name": self.name,
            "architecture": f"{d.architecture} {'transcoder' if d.is_transcoder else 'SAE'}",
            "num_layers": 1,
            "layer_size": int(d.d_sae),
            "activation_function": d.architecture,
            "gated_mlp": False,
            "num_total_neurons": int(d.d_sae),
            "num_total_parameters": int(sum(t.numel() for t in _tensors(d))),
            "hook": d.hook_name,
            "fingerprint": self.fingerprint,
        }

    # --- the LoadedModel interface ---
    n_layers = 1
    gated_mlp = False
    act_fn = "dictionary"  # not an MLP nonlinearity: the logit tables skip "input tokens" for latents

    @property
    def d_mlp(self) -> int:
        return int(self.dictionary.d_sae)

    @property
    def bos(self) -> int | None:
        return self.base.bos

    @property
    def d_vocab(self) -> int:
        return self.base.d_vocab

    @property
    def normalization(self) -> str:
        return self.base.normalization

    @property
    def norm_eps(self) -> float:
        return self.base.norm_eps

    def input_embeddings(self) -> Any:
        return self.base.input_embeddings()

    def unembed(self) -> Any:
        return self.base.unembed()

    def final_norm(self) -> tuple[Any, Any]:
        return self.base.final_norm()

    def hook_name(self, layer: int) -> str:  # noqa: ARG002 - one layer
        return self.dictionary.hook_name

    def mlp_weights(self, layer: int) -> Any:  # noqa: ARG002 - one layer
        """The model's MLPWeights record with the latents' directions: encoder in, decoder out."""
        d = self.dictionary
        return dataclasses.replace(
            self.base.mlp_weights(self.layer),
            W_in=d.W_enc,
            W_out=self.output_directions(),
            W_gate=None,
            b_in=d.b_enc,
            norm=(None, None),
        )

    def output_directions(self) -> Any:
        """Each latent's write direction in the residual stream, (d_sae, d_model)."""
        d = self.dictionary
        layer, stage = hook_order(d.hook_out or d.hook_name)
        if HOOK_STAGES[stage] in MLP_WIDE:  # a dictionary over MLP activations writes through W_out
            return d.W_dec @ self.base.mlp_weights(layer).W_out
        return d.W_dec

    def input_directions(self) -> Any:
        """Each latent's encoder direction, (d_sae, d_in)."""
        return self.dictionary.W_enc.T

    def run_mlp_activations(self, tokens: Any, layers: Iterable[int], on_acts: Callable[[int, Any], None]) -> None:
        if list(layers):
            self.base.run_hooks(tokens, [self.hook(lambda z: on_acts(0, z))])

    def run_hooks(self, tokens: Any, hooks: list) -> None:
        self.base.run_hooks(tokens, hooks)

    def hook(self, on_latents: Callable[[Any], None]) -> tuple[str, Callable[[Any], None]]:
        """The (hook name, callback) pair that encodes the hooked activation and hands the latents on."""
        encode = self.dictionary.encode
        return self.dictionary.hook_name, lambda acts: on_latents(encode(acts))


def _tensors(d: Any) -> list:
    return [t for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec, d.threshold, d.W_skip) if t is not None]


def dictionary_record(units: DictionaryUnits, sums: "QualitySums | None") -> dict:
    """The dictionary store's manifest record `dictionary`: what it is, where it came from, and its
    quality over the corpus pass (with the integer sums merge adds up)."""
    d = units.dictionary
    record = {
        "name": d.name,
        "source": d.source,
        "sha256": d.sha256,
        "architecture": d.architecture,
        "transcoder": bool(d.is_transcoder),
        "hook_name": d.hook_name,
        "hook_out": d.hook_out,
        "layer": units.layer,
        "d_in": int(d.d_in),
        "d_sae": int(d.d_sae),
        "k": d.k,
        "base_model": units.base.name,
        "cfg": d.cfg,
    }
    if sums is not None:
        record["sums"] = sums.as_record()
        record["quality"] = quality_figures(record["sums"])
    return record


class QualitySums:
    """Exact sums over the counted tokens of the corpus pass (BOS and padding excluded), from which
    the dictionary's quality figures follow (quality_figures): tokens, active latents (L0), squared
    reconstruction error, squared norm and per-dimension sum of the target (for its variance), and
    on the loss sample, the clean and spliced next-token losses and their count. Every per-token
    value is rounded to the fixed point once (SCALE_BITS), so sums are order-independent."""

    FIELDS = FIELDS

    def __init__(self, d_out: int, d_sae: int):
        self.scalars = {f: 0 for f in self.FIELDS}
        self.target_sum = np.zeros(d_out, dtype=np.int64)
        self.latent_active = np.zeros(d_sae, dtype=np.int64)  # per latent: counted tokens where it is non-zero

    # --- checkpoint state (the runner saves it with the accumulators) ---
    def state(self) -> dict:
        return {
            "scalars": np.array([self.scalars[f] for f in self.FIELDS], dtype=np.int64),
            "target_sum": self.target_sum,
            "latent_active": self.latent_active,
        }

    def load(self, state: dict) -> None:
        if "scalars" in state:
            self.scalars = dict(zip(self.FIELDS, (int(v) for v in state["scalars"])))
            self.target_sum = np.asarray(state["target_sum"], dtype=np.int64).copy()
            self.latent_active = np.asarray(state["latent_active"], dtype=np.int64).copy()

    def as_record(self) -> dict:
        return {
            **self.scalars,
            "target_sum": [int(v) for v in self.target_sum],
            "latent_active": [int(v) for v in self.latent_active],
        }

    def update(self, target: Any, z: Any, recon: Any, mask: Any) -> None:
        """One batch: target what the dictionary reconstructs (x for an SAE, the
        output hook's activation for a transcoder), z the latents, recon the reconstruction;
        mask bool [batch, seq] the counted positions."""
        sel = mask.reshape(-1)
        t = target.reshape(-1, target.shape[-1])[sel].double()
        err = (t - recon.reshape(-1, recon.shape[-1])[sel].double()).pow(2).sum(-1)
        nonzero = z.reshape(-1, z.shape[-1])[sel] != 0
        active = nonzero.sum(-1)
        self.latent_active += nonzero.sum(0).cpu().numpy()
        self.scalars["tokens"] += int(sel.sum())
        self.scalars["active"] += int(active.sum())
        self.scalars["sq_err"] += int(_fixed(err).sum())
        self.scalars["sq_norm"] += int(_fixed(t.pow(2).sum(-1)).sum())
        self.target_sum += _fixed(t).sum(0).cpu().numpy()

    def update_loss(self, clean: Any, spliced: Any, mask: Any) -> None:
        """Per-position losses (rows, seq - 1) of the sampled rows; mask [rows, seq - 1] the counted predictions."""
        self.scalars["loss_tokens"] += int(mask.sum())
        self.scalars["loss_clean"] += int(_fixed(clean.double()[mask]).sum())
        self.scalars["loss_spliced"] += int(_fixed(spliced.double()[mask]).sum())


def _fixed(values: Any) -> Any:
    """float64 tensor -> int64 tensor of round(v * 2^SCALE_BITS)."""
    import torch

    return torch.round(values * float(1 << SCALE_BITS)).to(torch.int64)
