"""Distillation losses for sentence encoders: pure tensor math (no transformers), used by
distill.kd when the model is an encoder.

The kinds, each weighted in the pass config:

- Sentence level (what an embedding model is used for): `1 − cos(student, teacher)` of the
  pooled sentence embeddings, and / or their mean squared error (Reimers & Gurevych 2020,
  "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", train
  students with MSE on the teacher's sentence embeddings).
- Similarity structure (relational KD, Park et al. 2019, "Relational Knowledge Distillation";
  the in-batch form of Sentence-BERT distillation's goal that neighbours stay neighbours): the
  MSE between the student's and the teacher's in-batch cosine-similarity matrices [B, B],
  off-diagonal. It targets what neighbour recall measures: the order of similarities.
- Neighbourhoods (CompRess, Abbasi Koohpayegani et al. 2020, "CompRess: Self-Supervised Learning
  by Compressing Representations"; SEED, Fang et al. 2021): each sentence's similarities to a
  bank of the teacher's embeddings of other sentences, as a softmax at temperature τ, for the
  student's embedding and the teacher's; KL(teacher ‖ student). Unlike the in-batch matrix it
  compares against thousands of sentences, so it sees the near neighbours that recall@10 ranks
  (32 random sentences rarely contain one); the bank is the teacher's, so it costs one small
  matrix product per step.
- Hidden states (TinyBERT, Jiao et al. 2020): MSE of mapped layer outputs, with a learned
  projection when widths differ — `kompakt.ops.kd_losses.hidden_state_loss`, shared with the
  decoder path (here masked by the attention mask, so padding does not count).
- Attention distributions (MiniLM v1, Wang et al. 2020): KL(teacher ‖ student) of the last
  layer's self-attention distributions softmax(q·kᵀ/√d_head), per head and query position.
  Needs the same number of heads in both models.
- Self-attention relations (MiniLM v2, Wang et al. 2021): the query-query, key-key and
  value-value relations softmax(x·xᵀ/√d_r) of the last layer, with the q / k / v vectors of
  both models re-split into the same number of *relation heads* (so student and teacher may
  have different head counts and widths), KL(teacher ‖ student) per relation head and
  position, averaged over the three relations.

Shapes: sentence embeddings [B, D]; hidden / q / k / v states [B, T, width]; the attention
mask [B, T] (1 = token, 0 = padding). Padded keys get no attention mass; padded queries are
not counted. Every loss is a mean over counted positions (and heads).

Every loss computes in float32 with autocast off (`_fp32`): under bf16 autocast the relation
matmuls and their log-softmax would run in bf16, whose rounding (≈1 % of a probability)
exceeds the KL of two near-uniform attention maps and makes it negative.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

RELATIONS = ("q", "k", "v")


def _fp32(function):
    """Run `function` with autocast off (inputs are cast to float32 inside)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)

    return wrapper


@_fp32
def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over sentences of 1 − cos(student, teacher) ([B, D] each; 0 when aligned)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@_fp32
def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the sentence embeddings ([B, D] each), averaged over B and D."""
    return (student.float() - teacher.float()).pow(2).mean()


@_fp32
def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of the in-batch cosine-similarity matrices ([B, D] each -> [B, B]), diagonal left out
    (always 1 on both sides); 0 for a batch of one."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    diff = s @ s.T - t @ t.T
    off = ~torch.eye(diff.shape[0], dtype=torch.bool, device=diff.device)
    return diff[off].pow(2).mean() if off.any() else diff.new_zeros(())


@_fp32
def neighbour_kl(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, temperature: float,
                 own: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean over sentences of KL(teacher ‖ student) between softmax(cos(x, bank)/τ) of the
    teacher's and the student's embedding ([B, D] each; bank [N, D], rows unit length).
    `own` [B]: each sentence's own row in the bank (-1: none), left out of both softmaxes (its
    teacher similarity is 1 and would take all the mass)."""
    scale = 1.0 / temperature
    logits_t = F.normalize(teacher.float(), dim=-1) @ bank.T * scale  # [B, N]
    logits_s = F.normalize(student.float(), dim=-1) @ bank.T * scale
    if own is not None and bool((own >= 0).any()):
        rows = torch.nonzero(own >= 0).squeeze(1)
        blocked = torch.zeros_like(logits_t, dtype=torch.bool)
        blocked[rows, own[rows]] = True
        logits_t = logits_t.masked_fill(blocked, -math.inf)
        logits_s = logits_s.masked_fill(blocked, -math.inf)
    log_t, log_s = F.log_softmax(logits_t, dim=-1), F.log_softmax(logits_s, dim=-1)
    p = log_t.exp()
    # blocked entries: p = 0 and both logs -inf; 0 · nan must count as 0
    return torch.where(p > 0, p * (log_t - log_s), torch.zeros_like(p)).sum(-1).mean()


def _masked_rows_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, H, T] over heads and the query positions where mask [B, T] is 1."""
    weights = mask.to(values.dtype)[:, None, :].expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _log_relation(states: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(x·xᵀ/√d) per head: [B, T, W] -> [B, heads, T, T], padded keys excluded."""
    batch, length, width = states.shape
    if width % heads:
        raise ValueError(f"width {width} does not split into {heads} heads; choose a head count dividing it")
    per_head = width // heads
    x = states.float().reshape(batch, length, heads, per_head).transpose(1, 2)  # [B, H, T, d]
    scores = x @ x.transpose(-1, -2) / math.sqrt(per_head)
    blocked = ~mask.bool()[:, None, None, :]  # padded keys
    return F.log_softmax(scores.masked_fill(blocked, torch.finfo(scores.dtype).min), dim=-1)


def _log_attention(q: torch.Tensor, k: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(q·kᵀ/√d_head) per head: [B, T, W] x2 -> [B, heads, T, T]."""
    batch, length, width = q.shape
    if width % heads:
        raise ValueError(f"q width {width} does not split into {heads} heads")
    per_head = width // heads
    qh = q.float().reshape(batch, length, heads, per_head).transpose(1, 2)
    kh = k.float().reshape(batch, length, heads, per_head).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(per_head)
    blocked = ~mask.bool()[:, None, None, :]
    return F.log_softmax(scores.masked_fill(blocked, torch.finfo(scores.dtype).min), dim=-1)


def _kl_rows(log_teacher: torch.Tensor, log_student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per row of [B, H, T, T] log-distributions, mean over counted rows."""
    p = log_teacher.exp()
    # padded keys hold p = 0; their log values are finite (finfo.min before softmax), so 0·x = 0
    per_row = (p * (log_teacher - log_student)).sum(-1)  # [B, H, T]
    return _masked_rows_mean(per_row, mask)


@_fp32
def attention_kl(student_qk: tuple[torch.Tensor, torch.Tensor], teacher_qk: tuple[torch.Tensor, torch.Tensor],
                 student_heads: int, teacher_heads: int, mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """MiniLM v1: KL of the self-attention distributions, from each model's q and k vectors."""
    if student_heads != teacher_heads:
        raise ValueError(
            f"attention distributions need the same head count (student {student_heads}, teacher "
            f"{teacher_heads}); use the relation loss (MiniLM v2), which re-splits heads"
        )
    log_t = _log_attention(*teacher_qk, teacher_heads, mask)
    log_s = _log_attention(*student_qk, student_heads, mask)
    return _kl_rows(log_t, log_s, mask)


@_fp32
def relation_kl(student: torch.Tensor, teacher: torch.Tensor, relation_heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM v2: KL of one self-attention relation (q-q, k-k or v-v) with both models' vectors
    re-split into `relation_heads` heads ([B, T, W_s] and [B, T, W_t])."""
    return _kl_rows(_log_relation(teacher, relation_heads, mask), _log_relation(student, relation_heads, mask), mask)


def relations_kl(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], relation_heads: int,
                 mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean of the q-q, k-k and v-v relation KLs (MiniLM v2's loss for one layer)."""
    return torch.stack([relation_kl(student[r], teacher[r], relation_heads, mask) for r in RELATIONS]).mean()
