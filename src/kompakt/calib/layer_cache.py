"""Skip recomputing a decoder layer's attention / MLP when only their last Linear changed.

The sequential driver runs one decoder layer several times per calibration batch: once per
true-sequential group (the o group needs the attention, the gate/up group needs the attention's
output again, the down group needs attention and gate/up) and once more to propagate its
outputs. Between those runs a pass typically changes only the Linears of the group it was
handed. The attention's output is o_proj(z) and the MLP's is down_proj(u); while the submodule's
input and every parameter of it except that last Linear are unchanged, z (u) is unchanged too,
so the submodule can be replaced by its last Linear applied to the z (u) recorded in an earlier
run. That saves, per layer, three of the four attention computations and two of the three
gate/up computations of a GPTQ pass, with bit-identical results: the same Linear on the same
tensor.

Exactness does not rest on knowing what a pass changed: each use compares the submodule's input
with the recorded one (torch.equal) and its other parameters with a snapshot taken when z was
recorded; any difference (AWQ folding a scale into v_proj's rows, SparseGPT pruning up_proj)
runs the submodule for real and records again. That "output = last Linear's output" holds is
checked once per submodule class on a real run (the returned tensor *is* the Linear's output);
a family whose attention post-processes its o_proj output never gets substituted.

The last Linear's output is kept too while that Linear is unchanged (o_proj's output is read by
the gate/up run, the down run and the propagation).

Parameters do not change while the driver runs the layer over its batches (a pass changes them
between runs), so the comparison with the snapshot is made on a run's first batch and its answer
kept for the run's other batches (`LayerCaches.batch` starts a run at batch 0, `observe` ends
one); outside a driver run (a pass calling the layer from its `process`) every call compares.

Memory: the recorded input, z (u) and output of every calibration batch of the current layer
(for SmolLM2-135M at 128 × 512 tokens: 150 MB for each hidden-size tensor, 400 MB for u).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from kompakt.calib.capture import layer_output
from kompakt.model.arch import ArchSpec, get_submodule


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class LastLinearCache:
    """Memoizes `last`'s input inside `parent` per calibration batch (see the module docstring).

    Args:
        parent: the submodule (a decoder layer's attention or MLP).
        last: the Linear whose output the parent returns.
        verified: submodule class -> the length of the tuple it returns (0: a tensor) when its
            output is `last`'s output, -1 when it is not; shared by the caches of one driver run,
            so every class is checked once.
    """

    def __init__(self, parent: nn.Module, last: nn.Linear, verified: dict[type, int]) -> None:
        self.parent, self.last, self.verified = parent, last, verified
        own = {id(p) for p in last.parameters()}
        self.others = [p for p in parent.parameters() if id(p) not in own]
        self.snapshot: list[torch.Tensor] | None = None
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (parent input, last input)
        self.batch = 0
        self.blocked = False  # a Linear inside the parent (other than `last`) is being observed
        self.last_observed = False  # `last` itself is: it must run (its hooks record its input)
        self.outputs: dict[int, torch.Tensor] = {}  # batch -> last(z), while last is unchanged
        self.last_snapshot: list[torch.Tensor] | None = None
        self._pending: torch.Tensor | None = None  # the parent input of the real run in progress
        self.in_run = False  # the driver is running batches: parameters are not changing
        self._same: dict[str, bool] = {}  # "others" / "last" -> unchanged, found in this driver run
        self._last_out: torch.Tensor | None = None
        self._real = parent.forward

    @contextmanager
    def installed(self) -> Iterator[LastLinearCache]:
        """Wrap the parent's forward and hook `last` while the block runs (restored after)."""
        handles = [self.last.register_forward_pre_hook(self._record), self.last.register_forward_hook(self._seen)]
        self.parent.forward = self._forward  # an instance attribute shadows the class method
        try:
            yield self
        finally:
            del self.parent.forward
            for handle in handles:
                handle.remove()

    def start_run(self, active: bool) -> None:
        """A driver run over the batches begins (`active`) or ends: forget the comparisons made."""
        self.in_run = active
        self._same.clear()

    def _unchanged(self, key: str, params: list[torch.Tensor], snapshot: list[torch.Tensor] | None) -> bool:
        """All of `params` equal their `snapshot` (compared once per driver run; see the module docstring)."""
        if key in self._same:
            return self._same[key]
        same = snapshot is not None and all(torch.equal(p, s) for p, s in zip(params, snapshot))
        if self.in_run:
            self._same[key] = same
        return same

    def _params_unchanged(self) -> bool:
        return self._unchanged("others", self.others, self.snapshot)

    def _last_output(self, z: torch.Tensor) -> torch.Tensor:
        """last(z), computed once per batch while `last` is unchanged (o_proj's output is needed
        by the gate/up run, the down run and the propagation)."""
        if self.last_observed:
            return self.last(z)
        params = list(self.last.parameters())
        if not self._unchanged("last", params, self.last_snapshot):
            self.outputs.clear()
            self.last_snapshot = [p.detach().clone() for p in params]
            if self.in_run:
                self._same["last"] = True
        if self.batch not in self.outputs:
            self.outputs[self.batch] = self.last(z)
        return self.outputs[self.batch].clone()  # the layer may change what it gets in place

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _first_tensor(args, kwargs)
        entry = self.entries.get(self.batch)
        arity = self.verified.get(type(self.parent), -1)
        if arity >= 0 and not self.blocked and entry is not None and torch.equal(entry[0], hidden) and self._params_unchanged():
            out = self._last_output(entry[1])
            return (out, *([None] * (arity - 1))) if arity else out
        self._pending, self._last_out = hidden, None
        try:
            result = self._real(*args, **kwargs)
        finally:
            self._pending = None
        self._verify(result)
        return result

    def _record(self, module: nn.Module, args: tuple) -> None:
        """last's pre-hook: remember its input for this batch (runs before any statistics hook)."""
        if self._pending is None:
            return
        if not self._params_unchanged():  # entries of other batches were made with other weights
            self.entries.clear()
            self.outputs.clear()
            self.snapshot = [p.detach().clone() for p in self.others]
            if self.in_run:
                self._same["others"] = True
        self.entries[self.batch] = (self._pending.detach(), args[0].detach())
        self.outputs.pop(self.batch, None)

    def _seen(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._last_out = output

    def _verify(self, result: Any) -> None:
        kind, last_out = type(self.parent), self._last_out
        self._last_out = None
        if kind in self.verified or last_out is None:
            return
        if layer_output(result) is not last_out:
            self.verified[kind] = -1
        else:
            self.verified[kind] = len(result) if isinstance(result, (tuple, list)) else 0


class LayerCaches:
    """The attention and MLP caches of one decoder layer; `batch(i)` before running batch i."""

    def __init__(self, layer: nn.Module, spec: ArchSpec, verified: dict[type, int]) -> None:
        # An MoE block has no single last Linear (its experts are fused): it always runs for real.
        pairs = [(parent, last) for parent, last in ((spec.attn, spec.o), (spec.mlp, spec.down)) if last]
        self.caches = [
            LastLinearCache(get_submodule(layer, parent), get_submodule(layer, last), verified)  # type: ignore[arg-type]
            for parent, last in pairs
        ]

    def batch(self, index: int) -> None:
        for cache in self.caches:
            if index <= cache.batch or not cache.in_run:  # a new driver run over the batches (from batch 0)
                cache.start_run(True)
            cache.batch = index

    def observe(self, modules: Iterable[nn.Module]) -> None:
        """The Linears whose inputs the next runs record: a submodule holding one of them (other
        than its last Linear, which still runs on the recorded input) must run for real."""
        wanted = {id(module) for module in modules}
        for cache in self.caches:
            cache.start_run(False)  # a run ends or begins here: the pass may change parameters in between
            inner = {id(module) for module in cache.parent.modules()} - {id(cache.last)}
            cache.blocked = bool(wanted & inner)
            cache.last_observed = id(cache.last) in wanted

    @contextmanager
    def installed(self) -> Iterator[LayerCaches]:
        with ExitStack() as stack:
            for cache in self.caches:
                stack.enter_context(cache.installed())
            yield self
