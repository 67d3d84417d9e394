"""Knowledge distillation from the dense model during recovery (`--distill logits|layerwise|both`).

logits:    loss = CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), the KL taken per predicted
           token over the vocabulary at temperature T and averaged over the tokens that have a label. T^2 keeps
           the gradient scale of the soft term independent of T (Hinton et al., 2015).
layerwise: loss = CE + beta * SquareHead, SquareHead = mean over decoder layers l of
           ||h_s^l - h_t^l||^2 / ||h_t^l||^2 (the MSE normalised by the teacher's hidden-state energy, so every
           layer counts alike whatever its scale; Kurtic et al. 2023, "Sparse Fine-tuning for Inference
           Acceleration of Large Language Models").
both:      CE + the KL term + the SquareHead term.

Memory: the teacher runs under no_grad, so beside its weights (a 7B teacher: 13.5 GB in bf16/fp16) it holds
one layer's activations at a time plus, for layerwise, its L hidden states (L x B x T x hidden, e.g. Llama-2-7B
at B=1, T=1024: 32 x 8 MiB in bf16); the student's hidden states are kept by autograd anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from prunetune.finetune.config import DISTILL_MODES, distill_mode  # noqa: F401  (DISTILL_MODES re-exported)

IGNORE_INDEX = -100
# One definition of the modes and of reading them (also YAML booleans of older configs): the config owns it.
parse_mode = distill_mode


@dataclass(frozen=True)
class DistillSpec:
    """What the teacher contributes to the loss."""

    mode: str = "logits"
    """none | logits | layerwise | both."""
    alpha: float = 0.5
    """Weight of the logit KL term."""
    temperature: float = 2.0
    """Softmax temperature of the KL term."""
    layerwise_weight: float = 1.0
    """Weight of the SquareHead term (the paper weighs CE, KL and SquareHead equally)."""

    @property
    def logits(self) -> bool:
        return self.mode in ("logits", "both")

    @property
    def layerwise(self) -> bool:
        return self.mode in ("layerwise", "both")

    @classmethod
    def from_config(cls, cfg: object) -> DistillSpec:
        return cls(parse_mode(getattr(cfg, "distill", "logits")), float(getattr(cfg, "distill_alpha", 0.5)),
                   float(getattr(cfg, "distill_temperature", 2.0)),
                   float(getattr(cfg, "distill_layerwise_weight", 1.0)))


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


def squarehead_loss(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2, each (B, T, H), summed over the tokens that
    `attention_mask` (B, T) keeps (all when None). 0 for identical hidden states, > 0 otherwise."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}: "
                         "layer-wise distillation needs the same architecture")
    losses = []
    for h_s, h_t in zip(student_hidden, teacher_hidden, strict=True):
        h_t = h_t.detach().to(torch.float32)
        diff = (h_s.float() - h_t).pow(2).sum(-1)  # (B, T)
        energy = h_t.pow(2).sum(-1)  # (B, T)
        if attention_mask is not None:
            keep = attention_mask.to(diff.dtype)
            diff, energy = diff * keep, energy * keep
        losses.append(diff.sum() / (energy.sum() + eps))
    return torch.stack(losses).mean()


def decoder_hidden_states(outputs: object) -> tuple[torch.Tensor, ...]:
    """The output of every decoder layer: `hidden_states` without the embeddings (index 0)."""
    hidden = getattr(outputs, "hidden_states", None)
    if not hidden:
        raise ValueError("the model returned no hidden_states; layer-wise distillation needs output_hidden_states")
    return tuple(hidden[1:])


def distill_compute_loss(
    model: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, torch.Tensor],
    alpha: float | DistillSpec = 0.5,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, object]:
    """The Trainer `compute_loss` body with a frozen teacher: (loss, student outputs).

    `alpha` may be a DistillSpec (mode, weights); a float keeps the logit-only call of earlier versions.
    """
    spec = alpha if isinstance(alpha, DistillSpec) else DistillSpec("logits", float(alpha), temperature)
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if spec.layerwise:
        model_inputs["output_hidden_states"] = True
    outputs = model(**model_inputs)
    with torch.no_grad():
        teacher_out = teacher(**model_inputs)
    if spec.logits:
        loss = kd_loss(outputs.logits, teacher_out.logits, labels, spec.alpha, spec.temperature).loss
    else:
        loss = _ce(outputs.logits, labels)
    if spec.layerwise:
        loss = loss + spec.layerwise_weight * squarehead_loss(
            decoder_hidden_states(outputs), decoder_hidden_states(teacher_out), inputs.get("attention_mask"))
    return loss, outputs


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as the model computes it: (B, T, V) logits, (B, T) unshifted labels."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1, :].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
