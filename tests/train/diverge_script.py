"""One process of a two-process training (torchrun, gloo) whose loss turns NaN on rank 1 only,
from its 4th micro-batch: every process must stop with TrainingDiverged, none may wait forever in
a collective. Prints "diverged: MESSAGE" and exits 3 when stopped. Usage: diverge_script.py."""

from __future__ import annotations

import math
import os
import sys

import torch

from kompakt.model.tiny import tiny_model
from kompakt.train.data import SequenceBatches, TrainData
from kompakt.train.loop import LoopConfig, TrainingDiverged, train
from kompakt.train.objectives import DistillObjective


class NanOnRankOne:
    def __init__(self, inner: DistillObjective) -> None:
        self.inner, self.calls = inner, 0
        self.rank = int(os.environ["RANK"])

    def extra_modules(self):
        return {}

    def __call__(self, model, ids, labels):
        self.calls += 1
        loss, parts = self.inner(model, ids, labels)
        return (loss * math.nan if self.rank == 1 and self.calls > 3 else loss), parts


if __name__ == "__main__":
    torch.set_num_threads(1)
    objective = NanOnRankOne(DistillObjective(tiny_model("llama", seed=0).model, alpha=0.5, temperature=2.0))
    ids = torch.randint(3, 200, (4096,), generator=torch.Generator().manual_seed(5))
    batches = SequenceBatches(TrainData.plain(ids, "random"), seq_len=32, batch_size=2, seed=0)
    try:
        train(tiny_model("llama", seed=1).model, batches, objective, LoopConfig(steps=8, batch_size=2, seq_len=32))
    except TrainingDiverged as error:
        print(f"diverged: {error}", flush=True)
        sys.exit(3)
    print("finished", flush=True)
