"""Whether the Hugging Face hub answers, asked once before any hub client call (no torch: the
model loader and the dictionary loader both use it)."""

from __future__ import annotations

import os


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine gets its one-line answer in seconds, not after the
    hub client's retries. HF_HUB_OFFLINE=1 (models already in the local HF cache) skips the probe."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
