"""Sparse fine-tuning under `torchrun --nproc_per_node 2` on CPU (gloo) with gradient accumulation 2: every
rank ends with the same weights, the pruned positions exactly zero, the kept ones trained.

Run as a script by torchrun (the `__main__` block is the worker); pytest runs the launcher test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def worker(out: Path) -> None:
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from prunetune.architecture import prunable_linears
    from prunetune.recovery import registry
    from tiny import tiny_config

    torch.manual_seed(0)  # the same model and masks on every rank
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 97))
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in prunable_linears(model).items()}
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    prepared = registry.get("sparse-ft").prepare(model, masks, types.SimpleNamespace(sparse_ft_targets=("all-linear",)))

    class Tokens(Dataset):
        ids = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(2))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        learning_rate=1e-2, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, ddp_find_unused_parameters=False, logging_steps=1,
    )
    trainer = Trainer(model=prepared.model, args=args, train_dataset=Tokens(), callbacks=prepared.callbacks)
    trainer.train()
    rank = int(os.environ["RANK"])
    weights = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    torch.save({"weights": weights, "masks": masks, "before": before, "steps": trainer.state.global_step,
                "world_size": trainer.args.world_size},
               out / f"rank{rank}.pt")


@pytest.mark.slow
def test_sparse_ft_under_torchrun_keeps_zeros_and_ranks_agree(tmp_path):
    if not TORCHRUN.is_file():
        pytest.skip(f"{TORCHRUN} is missing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "src")])}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", str(Path(__file__)), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["world_size"] == 2
    for name, weight in ranks[0]["weights"].items():
        keep = ranks[0]["masks"][name]
        torch.testing.assert_close(ranks[1]["weights"][name], weight, rtol=0, atol=0)
        assert bool((weight[~keep] == 0).all()), name
        assert bool((weight[keep] != ranks[0]["before"][name][keep]).float().mean() > 0.9), name


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
