"""The teacher's top-k next-token logits of every training batch, computed once before training.

KD's usual out-of-memory complaint is teacher + student in memory together. With
`distill.kd: {top_k: K, teacher_cache: true}` the teacher runs over every micro-batch the run will
train on *before* training (the batches are a pure function of their position,
kompakt.train.data), its K largest logits per position are written to disk (one safetensors file
per batch: values fp32 and vocabulary indices int32, [batch, len - 1, K]), and the student then
trains against those files: the teacher is not run, nor needed in memory, while the student trains.

A teacher larger than the memory budget (opened lazily, kompakt.model.lazy) is run layer by layer
over a chunk of batches at a time (kompakt.evaluate.streamed.streamed_logits: one decoder layer
materialised, the chunk's hidden states in RAM, fp32); an in-memory teacher runs its own forward
per batch under the loop's autocast, so the cached values are those the objective would compute
on the fly (same weights after training: tests/passes/test_kd_teacher_cache.py).

Batches are found by the content of their ids (a hash), so a resumed run, or a batch the loop
asks for twice, reads the same file; a batch written by a killed run is kept (files are renamed
into place when complete).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from kompakt.ops.kd_losses import TopK

logger = logging.getLogger(__name__)

# Tokens of training batches run through a streamed teacher per pass over its layers: the chunk's
# hidden states (tokens x hidden fp32: 0.5 GB for a 4096-wide model) sit in RAM meanwhile.
STREAM_CHUNK_TOKENS = 32_768


class TeacherCache:
    """Cached teacher top-k logits, one file per training batch (module docstring)."""

    def __init__(self, directory: str | Path, k: int) -> None:
        self.directory, self.k = Path(directory), k

    @staticmethod
    def key(ids: torch.Tensor) -> str:
        data = ids.detach().to("cpu", torch.int64).contiguous()
        return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()

    def path(self, ids: torch.Tensor) -> Path:
        return self.directory / f"{self.key(ids)}.safetensors"

    def __contains__(self, ids: torch.Tensor) -> bool:
        return self.path(ids).is_file()

    def store(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep the top-k of `logits` [batch, len - 1, vocab] (the positions that have a next token)."""
        from safetensors.torch import save_file

        top = TopK.of(logits, self.k)
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(ids)
        temp = final.with_suffix(".tmp")
        save_file({"values": top.values.float().contiguous().cpu(), "indices": top.indices.to(torch.int32).cpu()},
                  str(temp))  # fmt: skip
        temp.replace(final)

    def lookup(self, ids: torch.Tensor) -> TopK:
        """The teacher's top-k for the batch `ids` [batch, len], on ids' device."""
        from safetensors.torch import load_file

        path = self.path(ids)
        if not path.is_file():
            raise RuntimeError(f"the teacher cache {self.directory} holds no entry for this batch; delete it and run again")
        stored = load_file(str(path))
        return TopK(stored["values"].to(ids.device), stored["indices"].to(ids.device, torch.int64))


def rank_positions(micro_batches: int, num_processes: int = 1, rank: int = 0) -> range:
    """The batch positions process `rank` trains on: the loop gives micro-batch q of process r
    batch q * num_processes + r (kompakt.train.loop)."""
    return range(rank, micro_batches * num_processes, num_processes)


def build_teacher_cache(teacher, batches, positions: Iterable[int], k: int, directory: str | Path) -> TeacherCache:
    """Compute and store the teacher's top-k for the batches at `positions` (already cached ones
    skipped). `teacher`: a LoadedModel or transformers model, in memory or opened lazily."""
    from kompakt.model.lazy import lazy_of

    cache = TeacherCache(directory, k)
    todo: dict[str, torch.Tensor] = {}
    for position in positions:
        ids = batches.batch(position)[0]
        if ids not in cache:
            todo.setdefault(cache.key(ids), ids)
    net = getattr(teacher, "model", teacher)
    lazy = lazy_of(net)
    logger.info("teacher cache: %d batches to compute (%s)", len(todo), "layer by layer" if lazy else "in memory")
    pairs = _streamed(lazy, list(todo.values())) if lazy is not None else _in_memory(net, todo.values())
    for ids, logits in pairs:
        cache.store(ids, logits)
    return cache


@torch.no_grad()
def _in_memory(net: torch.nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The call DistillObjective makes, under the training loop's autocast (bf16 on CPUs that
    compute it natively, kompakt.train.loop.choose_precision), so the values are the same."""
    from kompakt.train.loop import choose_precision

    device = next(net.parameters()).device
    precision = choose_precision(device)
    autocast = nullcontext() if precision == "no" else torch.autocast(
        device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)  # fmt: skip
    for ids in batches:
        with autocast:
            logits = net(input_ids=ids.to(device), use_cache=False).logits
        yield ids, logits[:, :-1].to(ids.device)


def _streamed(lazy, batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of batches through the lazily opened teacher, one pass over its layers per chunk."""
    from kompakt.evaluate.streamed import streamed_logits
    from kompakt.evaluate.windows import Window

    for chunk in _chunks(batches):
        rows, length = len(chunk) * chunk[0].shape[0], chunk[0].shape[1]
        flat = torch.cat([b.reshape(-1) for b in chunk])
        windows = [Window(i * length, (i + 1) * length, 1) for i in range(rows)]
        # equal-length windows grouped in order, batch-size rows at a time: one group per training batch
        for ids, (_, logits) in zip(chunk, streamed_logits(lazy, flat, windows, [], chunk[0].shape[0])):
            yield ids, logits[:, :-1]


def _chunks(batches: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive batches of one shape, about STREAM_CHUNK_TOKENS tokens together."""
    chunk: list[torch.Tensor] = []
    for ids in batches:
        if chunk and (ids.shape != chunk[0].shape or len(chunk) * chunk[0].numel() >= STREAM_CHUNK_TOKENS):
            yield chunk
            chunk = []
        chunk.append(ids)
    if chunk:
        yield chunk
