"""Resume a streamed step killed mid-run at the last layer it finished (kill -9, out of memory).

A streamed step (kompakt.model.stream_save.LayerStream) given a `resume_dir` keeps everything a
later run with the same step needs in that directory (the runner's per-step checkpoint
directory, named by the step's hash, removed once the step is saved):

- `shards/`: the finished layers' safetensors shards, each written under a temporary name and
  renamed, and written at the end of every layer;
- `activations/`: the calibration hidden states entering the next layer (kompakt.calib.spill's
  two alternating directories: layer i's outputs are in `side(i)`, the other side still holds
  layer i - 1's, so a kill while layer i runs leaves the inputs of layer i intact);
- `progress.json` (written atomically, last): how many decoder layers are finished and the
  stream's bookkeeping (shard files, tensor names, compressed-tensors schemes), valid only with
  every shard it names present at its recorded size.

A new run of the step reads `progress.json` (`load`), the sequential driver
(kompakt.calib.sequential) skips the finished layers (a pass's `Phase.skip` rebuilds what it
records of them, GPTQ its grid plans) and reads layer k's inputs from disk; the stream carries on
writing. The weights are those of an uninterrupted run bit for bit (tests/recipe/test_stream_resume.py
kills a real process). A pass that cannot skip layers (no `Phase.skip`, or one that keeps GGUF
bytes beside the weights) restarts the step from layer 0: the stream discards its progress
(`decline`) as soon as such a pass writes a layer it had finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kompakt.atomic import write_text

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
VERSION = 1


def side(index: int) -> str:
    """The activation directory decoder layer `index` writes its outputs to (kompakt.calib.spill)."""
    return "b" if index % 2 == 0 else "a"


@dataclass
class LayerResume:
    """Where a resumable streamed step keeps its state (see the module docstring).

    Attributes:
        directory: the step's resume directory.
        start: decoder layers finished by an earlier run (0: none; set by `load`).
        resumable: False once the pass wrote something a restart cannot rebuild (progress is then
            no longer recorded).
    """

    directory: Path
    start: int = 0
    resumable: bool = True

    @property
    def shards(self) -> Path:
        return self.directory / "shards"

    @property
    def activations(self) -> Path:
        return self.directory / "activations"

    def inputs_of(self, index: int) -> Path:
        """The directory holding decoder layer `index`'s inputs (layer index - 1's outputs)."""
        return self.activations / side(index - 1)

    def load(self, key: str) -> dict[str, Any] | None:
        """The recorded progress of an earlier run of the same step (`key`), or None (nothing
        usable: no file, another step, a shard missing or of another size; the directory is
        then emptied). Sets `start`."""
        path = self.directory / PROGRESS
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        usable = (isinstance(state, dict) and state.get("version") == VERSION and state.get("key") == key
                  and all(_has_size(self.shards / name, size) for name, size in state.get("files", {}).items())
                  and self.inputs_of(int(state.get("layers", 0))).is_dir())  # fmt: skip
        if not usable:
            self.clear()
            return None
        self.start = int(state["layers"])  # type: ignore[index]
        logger.info("resuming after decoder layer %d (%s)", self.start - 1, self.directory)
        return state  # type: ignore[return-value]

    def save(self, state: dict[str, Any], key: str, layers: int, files: dict[str, int]) -> None:
        """Record that `layers` decoder layers are finished (their shards `files`, name -> bytes,
        are on disk and the next layer's inputs are spilled): atomically, after everything else."""
        if not self.resumable:
            return
        record = {"version": VERSION, "key": key, "layers": layers, "files": files, **state}
        write_text(self.directory / PROGRESS, json.dumps(record) + "\n")

    def decline(self) -> None:
        """Forget the recorded progress (the step restarts from layer 0) and stop recording it."""
        self.start = 0
        self.resumable = False
        (self.directory / PROGRESS).unlink(missing_ok=True)

    def clear(self) -> None:
        """Empty the directory (nothing of an earlier run is used)."""
        self.start = 0
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.shards.mkdir(parents=True)


def _has_size(path: Path, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False
