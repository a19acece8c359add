"""Knowledge distillation: the student learns the teacher's next-token distributions or sentence embeddings (healing).

The current model (student) learns to match a teacher's next-token distributions, healing
what pruning took away.

Loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; as DistilBERT, Sanh
et al. 2019): α·T²·D(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·cross-entropy on the
real next tokens, D = forward KL (default), reverse KL (MiniLLM, Gu et al. 2024) or JSD;
`top_k` keeps only the teacher's k largest logits per position; with `teacher_cache` they are
computed for every training batch before training, layer by layer for a teacher larger than
--max-memory (kompakt.train.teacher_cache), and the teacher is not run while the student trains.
`hidden_weight` > 0 adds a
TinyBERT-style (Jiao et al. 2020) MSE between student layer outputs and the teacher layers
they map to (`layer_map`, default uniform), through a learned projection when the widths
differ (width-pruned students); `hidden_loss: relative` divides each position's squared error
by the teacher vector's squared norm, so the weight means the same on any model (a decoder's
raw hidden states can be hundreds of times larger than its KD loss).

Sentence encoders (BERT, DistilBERT, RoBERTa, ModernBERT; kompakt.passes.encoder_training):
the loss is over sentence embeddings and internals instead of next tokens — `cosine_weight`
(1 − cos of the pooled embeddings, default 1), `mse_weight`, `similarity_weight` (MSE of the
in-batch cosine-similarity matrices: relational KD, keeps neighbours), `neighbour_weight` /
`neighbour_temperature` (CompRess: KL of the softmaxed similarities to a bank of the teacher's
embeddings of thousands of training sentences, so near neighbours count), `hidden_weight` with
`layer_map` (TinyBERT), `attention_weight` (MiniLM v1: last-layer attention KL, same head
count) and `relation_weight` / `relation_heads` (MiniLM v2: q-q, k-k, v-v relation KL); the
data are unlabeled sentences (`data`, the run's data, else sentences split from text the
embedded SmolLM2 writes); `sentences` sets the budget in sentences. alpha, temperature,
divergence and top_k do not apply to encoders.

Teacher: the recipe's original model by default, or `teacher: PATH` (any model with the same
tokenizer; a different vocabulary is refused). Data: `data: PATH` (text, jsonl, chat jsonl,
parquet), else the run's data (`--data` / recipe `data.calibration`, minus its held-out end),
else text the teacher samples itself — sequence-level KD (Kim & Rush 2016), cached.

When to use it: after structured pruning (prune.depth, prune.width), before quantization. It
trains every weight, so a quantized model is refused (train that with quant.qat).

Cost: one teacher forward (no grad) + one student forward/backward per micro-batch; on 2 CPU
cores the 135M student trains at ≈ 60-90 tokens/s (bench/heal.py), on a GPU thousands.

Sample recipe steps::

    - distill.kd: {tokens: 65536, alpha: 0.5, temperature: 2.0}
    - distill.kd: {teacher: ./big, steps: 500, data: corpus.txt, lr: 5.0e-5}
    - distill.kd: {tokens: 131072, hidden_weight: 0.1, hidden_loss: relative, divergence: jsd}
    - distill.kd: {sentences: 20000, batch_size: 32, cosine_weight: 1.0, hidden_weight: 1.0}   # encoder
    - distill.kd: {sentences: 20000, batch_size: 32, relation_weight: 1.0}   # encoder, MiniLM v2
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kompakt.errors import ConfigError
from kompakt.evaluate.api import is_streamed
from kompakt.model.quantized import is_quantized
from kompakt.ops.kd_losses import HiddenProjection
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.train_common import KDFields, TrainingConfig, evaluator_topk, layer_pairs, model_width, prepare, run
from kompakt.train.objectives import DistillObjective
from kompakt.train.teacher_cache import TeacherCache, build_teacher_cache, rank_positions

NAME = "distill.kd"
HIDDEN_LOSSES = ("mse", "relative")


@dataclass
class DistillConfig(TrainingConfig, KDFields):
    hidden_weight: float = field(default=0.0, metadata=doc("weight of the hidden-state MSE term (0 = off)"))
    layer_map: list[list[int]] | None = field(
        default=None, metadata=doc("[[student layer, teacher layer], ...] 1-based; null = uniform")
    )
    hidden_loss: str = field(default="mse", metadata=doc("mse (TinyBERT's) or relative: each position's squared "
                                                         "error over the teacher vector's squared norm (scale-free; "
                                                         "for decoders)"))  # fmt: skip

    cosine_weight: float = field(default=1.0, metadata=doc("encoders: weight of 1 - cos of student vs teacher sentence embeddings"))
    mse_weight: float = field(default=0.0, metadata=doc("encoders: weight of the sentence-embedding MSE"))
    similarity_weight: float = field(default=0.0, metadata=doc("encoders: weight of the in-batch cosine-similarity-matrix MSE (relational KD)"))
    neighbour_weight: float = field(default=0.0, metadata=doc("encoders: weight of the KL of similarities to a bank of the teacher's embeddings of training sentences (CompRess)"))
    neighbour_temperature: float = field(default=0.05, metadata=doc("encoders: softmax temperature of neighbour_weight's similarities"))
    attention_weight: float = field(default=0.0, metadata=doc("encoders: weight of the last-layer attention KL (MiniLM v1; same head count)"))
    relation_weight: float = field(default=0.0, metadata=doc("encoders: weight of the last-layer q/k/v relation KL (MiniLM v2)"))
    relation_heads: int | None = field(default=None, metadata=doc("encoders: relation heads of relation_weight (null = the teacher's heads)"))
    sentences: int | None = field(default=None, metadata=doc("encoders: training sentences (budget; steps = sentences / (batch_size*grad_accum))"))
    teacher_cache: bool = field(default=False, metadata=doc("run the teacher over every training batch first and keep its "
                                                            "top_k logits on disk: it is not run, nor needed in memory, "
                                                            "while the student trains (needs top_k)"))  # fmt: skip

    def validate(self) -> None:
        self.validate_training(NAME)
        self.validate_kd(NAME)
        if self.teacher_cache and (self.top_k is None or self.hidden_weight > 0):
            raise ConfigError(f"{NAME}: teacher_cache keeps the teacher's top_k logits only: set top_k (e.g. 64) "
                              "and leave hidden_weight at 0")  # fmt: skip
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ConfigError(f"{NAME}: hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        if self.hidden_weight < 0:
            raise ConfigError(f"{NAME}: hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.layer_map is not None and not all(isinstance(p, list) and len(p) == 2 for p in self.layer_map):
            raise ConfigError(f"{NAME}: layer_map is a list of [student layer, teacher layer] pairs")
        for key in ("cosine_weight", "mse_weight", "similarity_weight", "neighbour_weight", "attention_weight",
                    "relation_weight"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(f"{NAME}: {key} must be >= 0, got {getattr(self, key)}")
        if not self.neighbour_temperature > 0:
            raise ConfigError(f"{NAME}: neighbour_temperature must be > 0, got {self.neighbour_temperature}")
        for key in ("relation_heads", "sentences"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{NAME}: {key} must be positive or null, got {getattr(self, key)}")


def objective_for(config: KDFields, teacher_model, student_model, hidden_weight: float = 0.0,
                  layer_map: list[list[int]] | None = None, hidden_loss: str = "mse") -> DistillObjective:  # fmt: skip
    """The KD objective (with hidden-state term and projection when asked)."""
    pairs: list[tuple[int, int]] = []
    projection = None
    if hidden_weight > 0:
        pairs = layer_pairs(student_model, teacher_model, layer_map, NAME)
        if model_width(student_model) != model_width(teacher_model):
            projection = HiddenProjection(len(pairs), model_width(student_model), model_width(teacher_model))
    return DistillObjective(
        teacher_model, alpha=config.alpha, temperature=config.temperature, divergence=config.divergence,
        top_k=config.top_k, hidden_weight=hidden_weight, layer_map=pairs, projection=projection,
        hidden_relative=hidden_loss == "relative",
    )  # fmt: skip


def apply(ctx: PassContext, config: DistillConfig) -> PassReport:
    if is_quantized(ctx.loaded):
        raise ConfigError(f"{NAME}: {ctx.loaded.name} is quantized; full-weight training would leave the grid — "
                          "use quant.qat to train a quantized model")  # fmt: skip
    if getattr(ctx.loaded, "is_encoder", False):
        from kompakt.passes.encoder_training import distill_encoder

        if config.teacher_cache:
            raise ConfigError(f"{NAME}: teacher_cache is for language models; an encoder's teacher embeddings "
                              "are cached without it")  # fmt: skip

        return distill_encoder(ctx, config, NAME)
    from kompakt.passes.encoder_training import check_decoder_config

    check_decoder_config(config, NAME)
    prepared = prepare(ctx, config, NAME)
    if is_streamed(prepared.teacher) and not config.teacher_cache:
        raise ConfigError(f"{NAME}: teacher {prepared.teacher.name} does not fit --max-memory beside the student; "
                          "set teacher_cache: true and top_k (its logits are computed first, layer by layer)")  # fmt: skip
    objective = objective_for(config, prepared.teacher.model, ctx.loaded.model, config.hidden_weight, config.layer_map,
                              config.hidden_loss)
    with _scratch(ctx) as directory:
        evaluate = None
        if config.teacher_cache:  # the teacher runs now, once per training batch, then never while the student trains
            objective.teacher, objective.cache = None, _teacher_cache(ctx, config, prepared, directory)
            evaluate = evaluator_topk(prepared.teacher, prepared.heldout)
        result = run(ctx, config, NAME, ctx.loaded.model, objective, prepared, evaluate)
    history = result.history
    summary = (f"KD alpha={config.alpha:g} T={config.temperature:g} {config.divergence}: {result.tokens} tokens, "
               f"{result.steps} steps, {result.tokens_per_s:.0f} tok/s; loss {history[0]['loss']:.3f} -> "
               f"{history[-1]['loss']:.3f}" if history else f"KD: nothing left to train ({result.steps} steps)")  # fmt: skip
    details = {**result.summary(), "data": prepared.data.source, "teacher": prepared.teacher.name,
               "teacher_cache": config.teacher_cache}  # fmt: skip
    return PassReport(loaded=ctx.loaded, summary=summary, details=details)


def _teacher_cache(ctx: PassContext, config: DistillConfig, prepared, directory: Path) -> TeacherCache:
    """The teacher's top_k of every micro-batch this process will train on (kompakt.train.teacher_cache)."""
    from kompakt.train.distributed import process_count, process_index

    loop = config.loop_config(ctx.seed)
    count = process_count()
    positions = rank_positions(loop.total_steps(count) * loop.grad_accum, count, process_index())
    return build_teacher_cache(prepared.teacher, prepared.batches, positions, config.top_k, directory)


@contextmanager
def _scratch(ctx: PassContext) -> Iterator[Path]:
    """Where the teacher cache lives: the step's checkpoint folder, which a killed run keeps (the
    runner removes its work folder on the next start), so a resumed step computes only what is
    missing; the folder goes once the step is saved. Else the work folder, else a temporary one."""
    base = ctx.checkpoint_dir or ctx.work_dir
    if base is not None:
        yield Path(base) / "teacher-topk"
        return
    with tempfile.TemporaryDirectory(prefix="kompakt-teacher-") as temp:
        yield Path(temp)


PASS = PassSpec(name=NAME, config=DistillConfig, apply=apply, needs_teacher=True, needs_training=True,
                doc=__doc__ or "")  # fmt: skip
