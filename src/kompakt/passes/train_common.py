"""What the training passes (distill.kd, finetune.lora, quant.qat) share: the config fields of
the loop and of the KD loss, the teacher/student vocabulary check, data and evaluation set-up.

Not a pass itself (not in the registry); the three pass files import from here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel
from kompakt.ops.kd_losses import DIVERGENCES, uniform_layer_map
from kompakt.passes.base import PassContext, doc
from kompakt.train.data import SequenceBatches, TrainData
from kompakt.train.distributed import process_count
from kompakt.train.loop import LoopConfig, TrainResult, train

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1
EVAL_WINDOW = 512


@dataclass
class TrainingConfig:
    """Budget, optimiser and data fields every training pass has (see kompakt.train.loop)."""

    tokens: int | None = field(default=65536, metadata=doc("training tokens (steps = tokens / (batch_size*seq_len*grad_accum))"))
    steps: int | None = field(default=None, metadata=doc("optimizer steps; overrides tokens"))
    teacher: str | None = field(default=None, metadata=doc("teacher model path / name; null = the recipe's original"))
    data: str | None = field(default=None, metadata=doc("training text (txt, jsonl, chat jsonl, parquet); null = the run's data, else teacher-generated"))
    batch_size: int = field(default=4, metadata=doc("sequences per micro-batch"))
    seq_len: int = field(default=256, metadata=doc("tokens per packed sequence"))
    grad_accum: int = field(default=1, metadata=doc("micro-batches per optimizer step"))
    lr: float = field(default=1e-4, metadata=doc("peak AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay (matrices only)"))
    warmup: float = field(default=0.05, metadata=doc("warm-up: fraction of steps (< 1) or steps"))
    min_lr_ratio: float = field(default=0.1, metadata=doc("cosine floor as a fraction of lr"))
    max_grad_norm: float = field(default=1.0, metadata=doc("gradient clipping norm"))
    eval_every: int = field(default=0, metadata=doc("evaluate ppl + KL on held-out text every N steps (0 = never)"))
    eval_tokens: int = field(default=4096, metadata=doc("held-out tokens per evaluation"))
    checkpoint_every: int = field(default=50, metadata=doc("checkpoint every N steps (runs resume from it)"))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads while training (null = as set)"))

    def validate_training(self, name: str) -> None:
        positive = ("batch_size", "seq_len", "grad_accum", "eval_tokens")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}: {key} must be positive, got {getattr(self, key)}")
        if self.steps is None and self.tokens is None:
            raise ConfigError(f"{name}: give a budget: tokens=N or steps=N")
        for key in ("steps", "tokens", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: {key} must be positive, got {value}")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ConfigError(f"{name}: lr and max_grad_norm must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{name}: min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")

    def loop_config(self, seed: int) -> LoopConfig:
        names = {f.name for f in dataclasses.fields(LoopConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return LoopConfig(**{**values, "seed": seed})


@dataclass
class KDFields:
    """The distillation loss fields (distill.kd, quant.qat; finetune.lora with kd_weight)."""

    alpha: float = field(default=0.5, metadata=doc("weight of the soft (teacher) term; 1 - alpha on cross-entropy"))
    temperature: float = field(default=2.0, metadata=doc("softmax temperature T of the soft term (scaled by T^2)"))
    divergence: str = field(default="forward", metadata=doc("forward | reverse | jsd"))
    top_k: int | None = field(default=None, metadata=doc("keep only the teacher's k largest logits per position"))

    def validate_kd(self, name: str) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{name}: alpha must lie in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"{name}: temperature must be positive, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"{name}: divergence {self.divergence!r} is unknown; valid: {', '.join(DIVERGENCES)}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"{name}: top_k must be positive or null, got {self.top_k}")


# --- layer maps (distill.kd's hidden-state term, decoders and encoders) -----------------------


def _num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def model_width(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def layer_pairs(student_model, teacher_model, layer_map: list[list[int]] | None, name: str) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: `layer_map` checked, or the uniform map."""
    n_s, n_t = _num_layers(student_model), _num_layers(teacher_model)
    pairs = [tuple(p) for p in layer_map] if layer_map else uniform_layer_map(n_s, n_t)
    bad = [p for p in pairs if not (0 <= p[0] <= n_s and 0 <= p[1] <= n_t)]
    if bad:
        raise ConfigError(f"{name}: layer_map pair {list(bad[0])} is outside 0..{n_s} (student) / 0..{n_t} (teacher)")
    return pairs


def vocabulary_size(loaded: LoadedModel) -> int:
    return int(loaded.model.get_output_embeddings().weight.shape[0])


def check_same_vocab(teacher: LoadedModel, student: LoadedModel, name: str) -> None:
    """Distillation compares distributions token by token: the vocabularies must be identical."""
    sizes = (vocabulary_size(teacher), vocabulary_size(student))
    same_tokens = teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    if sizes[0] != sizes[1] or not same_tokens:
        what = f"{sizes[0]} vs {sizes[1]} output tokens" if sizes[0] != sizes[1] else "different token ids"
        raise ConfigError(
            f"{name}: teacher {teacher.name} and student {student.name} have different vocabularies ({what}); "
            "give a teacher with the same tokenizer as the student (teacher: PATH)"
        )


@dataclass
class Prepared:
    """A training pass's inputs: the teacher, the batches and held-out ids for evaluation."""

    teacher: LoadedModel
    batches: SequenceBatches
    heldout: torch.Tensor | None
    data: TrainData


def prepare(ctx: PassContext, config: TrainingConfig, name: str, *, answer_only: bool = True) -> Prepared:
    """Teacher (vocabulary checked), training batches and evaluation text for one step."""
    teacher = ctx.teacher_model(config.teacher)
    check_same_vocab(teacher, ctx.loaded, name)
    loop = config.loop_config(ctx.seed)
    processes = process_count()  # all processes draw from the same text: read what they use together
    needed = loop.total_steps(processes) * loop.tokens_per_step(processes)
    from kompakt.evaluate.api import is_streamed

    # a teacher opened layer by layer cannot sample text: the run's original writes it then
    data = ctx.training_data(config.data, needed, answer_only=answer_only,
                             generator=None if is_streamed(teacher) else teacher)  # fmt: skip
    heldout = None
    if config.eval_every > 0:
        if ctx.evaluation is not None:
            heldout = ctx.evaluation()[: config.eval_tokens]
        else:
            data, held = data.split_heldout(HELDOUT_FRACTION)
            heldout = held.ids[: config.eval_tokens]
    batches = SequenceBatches(data, seq_len=config.seq_len, batch_size=config.batch_size, seed=ctx.seed)
    if needed > data.n_tokens:
        logger.info("%s: %d training tokens requested, the data holds %d: %.1f epochs",
                    name, needed, data.n_tokens, needed / max(1, data.n_tokens))  # fmt: skip
    return Prepared(teacher, batches, heldout, data)


def evaluator(teacher: LoadedModel, heldout: torch.Tensor | None):
    """ppl and KL(teacher ‖ student) on the held-out ids, or None when there are none."""
    if heldout is None:
        return None
    from kompakt.evaluate import fidelity

    window = min(EVAL_WINDOW, int(heldout.numel()))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        result = fidelity(teacher, model, heldout, window=window)
        return {"ppl": result.ppl_candidate, "kl": result.kl_mean, "top1": result.top1}

    return evaluate


def evaluator_topk(teacher: LoadedModel, heldout: torch.Tensor | None):
    """`evaluator`'s numbers against the teacher's top-k distributions on the held-out ids, computed
    now (layer by layer for a teacher opened lazily), so evaluating needs no teacher afterwards."""
    if heldout is None:
        return None
    from kompakt.evaluate.api import is_streamed
    from kompakt.evaluate.fidelity import fidelity_topk, reference_topk
    from kompakt.evaluate.streamed import streamed_reference_topk

    window = min(EVAL_WINDOW, int(heldout.numel()))
    topk = streamed_reference_topk if is_streamed(teacher) else reference_topk
    reference = topk(teacher, heldout, window=window)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        result = fidelity_topk(reference, model, heldout, window=window)
        return {"ppl": result.ppl_candidate, "kl": result.kl_mean, "top1": result.top1}

    return evaluate


def identity(ctx: PassContext, name: str, config: Any, data: TrainData) -> str:
    """What a checkpoint of this step must match: the step (or model), pass, config and data."""
    from kompakt.rundir.hashing import digest

    return digest({
        "run": ctx.run_id or ctx.loaded.fingerprint(), "pass": name, "config": dataclasses.asdict(config),
        "data": [data.source, data.n_tokens], "seed": ctx.seed,
    })  # fmt: skip


def run(ctx: PassContext, config: TrainingConfig, name: str, model: torch.nn.Module, objective: Any,
        prepared: Prepared, evaluate=None) -> TrainResult:  # fmt: skip
    """Train `model` with `objective` on the prepared data (resuming a checkpoint of this step);
    `evaluate`: the held-out evaluation (default `evaluator` against the teacher)."""
    return train(
        model, prepared.batches, objective, config.loop_config(ctx.seed),
        evaluate=evaluate or evaluator(prepared.teacher, prepared.heldout),
        checkpoint_dir=ctx.checkpoint_dir, identity=identity(ctx, name, config, prepared.data), description=name,
    )  # fmt: skip
