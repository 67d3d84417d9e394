"""Distillation loss against a direct computation, and a `--distill` run with the dense teacher."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as F

from prunetune.finetune.distill import kd_loss
from prunetune.finetune.engine import run_finetune
from prunetune.rundir.records import read_jsonl


def reference(student, teacher, labels, alpha, temperature):
    """Token by token: CE on the shifted labels, KL(teacher||student) = sum p_t (log p_t - log p_s)."""
    ces, kls = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1]
            if target == -100:
                continue
            ces.append(-torch.log_softmax(student[b, t], -1)[target])
            p_t = torch.softmax(teacher[b, t] / temperature, -1)
            log_p_s = torch.log_softmax(student[b, t] / temperature, -1)
            kls.append((p_t * (p_t.log() - log_p_s)).sum())
    ce, kl = torch.stack(ces).mean(), torch.stack(kls).mean()
    return ce + alpha * temperature**2 * kl, ce, kl


def test_kd_loss_matches_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3] = -100
    got = kd_loss(student, teacher, labels, alpha=0.7, temperature=2.5)
    want = reference(student, teacher, labels, 0.7, 2.5)
    for g, w in zip((got.loss, got.ce, got.kl), want, strict=True):
        assert g.item() == pytest.approx(w.item(), rel=1e-5)


def test_kd_loss_limits():
    torch.manual_seed(1)
    logits, labels = torch.randn(1, 6, 9), torch.randint(0, 9, (1, 6))
    same = kd_loss(logits, logits.clone(), labels, alpha=1.0, temperature=3.0)
    assert same.kl.item() == pytest.approx(0.0, abs=1e-6)
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert kd_loss(logits, torch.randn(1, 6, 9), labels, alpha=0.0, temperature=2.0).loss.item() == pytest.approx(ce.item())


def test_only_the_student_gets_gradients():
    student = torch.randn(1, 4, 5, requires_grad=True)
    teacher = torch.randn(1, 4, 5, requires_grad=True)
    kd_loss(student, teacher.detach(), torch.randint(0, 5, (1, 4)), 0.5, 2.0).loss.backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.slow
def test_distill_run_uses_the_dense_teacher(tiny_model_dir, shared_data, tmp_path):
    from test_finetune import make_pruned_dir, small_config

    pruned = make_pruned_dir(tiny_model_dir, tmp_path / "pruned")
    common = dict(max_steps=2, logging_steps=1, eval_strategy="no", load_best_model_at_end=False, probe_steps=0)
    plain = small_config(pruned, tmp_path / "plain", shared_data, **common)
    kd = small_config(pruned, tmp_path / "kd", shared_data, distill=True, distill_alpha=1.0, **common)
    assert run_finetune(plain, stream=io.StringIO())["status"] == "completed"
    assert run_finetune(kd, stream=io.StringIO())["status"] == "completed"
    records = read_jsonl(tmp_path / "kd/metrics.jsonl")
    assert records[0]["distill"]["teacher"] == str(tiny_model_dir)
    first = {name: next(r["loss"] for r in read_jsonl(tmp_path / f"{name}/metrics.jsonl") if r["event"] == "log")
             for name in ("plain", "kd")}
    # Same data, seed and LoRA init: step 1 differs by the KL to the dense teacher, which is positive.
    assert first["kd"] > first["plain"]
