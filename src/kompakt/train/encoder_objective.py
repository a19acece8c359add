"""The distillation objective for sentence encoders (distill.kd on an encoder).

Per micro-batch of padded sentences (ids, attention mask): the teacher runs once under
no_grad, then the student; the loss is a weighted sum of the terms in
`kompakt.ops.encoder_kd` — sentence-embedding cosine and MSE (pooled as each model's
sentence-transformers files say), mapped hidden-state MSE (TinyBERT), last-layer attention
KL (MiniLM v1) and q/k/v relation KL (MiniLM v2).

The attention terms need the last layer's q, k and v vectors. They are read with forward
hooks on the q / k / v Linears the ArchSpec names (fused qkv split by its row counts), so the
models keep their fast attention kernels (output_attentions would force the eager one).
For families with rotary positions (ModernBERT) the vectors are taken before the rotation:
the relations then compare content, not position.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.ops.encoder_kd import attention_kl, cosine_loss, mse_loss, relations_kl
from kompakt.ops.kd_losses import HiddenProjection, hidden_state_loss


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


@contextmanager
def capture_qkv(model: nn.Module, enabled: bool):
    """{"q", "k", "v"} -> the last layer's projections [B, T, width] while the block runs."""
    from kompakt.model.arch import arch_for, decoder_layers, fused_splits, linear_modules

    found: dict[str, torch.Tensor] = {}
    if not enabled:
        yield found
        return
    model = _unwrap(model)
    spec = arch_for(model)
    linears = linear_modules(decoder_layers(model)[-1], spec)
    handles = []

    def keep(name: str):
        def hook(_module, _inputs, output):
            found[name] = output

        return hook

    def keep_fused(_module, _inputs, output):
        sizes = list(fused_splits(model)["attn.qkv"].values())
        found.update(zip("qkv", output.split(sizes, dim=-1)))

    if "attn.qkv" in linears:
        handles.append(linears["attn.qkv"].register_forward_hook(keep_fused))
    else:
        for role in ("q", "k", "v"):
            handles.append(linears[f"attn.{role}"].register_forward_hook(keep(role)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def num_heads(model: nn.Module) -> int:
    from kompakt.model.arch import text_config

    config = text_config(_unwrap(model))
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_heads"))


@dataclass
class EncoderDistillObjective:
    """cos·(1 − cos) + mse·MSE + hidden·MSE(layers) + attention·KL(attn) + relation·KL(q/k/v relations)."""

    teacher: nn.Module
    teacher_pooling: Any  # kompakt.model.sentence.Pooling
    student_pooling: Any
    cosine_weight: float = 1.0
    mse_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    projection: HiddenProjection | None = None
    attention_weight: float = 0.0
    relation_weight: float = 0.0
    relation_heads: int = 1

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.projection} if self.projection is not None else {}

    def _forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, hidden: bool, qkv: bool):
        with capture_qkv(model, qkv) as vectors:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        return out, dict(vectors)

    def __call__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
        from kompakt.model.sentence import pool

        hidden = self.hidden_weight > 0
        qkv = self.attention_weight > 0 or self.relation_weight > 0
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            t_out, t_vec = self._forward(self.teacher, ids.to(device), mask.to(device), hidden, qkv)
        s_out, s_vec = self._forward(model, ids, mask, hidden, qkv)
        t_emb = pool(t_out.last_hidden_state.to(ids.device).float(), mask, self.teacher_pooling)
        s_emb = pool(s_out.last_hidden_state.float(), mask, self.student_pooling)
        terms: dict[str, torch.Tensor] = {}
        if self.cosine_weight > 0:
            terms["cosine"] = (self.cosine_weight, cosine_loss(s_emb, t_emb))
        if self.mse_weight > 0:
            terms["mse"] = (self.mse_weight, mse_loss(s_emb, t_emb))
        if hidden:
            states = tuple(h.to(ids.device) for h in t_out.hidden_states)
            terms["hidden"] = (self.hidden_weight, hidden_state_loss(
                s_out.hidden_states, states, self.layer_map, projection=self.projection, mask=mask.bool()))  # fmt: skip
        t_vec = {k: v.to(ids.device) for k, v in t_vec.items()}
        if self.attention_weight > 0:
            value = attention_kl((s_vec["q"], s_vec["k"]), (t_vec["q"], t_vec["k"]), num_heads(model),
                                 num_heads(self.teacher), mask)  # fmt: skip
            terms["attention"] = (self.attention_weight, value)
        if self.relation_weight > 0:
            terms["relation"] = (self.relation_weight, relations_kl(s_vec, t_vec, self.relation_heads, mask))
        loss = sum((weight * value for weight, value in terms.values()), s_emb.new_zeros(()))
        return loss, {name: float(value.detach()) for name, (_, value) in terms.items()}
