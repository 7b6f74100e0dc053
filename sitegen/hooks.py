"""Where sitegen reads and writes a transformer-lens model's activations: the hook points a
dictionary (SAE, transcoder) may sit at, and the order a block runs them in. No torch: the compute
side (LoadedModel.run_hooks stops the forward pass after the last hook it needs) and the services'
weight tables both use it."""

from __future__ import annotations

import re

# The hook points a dictionary may read or write, in the order a block runs them (transformer-lens
# names, relative to `blocks.L.`): a forward pass that only needs activations stops after the last.
HOOK_STAGES = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
MLP_WIDE = frozenset({"mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"})
HOOK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def parse_hook(name: str) -> tuple[int, str] | None:
    m = HOOK_RE.fullmatch(name)
    if m is None or m.group(2) not in HOOK_STAGES:
        return None
    return int(m.group(1)), m.group(2)


def hook_order(name: str) -> tuple[int, int]:
    """(layer, stage) of a hook in HOOK_STAGES, the order a forward pass reaches it."""
    parsed = parse_hook(name)
    if parsed is None:
        raise ValueError(f"unknown hook {name!r}: expected blocks.<layer>.<one of {', '.join(HOOK_STAGES)}>")
    return parsed[0], HOOK_STAGES.index(parsed[1])
