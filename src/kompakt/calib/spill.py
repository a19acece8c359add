"""Calibration activations on disk: the sequential driver's layer inputs when RAM is short.

A streamed model (kompakt.model.lazy) whose `spill_dir` is set keeps the hidden states between
layers (n x len x hidden per calibration batch; 128 x 512 x 4096 fp32 is 1 GB per copy for a 7B
model) in one safetensors file per batch instead of RAM: `spill` writes a layer's outputs batch
by batch as they are computed, and `SpilledBatches` reads a batch back when it is used (files
are memory-mapped by safetensors; only the batch in use is resident). The layer caches
(kompakt.calib.layer_cache), which keep every batch's attention / MLP intermediates, are off
then: each statistics run recomputes them, with the same results.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch


class SpilledBatches(Sequence[torch.Tensor]):
    """Per-batch hidden states stored as `directory/bNNNNN.safetensors`, read on access."""

    def __init__(self, directory: Path, indices: Sequence[int]) -> None:
        self.directory, self.indices = directory, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return SpilledBatches(self.directory, self.indices[item])
        from safetensors.torch import load_file

        return load_file(self.directory / f"b{self.indices[item]:05d}.safetensors")["hidden"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


def spill(batches: Iterable[torch.Tensor], directory: Path) -> SpilledBatches:
    """Write `batches` one file each into `directory` (emptied first); they are read back on use."""
    from safetensors.torch import save_file

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    count = 0
    for index, hidden in enumerate(batches):
        save_file({"hidden": hidden.detach().cpu().contiguous()}, str(directory / f"b{index:05d}.safetensors"))
        count += 1
    return SpilledBatches(directory, range(count))


def propagate(run_one: Callable[[int, torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor],
              directory: Path) -> SpilledBatches:  # fmt: skip
    """The next layer's inputs, `run_one(batch, hidden)` per batch, written as they are computed."""
    return spill((run_one(batch, hidden) for batch, hidden in enumerate(inputs)), directory)
