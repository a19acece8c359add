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

Teacher cache: when every term is sentence-level (cosine, MSE, similarity matrix, neighbours) the teacher's
only output is one embedding per sentence, a pure function of the sentence's tokens. The pass
then computes them once for all training sentences (`teacher_embeddings`) and the objective
looks them up by the sentence's token ids, so a step costs the student's forward and backward
only (on MiniLM 6 -> 3 layers that is ~1.7x more steps in the same CPU time).

Neighbour bank: the neighbour term compares each sentence with a bank of the teacher's
embeddings of training sentences (`neighbour_bank`): the cache's, or a sample's when there is no
cache; a sentence's own bank row is left out of its softmax.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.ops.encoder_kd import attention_kl, cosine_loss, mse_loss, neighbour_kl, relations_kl, similarity_loss
from kompakt.ops.kd_losses import HiddenProjection, hidden_state_loss

# the terms that read token states or attention, so the teacher runs in every step (no cache)
TOKEN_LEVEL_WEIGHTS = ("hidden_weight", "attention_weight", "relation_weight")


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


def row_key(ids: torch.Tensor, mask: torch.Tensor) -> bytes:
    """The cache key of one padded row: its real token ids as bytes."""
    return ids[mask.bool()].to(torch.int64).cpu().numpy().tobytes()


@torch.no_grad()
def teacher_embeddings(teacher: nn.Module, pooling: Any, rows: list[torch.Tensor], pad: int,
                       batch_size: int = 64) -> dict[bytes, torch.Tensor]:  # fmt: skip
    """{row_key: the teacher's pooled embedding [D] (float32, CPU)} of every token row, batched
    longest first so padding stays small."""
    from kompakt.model.sentence import pool
    from kompakt.train.sentence_batches import pad_rows

    device = next(teacher.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -int(rows[i].numel()))
    cache: dict[bytes, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        ids, mask = pad_rows([rows[i] for i in order[start : start + batch_size]], pad)
        out = teacher(input_ids=ids.to(device), attention_mask=mask.to(device))
        emb = pool(out.last_hidden_state.float(), mask.to(device), pooling).cpu()
        for row in range(ids.shape[0]):
            cache[row_key(ids[row], mask[row])] = emb[row]
    return cache


def neighbour_bank(cache: dict[bytes, torch.Tensor]) -> tuple[torch.Tensor, dict[bytes, int]]:
    """(the cached teacher embeddings as unit rows [N, D], {row_key: row}) for neighbour_kl."""
    keys = list(cache)
    bank = torch.nn.functional.normalize(torch.stack([cache[k] for k in keys]).float(), dim=-1)
    return bank, {key: row for row, key in enumerate(keys)}


@dataclass
class EncoderDistillObjective:
    """cos·(1 − cos) + mse·MSE + similarity·MSE(similarity matrices) + neighbour·KL(bank
    similarities) + hidden·MSE(layers) + attention·KL(attn) + relation·KL(q/k/v relations)."""

    teacher: nn.Module
    teacher_pooling: Any  # kompakt.model.sentence.Pooling
    student_pooling: Any
    cosine_weight: float = 1.0
    mse_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: list[tuple[int, int]] = field(default_factory=list)
    projection: HiddenProjection | None = None
    hidden_relative: bool = False
    attention_weight: float = 0.0
    relation_weight: float = 0.0
    relation_heads: int = 1
    similarity_weight: float = 0.0
    neighbour_weight: float = 0.0
    neighbour_temperature: float = 0.05
    cache: dict[bytes, torch.Tensor] | None = None  # teacher_embeddings(); only for sentence-level terms
    bank: torch.Tensor | None = None  # neighbour_bank(); needed when neighbour_weight > 0
    bank_index: dict[bytes, int] = field(default_factory=dict)

    @property
    def sentence_level(self) -> bool:
        """Whether every term reads only the pooled embeddings (so the teacher can be cached)."""
        return not any(getattr(self, weight) > 0 for weight in TOKEN_LEVEL_WEIGHTS)

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
        s_out, s_vec = self._forward(model, ids, mask, hidden, qkv)
        s_emb = pool(s_out.last_hidden_state.float(), mask, self.student_pooling)
        keys = [row_key(ids[i], mask[i]) for i in range(ids.shape[0])] if self.cache is not None or self.bank_index else []
        if self.cache is not None and self.sentence_level:
            t_emb = torch.stack([self.cache[key] for key in keys]).to(s_emb.device)
            t_out, t_vec = None, {}
        else:
            device = next(self.teacher.parameters()).device
            with torch.no_grad():
                t_out, t_vec = self._forward(self.teacher, ids.to(device), mask.to(device), hidden, qkv)
            t_emb = pool(t_out.last_hidden_state.to(ids.device).float(), mask, self.teacher_pooling)
        terms: dict[str, torch.Tensor] = {}
        if self.cosine_weight > 0:
            terms["cosine"] = (self.cosine_weight, cosine_loss(s_emb, t_emb))
        if self.mse_weight > 0:
            terms["mse"] = (self.mse_weight, mse_loss(s_emb, t_emb))
        if self.similarity_weight > 0:
            terms["similarity"] = (self.similarity_weight, similarity_loss(s_emb, t_emb))
        if self.neighbour_weight > 0:
            if self.bank is None:
                raise ValueError("the neighbour term needs a bank of teacher embeddings (neighbour_bank)")
            own = torch.tensor([self.bank_index.get(key, -1) for key in keys], dtype=torch.long, device=s_emb.device)
            value = neighbour_kl(s_emb, t_emb, self.bank.to(s_emb.device), self.neighbour_temperature, own)
            terms["neighbour"] = (self.neighbour_weight, value)
        if hidden:
            states = tuple(h.to(ids.device) for h in t_out.hidden_states)
            terms["hidden"] = (self.hidden_weight, hidden_state_loss(
                s_out.hidden_states, states, self.layer_map, projection=self.projection, mask=mask.bool(),
                relative=self.hidden_relative))  # fmt: skip
        t_vec = {k: v.to(ids.device) for k, v in t_vec.items()}
        if self.attention_weight > 0:
            value = attention_kl((s_vec["q"], s_vec["k"]), (t_vec["q"], t_vec["k"]), num_heads(model),
                                 num_heads(self.teacher), mask)  # fmt: skip
            terms["attention"] = (self.attention_weight, value)
        if self.relation_weight > 0:
            terms["relation"] = (self.relation_weight, relations_kl(s_vec, t_vec, self.relation_heads, mask))
        loss = sum((weight * value for weight, value in terms.values()), s_emb.new_zeros(()))
        return loss, {name: float(value.detach()) for name, (_, value) in terms.items()}
