"""Layer-wise (SquareHead) distillation: against a direct computation, its limits, and the loss the Trainer
sees for each --distill mode."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.errors import UserError
from prunetune.finetune.distill import (
    DistillSpec,
    distill_compute_loss,
    kd_loss,
    parse_mode,
    squarehead_loss,
)
from tiny import tiny_config


def test_squarehead_matches_reference_and_limits():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 8) for _ in range(3)]
    student = [t + 0.3 * torch.randn_like(t) for t in teacher]
    want = torch.stack([((s - t) ** 2).sum() / (t**2).sum() for s, t in zip(student, teacher, strict=True)]).mean()
    assert squarehead_loss(student, teacher).item() == pytest.approx(want.item(), rel=1e-5)
    assert squarehead_loss(teacher, [t.clone() for t in teacher]).item() == 0.0
    assert squarehead_loss(student, teacher).item() > 0
    # Normalised: scaling both by 100 changes nothing, so every layer counts alike whatever its scale.
    scaled = squarehead_loss([100 * s for s in student], [100 * t for t in teacher])
    assert scaled.item() == pytest.approx(want.item(), rel=1e-4)


def test_squarehead_ignores_masked_tokens():
    torch.manual_seed(1)
    teacher = [torch.randn(1, 4, 6)]
    student = [teacher[0].clone()]
    student[0][0, 3] += 5.0  # only the padded token differs
    mask = torch.tensor([[1, 1, 1, 0]])
    assert squarehead_loss(student, teacher, mask).item() == 0.0
    assert squarehead_loss(student, teacher).item() > 0
    with pytest.raises(ValueError, match="same architecture"):
        squarehead_loss(student, teacher * 2)


def test_parse_mode():
    assert parse_mode(True) == "logits" and parse_mode(False) == "none" and parse_mode(None) == "none"
    assert parse_mode("Both") == "both" and parse_mode("layerwise") == "layerwise"
    with pytest.raises(UserError, match="choose one of"):
        parse_mode("hidden")


@pytest.fixture(scope="module")
def student_teacher():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama", 97)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student, teacher


def test_distill_modes_on_a_model(student_teacher):
    student, teacher = student_teacher
    ids = torch.randint(0, 97, (2, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ce = student(input_ids=ids, labels=ids).loss
    # Identical teacher: no KL, no SquareHead; the loss is the model's own CE.
    for mode in ("logits", "layerwise", "both"):
        same, _ = distill_compute_loss(student, copy.deepcopy(student), inputs, DistillSpec(mode, 1.0, 2.0, 1.0))
        assert same.item() == pytest.approx(ce.item(), rel=1e-5), mode
    logits_only, out = distill_compute_loss(student, teacher, inputs, DistillSpec("logits", 1.0, 2.0))
    layer, _ = distill_compute_loss(student, teacher, inputs, DistillSpec("layerwise", 1.0, 2.0, 1.0))
    both, _ = distill_compute_loss(student, teacher, inputs, DistillSpec("both", 1.0, 2.0, 1.0))
    kd = kd_loss(out.logits, teacher(input_ids=ids).logits, ids, 1.0, 2.0).loss
    assert logits_only.item() == pytest.approx(kd.item(), rel=1e-5)
    assert layer.item() > ce.item() and both.item() > logits_only.item()
    assert both.item() == pytest.approx(logits_only.item() + layer.item() - ce.item(), rel=1e-4)
    # The old call (alpha, temperature floats) is the logit KD.
    old, _ = distill_compute_loss(student, teacher, inputs, 1.0, 2.0)
    assert old.item() == pytest.approx(logits_only.item(), rel=1e-6)


def test_layerwise_gradient_reaches_only_the_student(student_teacher):
    student, teacher = student_teacher
    ids = torch.randint(0, 97, (1, 6))
    student.zero_grad()
    teacher.requires_grad_(False)
    loss, _ = distill_compute_loss(student, teacher, {"input_ids": ids, "labels": ids},
                                   DistillSpec("layerwise", 0.0, 1.0, 1.0))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
