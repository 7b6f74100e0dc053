"""Sparse dictionaries (SAEs and transcoders) in SAELens's on-disk format.

A dictionary is a folder holding `cfg.json` and `sae_weights.safetensors`, as SAELens's
`SAE.save_model` writes it and `SAE.load_from_disk` reads it. The reader here uses `safetensors`
and `json` directly rather than sae-lens: sae-lens 6.54.12 does not import beside
transformer-lens 4 (its `sae_lens/saes/sae.py` imports `transformer_lens.HookedTransformer`,
which transformer-lens 4 removed; every sae-lens module, loaders included, goes through it), and
it pins `transformer-lens<4`, so installing it would downgrade the model side. For a hub id the
release table that ships inside the sae-lens wheel (`pretrained_saes.yaml`) is read as a data
file when sae-lens is installed, without importing sae-lens, and the files come from
`huggingface_hub`.

Fields read from cfg.json (SAELens 6 puts the hook names under `metadata`; older files have them
at the top level, as `hook_point`/`hook_point_layer` before that):
- `d_in`, `d_sae`; `d_out` (transcoders);
- `architecture`: "standard", "topk", "jumprelu", "transcoder", "skip_transcoder",
  "jumprelu_transcoder", "jumprelu_skip_transcoder"; older files without it: "standard", or
  "topk" when `activation_fn` is "topk";
- `k` (topk; older files: `activation_fn_kwargs.k`), `rescale_acts_by_decoder_norm` (topk; folded
  into the weights on load: encoder columns times the decoder row norms, decoder rows at unit norm);
- `hook_name` (or `hook_point`), `hook_layer` (or `hook_point_layer`: must agree with the hook's
  layer), `hook_name_out` (transcoders; or `hook_point_out`), `hook_head_index` (must be null);
- `apply_b_dec_to_input` (default true, as SAELens; transcoders: must be false),
  `normalize_activations` ("none" or "constant_norm_rescale"; null and false mean "none"),
  `reshape_activations` ("none").
Tensors: `W_enc` (d_in, d_sae), `b_enc` (d_sae,), `W_dec` (d_sae, d_out), `b_dec` (d_out,);
jumprelu: `threshold` (d_sae,) or `log_threshold` (threshold = exp); skip transcoders: `W_skip`
(d_out, d_in), SAELens's layout, applied as `x @ W_skip.T`; a `scaling_factor` of all ones is
ignored. Anything else is refused in one line. Weights are held as float32 whatever their dtype
on disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sitegen.errors import ConfigError
from sitegen.hub import hub_reachable

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "constant_norm_rescale")
# SAELens's architecture names -> (our architecture, transcoder, skip connection)
_SAELENS_ARCH = {
    "standard": ("standard", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("standard", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_UNSUPPORTED_ARCH = {"gated", "batchtopk", "matryoshka_batchtopk", "abstopk", "temporal", "matching_pursuit"}
SAELENS_VERSION = "6.54.12"  # the sae-lens whose format save_dictionary writes


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A loaded SAE or transcoder. Tensors are float32 on one device.

    encode(x) = act(pre), pre = (x' - b_dec * apply_b_dec_to_input) @ W_enc + b_enc, where x' is
    x after `normalize_activations` ("constant_norm_rescale": x * sqrt(d_in) / |x|) and act is
    relu (standard), relu of the k largest of `pre`, the rest 0 (topk), or relu(pre) where
    pre > threshold, else 0 (jumprelu): SAELens's semantics.
    decode(z, x) = z @ W_dec + b_dec (undoing the input normalisation, which needs x), plus
    x @ W_skip.T for a skip transcoder.
    """

    name: str  # default: the folder's name, made URL-safe ([A-Za-z0-9._-], no leading dot/dash)
    source: str  # the path or hub id as given
    sha256: str  # "sha256:<hex>" over cfg.json's bytes followed by the weights file's bytes
    cfg: dict  # cfg.json as read
    architecture: str  # "standard" | "topk" | "jumprelu"
    hook_name: str  # where the encoder reads (transformer-lens name)
    hook_out: str | None  # transcoders: where the decoder writes; None for an SAE
    d_in: int
    d_sae: int
    d_out: int  # == d_in for an SAE
    W_enc: torch.Tensor  # (d_in, d_sae)
    b_enc: torch.Tensor  # (d_sae,)
    W_dec: torch.Tensor  # (d_sae, d_out)
    b_dec: torch.Tensor  # (d_out,)
    threshold: torch.Tensor | None  # jumprelu (d_sae,)
    k: int | None  # topk
    W_skip: torch.Tensor | None  # skip transcoders: (d_out, d_in), SAELens's layout; decode adds x @ W_skip.T
    apply_b_dec_to_input: bool
    normalize_activations: str  # "none" | "constant_norm_rescale"

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None

    def to(self, device: str) -> Dictionary:
        move = lambda t: None if t is None else t.to(device)
        return replace(
            self,
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            threshold=move(self.threshold),
            W_skip=move(self.W_skip),
        )

    def _normalized_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.device, torch.float32)
        if self.normalize_activations == "constant_norm_rescale":
            x = x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) float32 latent activations."""
        x = self._normalized_in(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            top = pre.topk(min(self.k, self.d_sae), dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_sae) -> (..., d_out): the reconstruction of the output hook's activation. X
        (the encoder's input) is needed for a skip connection and for constant_norm_rescale."""
        out = z.to(self.W_dec.device, torch.float32) @ self.W_dec + self.b_dec
        if self.W_skip is None and self.normalize_activations == "none":
            return out
        if x is None:
            raise ValueError(f"dictionary {self.name}: decode needs x (skip connection or input normalisation)")
        x = x.to(self.W_dec.device, torch.float32)
        if self.normalize_activations == "constant_norm_rescale":
            out = out / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out


# --- names and hashes ---

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def url_safe_name(text: str) -> str:
    """TEXT with every run of characters outside [A-Za-z0-9._-] replaced by one '-', and no
    leading dot or dash; "dictionary" when nothing is left."""
    return _UNSAFE.sub("-", text).lstrip(".-") or "dictionary"


def _digest(cfg_bytes: bytes, weights: Path) -> str:
    """sha256 of cfg.json's bytes followed by the weights file's bytes (what
    `cat cfg.json sae_weights.safetensors | sha256sum` prints)."""
    h = hashlib.sha256(cfg_bytes)
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- reading ---


def load_dictionary(spec: str) -> Dictionary:
    """A local SAELens folder (cfg.json + sae_weights.safetensors), else a hub id: a SAELens
    release and SAE id ("release/sae_id", looked up in sae-lens's release table when sae-lens is
    installed) or a Hugging Face repo and folder ("owner/repo/folder"), downloaded with
    huggingface_hub. Any problem is a ConfigError of one line naming the file and the field."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path, spec)
    if spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") < 1:
        raise ConfigError(
            f"--sae {spec}: no such folder; pass a folder holding {CFG_FILE} and {WEIGHTS_FILE} (SAELens's format), "
            "or a hub id release/sae_id"
        )
    folder, extra = _download(spec)
    return _read_folder(folder, spec, overrides=extra)


def _read_folder(folder: Path, source: str, overrides: dict | None = None) -> Dictionary:
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ConfigError(
            f"{cfg_path}: missing; a dictionary folder holds {CFG_FILE} and {WEIGHTS_FILE} (SAELens's format)"
        )
    if not weights_path.is_file():
        raise ConfigError(
            f"{weights_path}: missing; a dictionary folder holds {CFG_FILE} and {WEIGHTS_FILE} (SAELens's format)"
        )
    try:
        cfg_bytes = cfg_path.read_bytes()
        cfg = json.loads(cfg_bytes)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: not readable JSON ({type(e).__name__}: {e}); restore the file") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object of SAELens config fields; restore the file")
    tensors = _read_tensors(weights_path)
    fields = _parse_cfg({**cfg, **(overrides or {})}, cfg_path)
    d = _build(fields, tensors, cfg_path, weights_path)
    return Dictionary(
        name=url_safe_name(folder.name if Path(source).expanduser().is_dir() else source.rstrip("/").split("/")[-1]),
        source=source,
        sha256=_digest(cfg_bytes, weights_path),
        cfg=cfg,
        **d,
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ConfigError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); restore or re-save it"
        ) from None


def _get(cfg: dict, *names: str) -> Any:
    """The first of NAMES present at the top level or under `metadata` (SAELens 6 keeps hook names there)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for name in names:
        for where in (cfg, meta):
            if where.get(name) is not None:
                return where[name]
    return None


def _int_field(cfg: dict, name: str, path: Path, *aliases: str, minimum: int = 1) -> int:
    value = _get(cfg, name, *aliases)
    if value is None:
        raise ConfigError(f"{path}: field {name} is missing; add it (an integer)")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: field {name} is {value!r}; it must be an integer >= {minimum}")
    return value


def _parse_cfg(cfg: dict, path: Path) -> dict:
    arch_name = cfg.get("architecture")
    if arch_name is None:  # files before SAELens 6 name TopK only through the activation function
        arch_name = "topk" if cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk" else "standard"
    if arch_name not in _SAELENS_ARCH:
        known = ", ".join(_SAELENS_ARCH)
        why = "is not supported by sitegen" if arch_name in _UNSUPPORTED_ARCH else "is unknown"
        raise ConfigError(f"{path}: field architecture {arch_name!r} {why}; sitegen reads {known}")
    architecture, transcoder, skip = _SAELENS_ARCH[arch_name]
    d_in = _int_field(cfg, "d_in", path)
    d_sae = _int_field(cfg, "d_sae", path)
    d_out = _int_field(cfg, "d_out", path) if transcoder else d_in

    hook_name = _get(cfg, "hook_name", "hook_point")
    if not isinstance(hook_name, str) or not hook_name:
        raise ConfigError(
            f"{path}: field hook_name is missing; add the transformer-lens hook the dictionary reads, e.g. blocks.6.hook_resid_post"
        )
    layer = _get(cfg, "hook_layer", "hook_point_layer")
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if layer is not None and m is not None and int(m.group(1)) != layer:
        raise ConfigError(
            f"{path}: field hook_layer {layer!r} disagrees with hook_name {hook_name!r}; correct one of them"
        )
    if _get(cfg, "hook_head_index", "hook_point_head_index") is not None:
        raise ConfigError(
            f"{path}: field hook_head_index is set; sitegen reads dictionaries over whole hooks, not one attention head"
        )
    hook_out = None
    if transcoder:
        hook_out = _get(cfg, "hook_name_out", "hook_point_out")
        if not isinstance(hook_out, str) or not hook_out:
            raise ConfigError(
                f"{path}: field hook_name_out is missing; a transcoder names the hook it writes, e.g. blocks.3.hook_mlp_out"
            )

    k = None
    if architecture == "topk":
        kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise ConfigError(f"{path}: field k is missing; a topk dictionary needs k (or activation_fn_kwargs.k)")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            raise ConfigError(f"{path}: field k is {k!r}; it must be an integer from 1 to d_sae ({d_sae})")

    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ConfigError(f"{path}: field apply_b_dec_to_input is {apply_b_dec!r}; it must be true or false")
    if transcoder and apply_b_dec:
        raise ConfigError(
            f"{path}: field apply_b_dec_to_input is true for a transcoder (b_dec has d_out entries); set it to false"
        )
    norm = cfg.get("normalize_activations", "none")
    norm = "none" if norm in (None, False) else norm
    if norm not in NORMALIZATIONS:
        raise ConfigError(
            f"{path}: field normalize_activations {norm!r} is not supported; sitegen reads {' or '.join(NORMALIZATIONS)} "
            "(fold a constant scaling factor into W_enc, b_enc and threshold and set it to none)"
        )
    if transcoder and norm != "none":
        raise ConfigError(
            f"{path}: field normalize_activations {norm!r} on a transcoder; sitegen reads transcoders with none"
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise ConfigError(
            f"{path}: field reshape_activations {cfg['reshape_activations']!r}; sitegen reads none (whole hooks)"
        )
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise ConfigError(f"{path}: field rescale_acts_by_decoder_norm is {rescale!r}; it must be true or false")
    if rescale and architecture != "topk":
        raise ConfigError(
            f"{path}: field rescale_acts_by_decoder_norm is true for a {arch_name} dictionary; SAELens uses it with topk only"
        )
    return dict(
        architecture=architecture,
        skip=skip,
        hook_name=hook_name,
        hook_out=hook_out,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=norm,
        rescale=rescale,
    )


def _build(f: dict, tensors: dict[str, torch.Tensor], cfg_path: Path, path: Path) -> dict:
    """The Dictionary's fields from the parsed cfg and the file's tensors, every tensor checked."""
    d_in, d_sae, d_out = f["d_in"], f["d_sae"], f["d_out"]
    tensors = dict(tensors)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool(torch.all(scaling.float() == 1)):
        raise ConfigError(
            f"{path}: tensor scaling_factor is not all ones; fold it into W_dec and b_dec (SAELens's fold) and re-save"
        )
    if f["architecture"] == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").double().exp()
    wanted = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if f["architecture"] == "jumprelu":
        wanted["threshold"] = (d_sae,)
    if f["skip"]:
        wanted["W_skip"] = (d_out, d_in)
    out: dict[str, torch.Tensor | None] = {"threshold": None, "W_skip": None}
    for name, shape in wanted.items():
        t = tensors.pop(name, None)
        if t is None:
            raise ConfigError(
                f"{path}: tensor {name} is missing; a {f['architecture']} dictionary needs {', '.join(wanted)}"
            )
        if tuple(t.shape) != shape:
            raise ConfigError(
                f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {shape} from {cfg_path.name}'s d_in/d_sae"
                f"{'/d_out' if name in ('W_dec', 'b_dec', 'W_skip') and d_out != d_in else ''}; the file does not match the config"
            )
        if not t.is_floating_point():
            raise ConfigError(f"{path}: tensor {name} has dtype {t.dtype}; expected floating-point weights")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(
                f"{path}: tensor {name} holds NaN or infinite values; the dictionary is damaged, retrain or re-download it"
            )
        out[name] = t.contiguous()
    if tensors:
        raise ConfigError(
            f"{path}: tensor {sorted(tensors)[0]} is not understood by sitegen for a {f['architecture']} dictionary; "
            f"the file should hold {', '.join(wanted)} only"
        )
    if f["rescale"]:
        # SAELens's TopK with rescale_acts_by_decoder_norm: pre * |W_dec row|, decode (z / |row|) @ W_dec;
        # folding the norms into the weights gives the same latents and reconstruction.
        norms = out["W_dec"].norm(dim=-1).clamp(min=1e-8)
        out["W_enc"], out["b_enc"], out["W_dec"] = (
            out["W_enc"] * norms,
            out["b_enc"] * norms,
            out["W_dec"] / norms[:, None],
        )
    return dict(
        architecture=f["architecture"],
        hook_name=f["hook_name"],
        hook_out=f["hook_out"],
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        k=f["k"],
        apply_b_dec_to_input=f["apply_b_dec_to_input"],
        normalize_activations=f["normalize_activations"],
        **out,
    )


# --- the hub ---


def _release_table() -> dict | None:
    """sae-lens's release table (release -> repo_id, conversion_func, saes [{id, path}]), read as
    the data file its wheel ships, so sae-lens need not import; None when sae-lens is absent."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    table = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    if not table.is_file():
        return None
    import yaml

    with table.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _resolve_hub(spec: str) -> tuple[str, str, dict]:
    """(repo id, folder in the repo, cfg overrides) for a hub id."""
    release, _, sae_id = spec.partition("/")
    table = _release_table() or {}
    if release in table:
        entry = table[release]
        paths = {str(s["id"]): str(s["path"]) for s in entry.get("saes", [])}
        if sae_id not in paths:
            raise ConfigError(
                f"--sae {spec}: release {release!r} has no SAE {sae_id!r} in sae-lens's release table; check the id"
            )
        if entry.get("conversion_func"):
            raise ConfigError(
                f"--sae {spec}: release {release!r} is stored in another format (sae-lens converter "
                f"{entry['conversion_func']!r}); sitegen reads SAELens's format: convert it with sae-lens and save_model, then pass the folder"
            )
        return str(entry["repo_id"]), paths[sae_id], dict(entry.get("config_overrides") or {})
    # Not a known release: SAELens's own fallback, a Hugging Face repo id and a folder in it.
    parts = spec.split("/")
    if len(parts) < 2:
        raise ConfigError(f"--sae {spec}: expected a folder, release/sae_id or owner/repo/folder")
    return "/".join(parts[:2]), "/".join(parts[2:]), {}


def _download(spec: str) -> tuple[Path, dict]:
    repo_id, folder, overrides = _resolve_hub(spec)
    if not hub_reachable():
        raise ConfigError(
            f"--sae {spec}: the Hugging Face hub is unreachable from this machine; download the folder ({repo_id}, "
            f"{folder or 'top level'}) where it is reachable and pass its local path"
        )
    from huggingface_hub import hf_hub_download

    prefix = f"{folder}/" if folder else ""
    try:
        cfg = hf_hub_download(repo_id=repo_id, filename=prefix + CFG_FILE)
        hf_hub_download(repo_id=repo_id, filename=prefix + WEIGHTS_FILE)
    except Exception as e:  # huggingface_hub raises many types (missing repo, file, auth, network)
        raise ConfigError(
            f"--sae {spec}: cannot download {prefix}{CFG_FILE} and {WEIGHTS_FILE} from {repo_id} ({type(e).__name__}); "
            "check the id, or download the folder and pass its path"
        ) from None
    return Path(cfg).parent, overrides


# --- writing ---


def saelens_architecture(d: Dictionary) -> str:
    """The SAELens architecture name a dictionary is saved under."""
    if not d.is_transcoder:
        return d.architecture
    if d.architecture == "topk":
        raise ConfigError(
            f"dictionary {d.name}: SAELens has no topk transcoder; it cannot be saved in SAELens's format"
        )
    prefix = "jumprelu_" if d.architecture == "jumprelu" else ""
    return f"{prefix}{'skip_' if d.W_skip is not None else ''}transcoder"


def saelens_cfg(d: Dictionary, metadata: dict | None = None) -> dict:
    """cfg.json as SAELens 6 writes it (SAE.save_model: its config's to_dict)."""
    cfg = {
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "normalize_activations": d.normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "hook_name": d.hook_name,
            **({"hook_name_out": d.hook_out} if d.hook_out else {}),
            **(metadata or {}),
        },
        "architecture": saelens_architecture(d),
    }
    if d.architecture == "topk":
        cfg["k"] = d.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if d.is_transcoder:
        cfg["d_out"] = d.d_out
    return cfg


def save_dictionary(d: Dictionary, folder: Path, metadata: dict | None = None) -> None:
    """Write D in SAELens's format (cfg.json + sae_weights.safetensors), so SAE.load_from_disk
    and load_dictionary read it. METADATA: extra entries for cfg.json's `metadata` (model_name,
    context_size, ...). Each file is written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    from sitegen.store import atomic_write

    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.threshold is not None:
        tensors["threshold"] = d.threshold
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    cfg = json.dumps(saelens_cfg(d, metadata), indent=2, sort_keys=True).encode() + b"\n"
    folder = Path(folder)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(folder / CFG_FILE, lambda tmp: tmp.write_bytes(cfg))


# --- fitting a model ---


def _cfg_label(d: Dictionary) -> str:
    path = Path(d.source).expanduser()
    return str(path / CFG_FILE) if path.is_dir() else f"{d.source} ({CFG_FILE})"


def check_fits(d: Dictionary, model: Any) -> None:
    """Refuse D (ConfigError, one line naming its cfg.json and the field) unless MODEL (a
    LoadedModel) has its hooks with the widths it reads and writes."""
    checks = [("hook_name", d.hook_name, "d_in", d.d_in)]
    if d.is_transcoder:
        checks.append(("hook_name_out", d.hook_out, "d_out", d.d_out))
    for hook_field, hook, dim_field, dim in checks:
        width = model.hook_width(hook)
        if width is None:
            raise ConfigError(
                f"{_cfg_label(d)}: field {hook_field} {hook!r} is not a hook sitegen reads on {model.name} "
                f"({model.n_layers} layers); use blocks.<0-{model.n_layers - 1}>.<hook_resid_pre, hook_mlp_out, hook_resid_post, mlp.hook_post, ...>"
            )
        if width != dim:
            raise ConfigError(
                f"{_cfg_label(d)}: field {dim_field} is {dim} but {model.name}'s {hook} is {width} wide; "
                "the dictionary was made for another model or hook"
            )


def random_dictionary(
    architecture: str,
    d_in: int,
    d_sae: int,
    hook_name: str,
    *,
    seed: int = 0,
    k: int | None = None,
    hook_out: str | None = None,
    d_out: int | None = None,
    skip: bool = False,
    apply_b_dec_to_input: bool | None = None,
    normalize_activations: str = "none",
    name: str = "random",
) -> Dictionary:
    """A random-init dictionary (for tests and benchmarks): Gaussian weights, decoder rows at unit
    norm, small random biases, thresholds in [0, 0.5), deterministic for SEED."""
    g = torch.Generator().manual_seed(seed)
    d_out = d_in if hook_out is None else (d_out or d_in)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    W_dec = rand(d_sae, d_out)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    d = Dictionary(
        name=name,
        source=name,
        sha256="",
        cfg={},
        architecture=architecture,
        hook_name=hook_name,
        hook_out=hook_out,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        W_enc=rand(d_in, d_sae) / math.sqrt(d_in),
        b_enc=0.1 * rand(d_sae),
        W_dec=W_dec,
        b_dec=0.1 * rand(d_out),
        threshold=0.5 * torch.rand(d_sae, generator=g) if architecture == "jumprelu" else None,
        k=(k or max(1, d_sae // 8)) if architecture == "topk" else None,
        W_skip=0.1 * rand(d_out, d_in) if skip else None,
        apply_b_dec_to_input=(hook_out is None) if apply_b_dec_to_input is None else apply_b_dec_to_input,
        normalize_activations=normalize_activations,
    )
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    return d
