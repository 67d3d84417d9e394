"""Whether the Hugging Face hub can be reached: probed once per process, in seconds, so a command offline fails
fast with the local-copy fix instead of waiting out the hub client's ~50 s of retries. Models and datasets both
ask here; neither imports the other for it."""

from __future__ import annotations

import os
import socket
import threading

HUB_PROBE_S = 3.0
"""How long the hub may take to accept a connection before it counts as unreachable (its client would retry
for ~50 s)."""


def offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_reachable: dict[str, bool] = {}


def hub_reachable() -> bool:
    """Whether huggingface.co accepts a connection within `HUB_PROBE_S` (False when offline mode is set).

    Probed once per process, in a thread so a hanging DNS lookup cannot stall the command either.
    """
    if offline_env():
        return False
    if "hub" not in _reachable:
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection(("huggingface.co", 443), timeout=HUB_PROBE_S).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(HUB_PROBE_S + 0.5)
        _reachable["hub"] = bool(result and result[0])
    return _reachable["hub"]


def in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError, OSError):
        return False
