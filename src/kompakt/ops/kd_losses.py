"""Knowledge-distillation losses: pure tensor math (no transformers), shared by distill.kd,
finetune.lora (optional KD term) and quant.qat.

The logit loss is Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") as
DistilBERT (Sanh et al. 2019) uses it::

    loss = α · T² · D(softmax(teacher / T), softmax(student / T)) + (1 − α) · CE(student, labels)

The T² keeps the soft term's gradient scale independent of T. D is one of
- "forward": KL(teacher ‖ student) — mean-seeking, the classic choice;
- "reverse": KL(student ‖ teacher) — mode-seeking (MiniLLM, Gu et al. 2024);
- "jsd": the Jensen-Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2 (bounded, symmetric).

Top-k teacher logits (`TopK`) bound memory when teacher logits are kept: the teacher's
distribution is renormalised over its k most likely tokens. Forward KL then uses the student's
full log-probabilities (mass the student puts outside the support still costs); reverse KL and
JSD compare both distributions renormalised over the support.

Hidden-state loss (TinyBERT, Jiao et al. 2020): mean squared error between student layer
outputs and the teacher layers they map to (`uniform_layer_map`), through a learned linear
projection when the widths differ (`HiddenProjection`).

Shapes: logits [..., vocab]; labels [...] with `ignore_index` where no target exists; a mask
[...] (bool) selects the positions that count. Every loss is a mean over counted positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIVERGENCES = ("forward", "reverse", "jsd")
IGNORE_INDEX = -100


@dataclass
class TopK:
    """The teacher's k largest logits per position: values [..., k] and vocabulary indices [..., k]."""

    values: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, k: int) -> TopK:
        values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
        return cls(values, indices)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from log-probabilities (0·log 0 taken as 0)."""
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0, dtype=log_p.dtype))
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    *,
    temperature: float = 1.0,
    kind: str = "forward",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over counted positions of D(teacher at T, student at T) (no T² factor here)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    s = student_logits.float() / temperature
    if isinstance(teacher, TopK):
        log_t = F.log_softmax(teacher.values.float() / temperature, dim=-1)
        if kind == "forward":
            log_s = F.log_softmax(s, dim=-1).gather(-1, teacher.indices)
        else:
            log_s = F.log_softmax(s.gather(-1, teacher.indices), dim=-1)
    else:
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
        log_s = F.log_softmax(s, dim=-1)
    if kind == "forward":
        per_position = _kl(log_t, log_s)
    elif kind == "reverse":
        per_position = _kl(log_s, log_t)
    else:
        per_position = _jsd(log_t, log_s)
    return _masked_mean(per_position, mask)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not `ignore_index`.

    `logits[..., i, :]` predicts `labels[..., i]` (callers shift; see `shift_for_next_token`).
    No counted position (e.g. a packed chat sequence holding only a prompt) gives 0, not NaN.
    """
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index,
                            reduction="sum")  # fmt: skip
    return total / (flat != ignore_index).sum().clamp_min(1)


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align [B, L, V] logits with [B, L] labels: position i predicts token i + 1."""
    return logits[:, :-1], labels[:, 1:]


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK | None,
    labels: torch.Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    kind: str = "forward",
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, dict[str, float]]:
    """α·T²·D(teacher ‖ student at T) + (1 − α)·CE(student, labels), already aligned.

    `labels` equal `ignore_index` where a position has no target; the soft term counts the
    same positions (so chat prompts are ignored by both terms). α = 1 is pure distillation
    (labels may then be None), α = 0 plain cross-entropy (teacher may be None).

    Returns:
        (scalar loss, {"kd": D value, "ce": CE value} as floats for logging).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mask = None if labels is None else labels != ignore_index
    parts: dict[str, float] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        if teacher is None:
            raise ValueError("alpha > 0 needs teacher logits")
        soft = divergence(student_logits, teacher, temperature=temperature, kind=kind, mask=mask)
        total = total + alpha * temperature**2 * soft
        parts["kd"] = float(soft.detach())
    if alpha < 1:
        if labels is None:
            raise ValueError("alpha < 1 needs labels")
        hard = cross_entropy(student_logits, labels, ignore_index)
        total = total + (1 - alpha) * hard
        parts["ce"] = float(hard.detach())
    return total, parts


# --- hidden states ---------------------------------------------------------------------------


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based over layer outputs (0 = embeddings).

    Student layer i (of n_s) imitates teacher layer round(i · n_t / n_s): the last layers
    always pair, the rest spread evenly (TinyBERT's uniform strategy).
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError("both models need at least one layer")
    return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]


class HiddenProjection(nn.Module):
    """One learned linear map per mapped layer from the student's width to the teacher's
    (identity-free: used only when the widths differ; trained with the student)."""

    def __init__(self, n_pairs: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_pairs))
        for linear in self.maps:  # start near "copy the first dims" rather than noise
            with torch.no_grad():
                linear.weight.zero_()
                n = min(student_width, teacher_width)
                linear.weight[:n, :n] = torch.eye(n)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[index](hidden)


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    layer_map: list[tuple[int, int]],
    *,
    projection: HiddenProjection | None = None,
    mask: torch.Tensor | None = None,
    relative: bool = False,
) -> torch.Tensor:
    """Mean over mapped pairs of the per-position MSE between (projected) student and teacher
    hidden states; `*_hidden[i]` is the output of layer i ([B, L, width]; 0 = embeddings).

    `relative`: each position's squared error divided by the teacher vector's own squared norm
    (‖h − t‖² / ‖t‖², 1 = as far off as the vector is long), so the term has the same scale on
    every model and layer. The raw MSE grows with the hidden states' magnitude: on SmolLM2 it is
    ~250× the KD terms at the first step, and a decoder's first positions (attention sinks) can
    be 100× longer than the rest and would dominate a per-layer normalisation.
    """
    losses = []
    for index, (s, t) in enumerate(layer_map):
        h = student_hidden[s].float()
        if projection is not None:
            h = projection(index, h)
        target = teacher_hidden[t].float()
        if h.shape[-1] != target.shape[-1]:
            raise ValueError(f"hidden widths differ ({h.shape[-1]} vs {target.shape[-1]}); pass a HiddenProjection")
        error = (h - target).pow(2).mean(-1)
        if relative:
            scale = target.pow(2).mean(-1)
            # a near-zero teacher vector (padding) would blow its position up: floor at 1e-6 of the mean
            error = error / scale.clamp_min(scale.mean() * 1e-6 + 1e-12)  # a tensor bound: no device sync
        losses.append(_masked_mean(error, mask))
    return torch.stack(losses).mean()
