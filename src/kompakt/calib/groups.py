"""The order in which the sequential driver processes a decoder layer's Linears (data flow)."""

from __future__ import annotations

from collections.abc import Iterable

from kompakt.model.arch import base_role

# Data-flow order of the Linear roles inside a decoder layer; one tuple = one group.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attn.q", "attn.k", "attn.v", "attn.qkv"),
    ("attn.o",),
    ("mlp.gate", "mlp.up", "mlp.gate_up"),
    ("mlp.down",),
)


def sequential_groups(roles: Iterable[str], true_sequential: bool = True) -> list[tuple[str, ...]]:
    """Split `roles` into the groups processed one after another (one group if not true-sequential)."""
    present = sorted(set(roles))  # a factorized Linear's roles "attn.q.0", "attn.q.1" join its group
    ordered = [tuple(r for g in group for r in present if base_role(r) == g) for group in SEQUENTIAL_GROUPS]
    ordered = [group for group in ordered if group]
    known = {r for group in ordered for r in group}
    extra = tuple(sorted(set(present) - known))  # roles the table may add later: processed last
    if extra:
        ordered.append(extra)
    if not true_sequential:
        return [tuple(r for group in ordered for r in group)] if ordered else []
    return ordered
