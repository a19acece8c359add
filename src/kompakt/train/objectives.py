"""Training objectives for the loop: distillation from a teacher (with plain cross-entropy as
its α = 0 case) and an optional hidden-state term.

The teacher runs once per micro-batch under no_grad, before the student, and its logits are
used for that batch only (nothing recomputed, nothing kept across batches); with `top_k` only
the k largest logits per position are kept while the student runs. With a `cache`
(kompakt.train.teacher_cache) the teacher's top-k of each batch is read from disk instead: the
teacher does not run during training at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kompakt.ops.kd_losses import HiddenProjection, TopK, hidden_state_loss, kd_loss, shift_for_next_token
from kompakt.train.teacher_cache import TeacherCache


@dataclass
class DistillObjective:
    """α·T²·D(teacher ‖ student) + (1 − α)·CE + hidden_weight·MSE(hidden states) (relative to the
    teacher's squared norms with `hidden_relative`)."""

    teacher: nn.Module | None
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward"
    top_k: int | None = None
    hidden_weight: float = 0.0
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    projection: HiddenProjection | None = None
    hidden_relative: bool = False
    cache: TeacherCache | None = None

    def __post_init__(self) -> None:
        if self.cache is not None and self.hidden_weight > 0:
            raise ValueError("a teacher cache holds top-k logits only, not hidden states")

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.projection} if self.projection is not None else {}

    @property
    def uses_teacher(self) -> bool:
        return (self.teacher is not None or self.cache is not None) and (self.alpha > 0 or self.hidden_weight > 0)

    def _teacher(self, ids: torch.Tensor, hidden: bool):
        if self.cache is not None:
            return self.cache.lookup(ids), None
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            out = self.teacher(input_ids=ids.to(device), use_cache=False, output_hidden_states=hidden)
        logits = out.logits[:, :-1].to(ids.device)
        target = TopK.of(logits, self.top_k) if self.top_k else logits
        states = tuple(h.to(ids.device) for h in out.hidden_states) if hidden else None
        return target, states

    def __call__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
        hidden = self.hidden_weight > 0
        teacher_logits, teacher_states = self._teacher(ids, hidden) if self.uses_teacher else (None, None)
        out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        logits, targets = shift_for_next_token(out.logits, labels)
        loss, parts = kd_loss(logits, teacher_logits if self.alpha > 0 else None, targets, alpha=self.alpha,
                              temperature=self.temperature, kind=self.divergence)  # fmt: skip
        if hidden:
            mask = (labels != -100)
            term = hidden_state_loss(out.hidden_states, teacher_states, self.layer_map,
                                     projection=self.projection, mask=mask, relative=self.hidden_relative)  # fmt: skip
            loss = loss + self.hidden_weight * term
            parts["hidden"] = float(term.detach())
        return loss, parts
