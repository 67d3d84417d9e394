"""`prunetune verify`: a clean prune passes; a tampered mask or weight fails with a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from prunetune.cli import main
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.verify import verify_dir
from prunetune.rundir import load_masks, read_mask_meta, save_masks


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, shared_data):
    out = tmp_path_factory.mktemp("verify") / "pruned"
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(out), pattern="block16x16", calib_dataset="wikitext2",
                      data_dir=str(shared_data), nsamples=4, seqlen=64)
    return run_prune(cfg, console=Console(quiet=True))


def _copy(pruned: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(pruned, dst)
    return dst


def test_clean_output_verifies(pruned, capsys):
    assert verify_dir(pruned).ok
    assert main(["verify", str(pruned)]) == 0
    assert "14 matrices match" in capsys.readouterr().out


@pytest.mark.slow
def test_tampered_weight_fails(pruned, tmp_path):
    d = _copy(pruned, tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    keep = load_masks(d)[name]
    w = weights[f"{name}.weight"]
    w[~keep] = w[~keep].clone().index_fill_(0, torch.tensor([0]), 0.5)  # one pruned weight brought back
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    result = verify_dir(d)
    assert not result.ok and any("non-zero" in p for p in result.problems[name])
    # the real command, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "prunetune", "verify", str(d)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 1 and name in proc.stdout


def test_tampered_mask_fails(pruned, tmp_path):
    d = _copy(pruned, tmp_path)
    masks = load_masks(d)
    name = "model.layers.0.self_attn.q_proj"
    masks[name] = masks[name].clone()
    masks[name][:16, :16] = ~masks[name][:16, :16]  # still whole tiles, so only the record and weights can tell
    save_masks(masks, d, read_mask_meta(d)["pattern"])
    result = verify_dir(d)
    assert not result.ok and any("digest" in p for p in result.problems[name])
    assert main(["verify", str(d)]) == 1


def test_pattern_break_and_missing_mask_fail(pruned, tmp_path):
    d = _copy(pruned, tmp_path)
    masks = load_masks(d)
    name = "model.layers.0.mlp.up_proj"
    masks[name] = masks[name].clone()
    masks[name][0, 0] = ~masks[name][0, 0]
    del masks["model.layers.1.self_attn.v_proj"]
    save_masks(masks, d, read_mask_meta(d)["pattern"])
    record = json.loads((d / "prune.json").read_text())
    record["mask_digests"].pop(name)
    (d / "prune.json").write_text(json.dumps(record))
    problems = verify_dir(d).problems
    assert any("partly pruned" in p for p in problems[name])
    assert "model.layers.1.self_attn.v_proj" in problems


def test_not_a_pruned_dir_is_user_error(tmp_path, tiny_model_dir):
    assert main(["verify", str(tiny_model_dir)]) == 2
