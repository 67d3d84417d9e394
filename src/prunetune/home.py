"""Where prunetune keeps caches: converted GGUF models and tokenised corpora."""

from __future__ import annotations

import os
from pathlib import Path


def prunetune_home() -> Path:
    """`$PRUNETUNE_HOME`, default `~/.cache/prunetune`; created on first use."""
    home = Path(os.environ.get("PRUNETUNE_HOME") or Path.home() / ".cache" / "prunetune").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
