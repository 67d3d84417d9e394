"""Knowledge distillation from the dense model during recovery.

loss = CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), the KL taken per predicted token
over the vocabulary at temperature T and averaged over the tokens that have a label. T^2 keeps the
gradient scale of the soft term independent of T (Hinton et al., 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> DistillLoss:
    """student/teacher logits (B, T, V), labels (B, T) unshifted as the model receives them."""
    vocab = student_logits.shape[-1]
    s = student_logits[:, :-1, :].float().reshape(-1, vocab)  # (B*(T-1), V): position t predicts t+1
    t = teacher_logits[:, :-1, :].float().reshape(-1, vocab)
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    ce = F.cross_entropy(s[keep], target[keep])
    log_p_student = F.log_softmax(s[keep] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[keep] / temperature, dim=-1)
    # KL(teacher || student) per token, summed over the vocabulary, then the token mean.
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1).mean()
    return DistillLoss(ce + alpha * temperature**2 * kl, ce, kl)


def distill_compute_loss(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, object]:
    """The Trainer `compute_loss` body with a frozen teacher: (loss, student outputs)."""
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs)
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits
    return kd_loss(outputs.logits, teacher_logits, labels, alpha, temperature).loss, outputs
