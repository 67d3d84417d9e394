"""The quick path of `make check-runtimes` (bench/runtimes): a pruned model directory, as prunetune wrote it, loaded
by Transformers alone, with no prunetune code importable, scores the windows `prunetune evaluate` scores to the
same perplexity. The real engines (vLLM CPU, llama.cpp) run in their own virtualenvs, outside this suite."""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

import pytest
from rich.console import Console

from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "runtimes"))
import check_runtimes

# `python -S` skips site's .pth files, so the editable install's import hook for prunetune never runs; the
# site-packages themselves (torch, transformers) come back through PYTHONPATH: Transformers alone.
WITHOUT_PRUNETUNE = [sys.executable, "-S"]
SITE = {"PYTHONPATH": os.pathsep.join(site.getsitepackages())}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("rt") / "pruned"
    return run_prune(PruneConfig(model=str(tiny_model_dir), out=str(out), method="magnitude", pattern="2:4",
                                 device="cpu"), console=Console(quiet=True))


def test_transformers_alone_matches_prunetune_evaluate_on_the_same_windows(tmp_path, pruned, shared_data):
    data_dir = [str(shared_data)]
    reference = check_runtimes.prunetune_perplexity(str(pruned), "wikitext2", "test", 64, 4, "float32", data_dir)
    windows = check_runtimes.eval_windows(str(pruned), "wikitext2", "test", 64, 4, data_dir)
    assert len(windows) == reference["windows"] == 4 and {len(w) for w in windows} == {64}
    tokens = tmp_path / "windows.json"
    tokens.write_text(json.dumps({"windows": windows}))

    record = check_runtimes.run_engine(WITHOUT_PRUNETUNE, "transformers", str(pruned), tokens, "float32", env=SITE)
    assert record["engine"] == "transformers" and record["windows"] == 4
    assert record["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)  # the check allows 1%
    outcome = check_runtimes.Outcome("transformers", str(pruned), record["perplexity"], reference["perplexity"], 0.01)
    assert outcome.ok

    # The engine refuses to run where prunetune is importable: the number above is Transformers' alone.
    with pytest.raises(RuntimeError, match="prunetune is importable"):
        check_runtimes.run_engine([sys.executable], "transformers", str(pruned), tokens, "float32")


def test_a_runtime_that_cannot_load_the_directory_is_a_failure_not_a_crash(tmp_path, pruned):
    tokens = tmp_path / "windows.json"
    tokens.write_text(json.dumps({"windows": [[1, 2, 3, 4]]}))
    with pytest.raises(RuntimeError):
        check_runtimes.run_engine(WITHOUT_PRUNETUNE, "transformers", str(tmp_path / "missing"), tokens, "float32",
                                  env=SITE)
    far = check_runtimes.Outcome("vllm", "m", 10.2, 10.0, 0.01)
    assert not far.ok and f"{far.gap:+.1%}" == "+2.0%"


def test_the_root_cause_of_a_runtime_failure_is_the_loaders_own_error():
    log = """INFO 12-02 17:43:58 [loader.py:50] Loading weights
(Worker pid=26370) ERROR 12-02 17:43:59 [multiproc_executor.py:953] ValueError: There is no module or parameter named 'layers.0.mlp.down_proj' in LlamaModel.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""
    assert check_runtimes.root_cause(log).startswith("ValueError: There is no module or parameter named")
    assert check_runtimes.root_cause("just a line\n") == "just a line"
