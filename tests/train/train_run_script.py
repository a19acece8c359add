"""Runs a recipe whose training steps are slowed down (a sleep per micro-batch), so that a test
can SIGKILL it mid-training. Usage: train_run_script.py RECIPE OUT."""

from __future__ import annotations

import sys
import time

import torch

from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe
from kompakt.train.objectives import DistillObjective

_call = DistillObjective.__call__


def _slow_call(self, model, ids, labels):
    time.sleep(0.15)
    return _call(self, model, ids, labels)


if __name__ == "__main__":
    torch.set_num_threads(1)
    DistillObjective.__call__ = _slow_call
    run_recipe(Recipe.from_file(sys.argv[1]), sys.argv[2])
