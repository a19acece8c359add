"""The sequential driver's side of resuming a killed streamed step (kompakt.model.stream_resume):
which layer to start at, and what the phases are told of the layers they do not run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from kompakt.calib.groups import sequential_groups
from kompakt.model.arch import ArchSpec, linear_modules


def resume_start(resume, phases: Sequence[Any], spec: ArchSpec) -> int:
    """The first decoder layer to run: after the layers a killed run finished (`resume`, a
    kompakt.model.stream_resume.LayerResume) when every phase can skip them, else 0 (the stream
    then starts over). MoE layers are not skipped (their experts' roles depend on the weights)."""
    if resume is None or not resume.start or spec.moe is not None or any(p.skip is None for p in phases):
        return 0
    return resume.start


def skip_layer(spec: ArchSpec, index: int, layer: nn.Module, phases: Sequence[Any], roles: Sequence[str] | None,
               true_sequential: bool) -> None:  # fmt: skip
    """Tell every phase about a finished layer it does not run, its roles in `_Run.groups`' order."""
    for phase in phases:
        chosen = phase.roles if phase.roles is not None else roles
        selected = [role for role in linear_modules(layer, spec) if chosen is None or role in chosen]
        grouping = true_sequential if phase.true_sequential is None else phase.true_sequential
        phase.skip(index, layer, [r for group in sequential_groups(selected, grouping) for r in group])  # type: ignore[misc]
