"""distill.kd on a sentence encoder: teacher check, training sentences, budget, objective, loop.

Not a pass itself (not in the registry): distill.kd calls `distill_encoder` when the model is
an encoder, the way it calls train_common for decoders.

Budget: `steps`, else `sentences` (steps = sentences / (batch_size · grad_accum)), else
`tokens` counted as real tokens (steps = tokens / (mean tokens per sentence · batch_size ·
grad_accum)). Data: the pass's `data`, else the run's data, else sentences split from text
the embedded SmolLM2 writes (kompakt.data.sentences; at most MAX_GENERATED_SENTENCES, cycled
over epochs). Sentences are truncated to the student's limit (kompakt.model.encode.input_limit), as
`embed()` truncates them in use.

Teacher cache: when every loss term is sentence-level (cosine, mse, similarity, neighbour) and the run sees
every training sentence at least once (and there are at most CACHE_MAX_SENTENCES), the teacher
embeds the training sentences once up front and the steps read those embeddings
(kompakt.train.encoder_objective.teacher_embeddings): a step is then the student's forward and
backward only. Hidden-state, attention and relation terms need the teacher's token states and
run it every step.

Neighbour bank (`neighbour_weight`): the cached teacher embeddings, or, without a cache, the
teacher's embeddings of up to BANK_MAX_SENTENCES training sentences drawn with the run's seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.passes.base import PassContext, PassReport
from kompakt.passes.train_common import layer_pairs, model_width
from kompakt.train.encoder_objective import EncoderDistillObjective, num_heads
from kompakt.model.encode import input_limit
from kompakt.train.sentence_batches import SentenceBatches

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1
ASSUMED_TOKENS_PER_SENTENCE = 32  # only sizes the request for data; the budget uses the real mean
MAX_GENERATED_SENTENCES = 4096
CACHE_MAX_SENTENCES = 200_000  # teacher embeddings cached up to this many sentences (~300 MB at 384 dims)
BANK_MAX_SENTENCES = 16_384  # without a cache, the neighbour bank's sample (a [32, N] product per step)
ENCODER_FIELDS = {"cosine_weight": 1.0, "mse_weight": 0.0, "similarity_weight": 0.0, "neighbour_weight": 0.0,
                  "neighbour_temperature": 0.05, "attention_weight": 0.0, "relation_weight": 0.0,
                  "relation_heads": None, "sentences": None}  # fmt: skip


def check_decoder_config(config: Any, name: str) -> None:
    """The encoder-only fields keep their defaults on a decoder (else the user meant an encoder)."""
    changed = [key for key, default in ENCODER_FIELDS.items() if getattr(config, key) != default]
    if changed:
        raise ConfigError(f"{name}: {', '.join(changed)} apply to sentence encoders only; remove them for a language model")


def _check_teacher(teacher, student, name: str) -> None:
    if not getattr(teacher, "is_encoder", False):
        raise ConfigError(f"{name}: teacher {teacher.name} is not a sentence encoder; give an encoder teacher "
                          "(teacher: PATH) with the student's tokenizer")  # fmt: skip
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ConfigError(f"{name}: teacher {teacher.name} and student {student.name} have different vocabularies; "
                          "give a teacher with the same tokenizer as the student (teacher: PATH)")  # fmt: skip


def _objective(config: Any, teacher, student, name: str) -> EncoderDistillObjective:
    from kompakt.ops.kd_losses import HiddenProjection

    pairs, projection = [], None
    if config.hidden_weight > 0:
        pairs = layer_pairs(student.model, teacher.model, config.layer_map, name)
        if model_width(student.model) != model_width(teacher.model):
            projection = HiddenProjection(len(pairs), model_width(student.model), model_width(teacher.model))
    heads = config.relation_heads or num_heads(teacher.model)
    if config.relation_weight > 0:
        for who in (student, teacher):
            if model_width(who.model) % heads:
                raise ConfigError(f"{name}: relation_heads {heads} does not divide {who.name}'s width "
                                  f"{model_width(who.model)}; choose relation_heads dividing both widths")  # fmt: skip
    if config.attention_weight > 0 and num_heads(student.model) != num_heads(teacher.model):
        raise ConfigError(f"{name}: attention_weight needs the same head count ({num_heads(student.model)} vs "
                          f"{num_heads(teacher.model)}); use relation_weight (MiniLM v2) instead")  # fmt: skip
    if not (config.cosine_weight or config.mse_weight or config.similarity_weight or config.neighbour_weight
            or config.hidden_weight or config.attention_weight or config.relation_weight):  # fmt: skip
        raise ConfigError(f"{name}: every encoder loss weight is 0; set cosine_weight (default 1) or another")
    return EncoderDistillObjective(
        teacher.model, teacher.pooling, student.pooling, cosine_weight=config.cosine_weight,
        mse_weight=config.mse_weight, hidden_weight=config.hidden_weight, layer_map=pairs, projection=projection,
        hidden_relative=config.hidden_loss == "relative", attention_weight=config.attention_weight,
        relation_weight=config.relation_weight, relation_heads=heads,
        similarity_weight=config.similarity_weight, neighbour_weight=config.neighbour_weight,
        neighbour_temperature=config.neighbour_temperature,
    )  # fmt: skip


def _wanted(config: Any) -> int:
    per_step = config.batch_size * config.grad_accum
    if config.steps is not None:
        return config.steps * per_step
    if config.sentences is not None:
        return config.sentences
    return math.ceil(config.tokens / ASSUMED_TOKENS_PER_SENTENCE)


def sentence_steps(sentences: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps a `sentences` budget buys (what `compress --target` plans with, too)."""
    return max(1, math.ceil(sentences / (batch_size * grad_accum)))


def _steps(config: Any, batches: SentenceBatches) -> int:
    per_step = config.batch_size * config.grad_accum
    if config.steps is not None:
        return config.steps
    if config.sentences is not None:
        return sentence_steps(config.sentences, config.batch_size, config.grad_accum)
    return max(1, math.ceil(config.tokens / (batches.mean_tokens() * per_step)))


def _evaluator(teacher, student, heldout: list[str] | None):
    """Mean cosine of student vs teacher embeddings of the held-out sentences, or None."""
    if not heldout:
        return None
    from kompakt.model.encode import embed

    reference = embed(teacher, heldout)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        current = embed(dataclasses.replace(student, model=model, _fingerprint=None), heldout)
        return {"cosine": float(torch.nn.functional.cosine_similarity(current, reference, dim=-1).mean())}

    return evaluate


def _attach_bank(objective: EncoderDistillObjective, teacher, batches: SentenceBatches, seed: int) -> None:
    """The neighbour term's bank: the teacher cache, else a seeded sample of training sentences."""
    from kompakt.train.encoder_objective import neighbour_bank, teacher_embeddings

    cache = objective.cache
    if cache is None:
        rows = batches.rows
        if len(rows) > BANK_MAX_SENTENCES:
            pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:BANK_MAX_SENTENCES]
            rows = [rows[i] for i in pick.tolist()]
        cache = teacher_embeddings(teacher.model, teacher.pooling, rows, batches.pad)
    objective.bank, objective.bank_index = neighbour_bank(cache)


def distill_encoder(ctx: PassContext, config: Any, name: str) -> PassReport:
    """Train the encoder ctx.loaded to match the teacher (see the module docstring)."""
    from kompakt.rundir.hashing import digest
    from kompakt.train.loop import train

    teacher = ctx.teacher_model(config.teacher)
    student = ctx.loaded
    _check_teacher(teacher, student, name)
    objective = _objective(config, teacher, student, name)
    sentences, source = ctx.training_sentences(config.data, min(_wanted(config), MAX_GENERATED_SENTENCES))
    heldout = None
    if config.eval_every > 0:
        cut = len(sentences) - max(1, round(len(sentences) * HELDOUT_FRACTION))
        sentences, heldout = sentences[:cut], sentences[cut:]
    batches = SentenceBatches(student.pooling.texts(sentences), student.tokenizer, batch_size=config.batch_size,
                              max_length=input_limit(student), seed=ctx.seed, source=source)  # fmt: skip
    steps = _steps(config, batches)
    if objective.sentence_level and steps * config.batch_size * config.grad_accum >= batches.sentences \
            and batches.sentences <= CACHE_MAX_SENTENCES:  # fmt: skip
        from kompakt.train.encoder_objective import teacher_embeddings

        # one teacher pass over the data instead of one per step (module docstring of encoder_objective)
        objective.cache = teacher_embeddings(teacher.model, teacher.pooling, batches.rows, batches.pad)
    if objective.neighbour_weight > 0:
        _attach_bank(objective, teacher, batches, ctx.seed)
    loop = dataclasses.replace(config.loop_config(ctx.seed), steps=steps, seq_len=max(1, round(batches.mean_tokens())))
    identity = digest({"run": ctx.run_id or student.fingerprint(), "pass": name, "config": dataclasses.asdict(config),
                       "data": [source, len(sentences)], "seed": ctx.seed})  # fmt: skip
    result = train(student.model, batches, objective, loop, evaluate=_evaluator(teacher, student, heldout),
                   checkpoint_dir=ctx.checkpoint_dir, identity=identity, description=name)  # fmt: skip
    seen = result.steps * config.batch_size * config.grad_accum
    history = result.history
    terms = ", ".join(k for k in ("cosine", "mse", "similarity", "neighbour", "hidden", "attention", "relation")
                      if history and k in history[-1])  # fmt: skip
    summary = (f"encoder KD ({terms}): {seen} sentences ({seen / max(1, batches.sentences):.1f} epochs of "
               f"{batches.sentences}), {result.steps} steps; loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
               if history else f"encoder KD: nothing left to train ({result.steps} steps)")  # fmt: skip
    details = {**result.summary(), "data": source, "sentences": batches.sentences, "sentences_seen": seen,
               "teacher": teacher.name}  # fmt: skip
    return PassReport(loaded=student, summary=summary, details=details)
