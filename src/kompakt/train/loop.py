"""The one training loop distill.kd, finetune.lora and quant.qat share, built on `accelerate`.

What it does, in order per optimizer step: `grad_accum` micro-batches of packed sequences
(each: the objective's loss — teacher logits computed once under no_grad inside it — scaled
by 1/grad_accum, backward through the Accelerator), gradient clipping, AdamW step, warm-up +
cosine schedule step. Around that: evaluation every `eval_every` steps, an atomic checkpoint
every `checkpoint_every` steps (trained tensors, optimizer, scheduler, RNG, data position) that
a killed run resumes from exactly, a progress bar, and a stop with a one-line message when
the loss turns NaN/inf or explodes (the last good checkpoint is kept).

Library vs ours: `accelerate.Accelerator` owns devices, mixed precision, DDP's gradient sync
and process groups, so `accelerate launch` runs the same code on many GPUs; with `--use_fsdp`
kompakt.train.fsdp shards the model with torch's `fully_shard` instead of DDP; the optimizer
and schedule are torch's. The glue (budget, accumulation, evaluation, checkpoints,
divergence checks) is this file.

Compute dtype: fp32 master weights always; autocast to bf16 only where the hardware does bf16
well (a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX), fp16 on older GPUs, none on other
CPUs — where bf16 matmuls are emulated (measured ≈100x slower than fp32 on AVX2).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kompakt.errors import ConfigError, KompaktError
from kompakt.train import checkpoint as ckpt
from kompakt.train import fsdp
from kompakt.train.data import SequenceBatches
from kompakt.train.progress import TrainProgress
from kompakt.train.schedule import make_scheduler, warmup_steps_for

logger = logging.getLogger(__name__)


class TrainingDiverged(KompaktError):
    """The loss became NaN / inf or exploded; the run stopped, the last good checkpoint is kept."""


class Objective(Protocol):
    """A training loss: `(model, ids, labels) -> (loss, {name: float})`; `extra_modules` are
    trained with the model (e.g. hidden-state projections) and checkpointed with it."""

    def __call__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...

    def extra_modules(self) -> dict[str, nn.Module]: ...


@dataclass
class LoopConfig:
    """Budget, optimisation and bookkeeping of one training run (the passes expose these fields)."""

    tokens: int | None = None  # training tokens (batch · seq_len · grad_accum per step); or:
    steps: int | None = None  # optimizer steps (wins over tokens when both are given)
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # < 1: fraction of the steps; >= 1: steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 0  # > 0: evaluate before, every N steps and at the end; 0: never
    checkpoint_every: int = 0  # 0: no mid-run checkpoints
    explode_factor: float = 10.0  # stop when a step's loss exceeds this times the best smoothed loss
    threads: int | None = None  # torch CPU threads while training (None: leave as is)
    seed: int = 0

    def total_steps(self, num_processes: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is None:
            raise ConfigError("give a training budget: tokens=N or steps=N")
        return max(1, math.ceil(self.tokens / self.tokens_per_step(num_processes)))

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * num_processes


@dataclass
class TrainResult:
    """What a run did: steps, tokens seen, wall time, training tokens/s, loss and eval history."""

    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    precision: str = "no"
    local_fraction: float = 1.0  # share of the model's parameters one process held (FSDP: ~1/N)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": round(self.wall_s, 2),
                "tokens_per_s": round(self.tokens_per_s, 1), "resumed_from": self.resumed_from,
                "precision": self.precision, "local_fraction": round(self.local_fraction, 4), "evals": self.evals,
                "loss_first": self.history[0]["loss"] if self.history else None,
                "loss_last": self.history[-1]["loss"] if self.history else None}  # fmt: skip


def choose_precision(device: torch.device) -> str:
    """accelerate's mixed_precision for `device`: what the hardware computes fast (see module doc)."""
    from kompakt.model.dtype import cpu_has_native_bf16

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "no"


def _param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms / biases / scalars (the usual LM practice)."""
    decay = [p for _, p in params if p.dim() >= 2]
    rest = [p for _, p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


def trained_parameters(model: nn.Module, extra: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """(checkpoint name, parameter) of everything trained, tied parameters listed once."""
    seen: set[int] = set()
    named: list[tuple[str, nn.Parameter]] = []
    modules = [("model", model), *((f"extra.{k}", m) for k, m in sorted(extra.items()))]
    for prefix, module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                named.append((f"{prefix}.{name}", param))
    if not named:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    return named


def _seed_per_process(accelerator) -> None:
    """Give each process its own RNG stream. The runner seeds every process alike (the step's
    seed), so they would otherwise draw the same dropout masks for their different batches;
    process 0 keeps the seed, so one process trains exactly as before. A resumed run restores
    each process's own stream from its checkpoint."""
    if accelerator.num_processes > 1:
        torch.manual_seed(torch.initial_seed() + accelerator.process_index)


class _Run:
    """State of one `train` call (kept out of the function so each piece stays small)."""

    def __init__(self, model, batches, objective, config, evaluate, checkpoint_dir, identity, description):
        from accelerate import Accelerator

        self.config, self.batches, self.objective, self.evaluate = config, batches, objective, evaluate
        self.checkpoint_dir, self.identity, self.description = checkpoint_dir, identity, description
        device = next(model.parameters()).device
        probe = torch.device("cuda") if torch.cuda.is_available() and device.type != "cpu" else device
        self.precision = choose_precision(probe)
        # The schedule counts optimizer steps of all processes together (total_steps divides the
        # budget by num_processes); accelerate would otherwise step it num_processes times per step.
        with fsdp.accelerate_without_fsdp():
            self.accelerator = Accelerator(mixed_precision=self.precision, cpu=probe.type == "cpu",
                                           step_scheduler_with_optimizer=False)  # fmt: skip
        _seed_per_process(self.accelerator)
        extra = objective.extra_modules()
        for module in extra.values():
            module.to(self.accelerator.device)
        self.sharded = fsdp.ShardedModel(model, extra, self.accelerator.device) if fsdp.requested() else None
        self.named = trained_parameters(model, extra)
        optimizer = torch.optim.AdamW(_param_groups(self.named, config.weight_decay), lr=config.lr,
                                      betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
        self.total = config.total_steps(self.accelerator.num_processes)
        warmup = warmup_steps_for(config.warmup, self.total)
        scheduler = make_scheduler(optimizer, warmup_steps=warmup, total_steps=self.total, min_ratio=config.min_lr_ratio)
        if self.sharded is None:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        else:  # already sharded: accelerate must not wrap it in DDP as well
            self.model = fsdp.autocast_forward(model, self.accelerator)
            self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.state = ckpt.TrainState()
        self.best_smoothed = math.inf
        self.smoothed: float | None = None

    # --- checkpoints ------------------------------------------------------------------------
    def resume(self) -> int:
        if self.checkpoint_dir is None:
            return 0
        ckpt.check_identity(self.checkpoint_dir, self.identity)
        found = ckpt.latest(self.checkpoint_dir)
        if found is None:
            return 0
        state, tensors, extra = ckpt.load(found)
        for name, param in self.named:
            fsdp.load_full(param, tensors[name])
        self.optimizer.load_state_dict(extra["optimizer"])
        fsdp.reshard_optimizer_state(self.optimizer.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        ckpt.set_rng_state(extra["rng"])
        self.state = state
        logger.info("%s: resumed from %s (step %d, %d tokens)", self.description, found, state.step, state.tokens)
        return state.step

    def save(self) -> None:
        if self.checkpoint_dir is None:
            return
        # sharded (FSDP) parameters are gathered into full tensors (a collective: every process).
        # Every process writes: each has its own run directory (kompakt.train.distributed) and
        # resumes from it, with its own RNG and (FSDP) optimizer shard.
        tensors = {name: fsdp.full_tensor(p) for name, p in self.named}
        optimizer = fsdp.local_optimizer_state(self.optimizer.state_dict())
        opt = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
        ckpt.save(self.checkpoint_dir, self.identity, self.state, tensors, opt)

    # --- steps ------------------------------------------------------------------------------
    def micro_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
        device = self.accelerator.device
        with self.accelerator.autocast():
            loss, parts = self.objective(self.model, ids.to(device), labels.to(device))
        # A non-finite loss is acted on after the accumulation, from every process's losses
        # (optimizer_step): stopping here alone would leave the others waiting in a collective.
        self.accelerator.backward(loss / self.config.grad_accum)
        return float(loss.detach()), parts

    def optimizer_step(self) -> dict[str, Any]:
        config = self.config
        losses, parts_sum = [], {}
        for micro in range(config.grad_accum):
            # each process its own batches: position p of process r is batch p * n + r
            acc = self.accelerator
            ids, labels = self.batches.batch(self.state.position * acc.num_processes + acc.process_index)
            self.state.position += 1
            with self.gradient_sync(micro == config.grad_accum - 1):
                value, parts = self.micro_batch(ids, labels)
            losses.append(value)
            for key, item in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + item / config.grad_accum
            self.state.tokens += ids.numel() * self.accelerator.num_processes
        loss = self.mean_over_processes(sum(losses) / len(losses))
        if not math.isfinite(loss):
            self.diverged(f"loss {loss}")
        self.average_extra_gradients()
        norm = self.accelerator.clip_grad_norm_([p for _, p in self.named], config.max_grad_norm)
        norm = fsdp.full_tensor(norm) if norm is not None else None
        if norm is not None and not math.isfinite(float(norm)):
            self.diverged(f"gradient norm {float(norm)}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.check_explosion(loss)
        return {"step": self.state.step, "tokens": self.state.tokens, "loss": round(loss, 6), "lr": lr,
                "grad_norm": round(float(norm), 4) if norm is not None else None,
                **{k: round(v, 6) for k, v in parts_sum.items()}}  # fmt: skip

    def mean_over_processes(self, value: float) -> float:
        """`value` averaged over the processes: every process then takes the same decisions on
        it (the divergence stops), never one alone while the others wait in a collective."""
        if self.accelerator.num_processes == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(total)
        return float(total) / self.accelerator.num_processes

    def gradient_sync(self, sync: bool):
        """Reduce gradients across processes only on an accumulation's last micro-batch."""
        if self.sharded is not None:
            self.sharded.set_gradient_sync(sync)
            return _nullcontext()
        return _nullcontext() if sync else self.accelerator.no_sync(self.model)

    def average_extra_gradients(self) -> None:
        """DDP averages the model's gradients; the objective's own trained modules (hidden-state
        projections) are outside it, so average theirs here or each process trains its own."""
        if self.sharded is not None or self.accelerator.num_processes == 1:
            return
        for module in self.objective.extra_modules().values():
            for param in module.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.accelerator.num_processes

    def check_explosion(self, loss: float) -> None:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.best_smoothed = min(self.best_smoothed, self.smoothed)
        if self.state.step > 3 and loss > self.config.explode_factor * self.best_smoothed:
            self.diverged(f"loss {loss:.4g} exploded (> {self.config.explode_factor:g} x the best smoothed "
                          f"loss {self.best_smoothed:.4g})")  # fmt: skip

    def diverged(self, what: str) -> None:
        found = ckpt.latest(self.checkpoint_dir) if self.checkpoint_dir else None
        kept = (f"last good checkpoint kept: {found} (step {int(found.name.removeprefix(ckpt.PREFIX))})"
                if found else "no checkpoint was written (set checkpoint_every)")  # fmt: skip
        raise TrainingDiverged(
            f"{self.description}: training stopped at step {self.state.step + 1}: {what}; {kept}; "
            f"lower lr (now {self.config.lr:g}) or max_grad_norm and run again"
        )

    def run_eval(self) -> None:
        if self.evaluate is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with torch.no_grad():
            metrics = self.evaluate(model)
        model.train()
        row = {"step": self.state.step, "tokens": self.state.tokens, **metrics}
        self.state.evals.append(row)
        logger.info("%s: eval at step %d (%d tokens): %s", self.description, self.state.step, self.state.tokens,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))  # fmt: skip


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(
    model: nn.Module,
    batches: SequenceBatches,
    objective: Objective,
    config: LoopConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: Path | None = None,
    identity: str = "",
    description: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` in place on `batches` with `objective`; see the module docstring.

    Args:
        evaluate: called (under no_grad, model in eval mode) before training, every
            `config.eval_every` steps and at the end (when eval_every > 0); returns metrics
            such as ppl / kl.
        checkpoint_dir: where checkpoints go; an existing checkpoint of the same `identity`
            is resumed, one of another identity refused.
        identity: a hash of everything that determines the run (model, data, config).
        stop_after: stop (as if killed) after this many steps of this call — for tests.

    Raises:
        TrainingDiverged: NaN / inf / exploding loss (the last good checkpoint is kept).
        OutputPathError: `checkpoint_dir` holds a checkpoint of another run.
    """
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = next(model.parameters()).dtype
    model.float()  # fp32 master weights; autocast provides the fast compute dtype
    try:
        return _train(model, batches, objective, config, evaluate, checkpoint_dir, identity, description, stop_after)
    finally:
        from accelerate.utils import extract_model_from_parallel

        extract_model_from_parallel(model, keep_fp32_wrapper=False)  # drop accelerate's autocast forward
        model.to(dtype)
        model.eval()
        torch.set_num_threads(previous_threads)


def _train(model, batches, objective, config, evaluate, checkpoint_dir, identity, description, stop_after):
    run = _Run(model, batches, objective, config, evaluate, checkpoint_dir, identity, description)
    start_step = run.resume()
    if start_step == 0 and config.eval_every > 0:
        run.run_eval()
    run.model.train()
    started, train_time, done_here = time.perf_counter(), 0.0, 0
    with TrainProgress(description, run.total, start_step) as progress:
        while run.state.step < run.total:
            if stop_after is not None and done_here >= stop_after:
                return _result(run, time.perf_counter() - started, train_time, start_step)
            tick = time.perf_counter()
            row = run.optimizer_step()
            train_time += time.perf_counter() - tick
            done_here += 1
            run.state.history.append(row)
            progress.update(run.state.step, row["loss"], run.state.tokens)
            _log_step(run, row, train_time, done_here, progress.enabled)
            last = run.state.step == run.total
            if config.eval_every > 0 and run.state.step % config.eval_every == 0 and not last:
                run.run_eval()
            if config.checkpoint_every > 0 and run.state.step % config.checkpoint_every == 0 and not last:
                run.save()
    if config.eval_every > 0:
        run.run_eval()
    return _result(run, time.perf_counter() - started, train_time, start_step)


def _log_step(run: _Run, row: dict[str, Any], train_time: float, done_here: int, bar_shown: bool) -> None:
    """Without a progress bar (logs, CI, background runs): one line about every 5 % of the run."""
    every = max(1, run.total // 20)
    if bar_shown or (run.state.step % every and run.state.step != run.total):
        return
    rate = done_here * run.config.tokens_per_step(run.accelerator.num_processes) / max(train_time, 1e-9)
    eta = (run.total - run.state.step) * train_time / max(done_here, 1)
    logger.info("%s: step %d/%d, %d tokens, loss %.4f, %.0f tok/s, ETA %.0f s", run.description, run.state.step,
                run.total, run.state.tokens, row["loss"], rate, eta)  # fmt: skip


def _result(run: _Run, wall: float, train_time: float, start_step: int) -> TrainResult:
    local_fraction = 1.0
    if run.sharded is not None:
        local_fraction = run.sharded.local_fraction()
        run.sharded.restore()
    model = run.accelerator.unwrap_model(run.model)
    model.eval()
    tokens_here = (run.state.step - start_step) * run.config.tokens_per_step(run.accelerator.num_processes)
    return TrainResult(
        steps=run.state.step, tokens=run.state.tokens, wall_s=wall,
        tokens_per_s=tokens_here / train_time if train_time > 0 else 0.0,
        history=run.state.history, evals=run.state.evals, resumed_from=start_step, precision=run.precision,
        local_fraction=local_fraction,
    )  # fmt: skip
