"""Expert removal and merging for Mixture-of-Experts layers, on plain tensors.

The layout is transformers 5's fused one (Mixtral, Qwen2/3-MoE, OLMoE): per layer a router
weight [E, H] and two expert stacks, `gate_up` [E, 2I, H] (rows [gate | up]) and `down`
[E, H, I]. Nothing here knows a model; kompakt.passes.moe_* hand the tensors in.

Merging follows MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy", ICLR 2024): experts are grouped around dominant experts, each
member's intermediate neurons are permuted to best match the dominant expert's (an expert's
output is unchanged by permuting its neurons, so this only decides which neurons are averaged
together), and the group becomes one expert, the routing-frequency-weighted average of the aligned
members. Neuron matching is the linear assignment problem on the neurons' weight vectors
(gate row, up row and down column concatenated), solved exactly by the Hungarian method
(scipy.optimize.linear_sum_assignment), as in MC-SMoE's weight-matching variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def keep_experts(tensors: Sequence[torch.Tensor], keep: Sequence[int]) -> list[torch.Tensor]:
    """Each tensor with only the experts `keep` along dim 0, in that order (router rows, expert
    stacks, a router bias): removing an expert removes its router row with it."""
    index = torch.as_tensor(list(keep), dtype=torch.long)
    return [t.detach().index_select(0, index.to(t.device)).clone() for t in tensors]


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[I, 3H]: every intermediate neuron of one expert as its gate row, up row and down column
    (the three weight vectors that move together when neurons are permuted)."""
    inter = down.shape[1]
    return torch.cat([gate_up[:inter], gate_up[inter:], down.t()], dim=1).float()


def align_neurons(reference: tuple[torch.Tensor, torch.Tensor],
                  other: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """The permutation p of `other`'s neurons that maximises sum_j <ref_j, other_p[j]>.

    Args:
        reference / other: (gate_up [2I, H], down [H, I]) of one expert each.
    Returns:
        p [I] (long): other's neuron p[j] goes to position j.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = neuron_features(*reference) @ neuron_features(*other).t()  # [I, I]
    rows, cols = linear_sum_assignment(similarity.cpu().double().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_neurons(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert with its intermediate neurons reordered (the expert computes the same function)."""
    inter = down.shape[1]
    return torch.cat([gate_up[:inter][perm], gate_up[inter:][perm]]), down[:, perm]


def merge_group(gate_up: torch.Tensor, down: torch.Tensor, members: Sequence[int],
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One merged expert from `members` (the first is the dominant one all others are aligned to).

    Args:
        gate_up [E, 2I, H], down [E, H, I]: the layer's experts.
        members: expert indices of the group, dominant first.
        weights [len(members)]: merge weights (routing frequencies), need not sum to 1.
    Returns:
        (gate_up [2I, H], down [H, I]) of the merged expert, in the inputs' dtype.
    """
    weights = weights.double().clamp_min(0)
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(members))
    lead = members[0]
    reference = (gate_up[lead].float(), down[lead].float())
    merged_gu = reference[0] * float(weights[0])
    merged_down = reference[1] * float(weights[0])
    for weight, member in zip(weights[1:].tolist(), members[1:]):
        other = (gate_up[member].float(), down[member].float())
        perm = align_neurons(reference, other)
        aligned_gu, aligned_down = permute_neurons(*other, perm)
        merged_gu = merged_gu + aligned_gu * weight
        merged_down = merged_down + aligned_down * weight
    return merged_gu.to(gate_up.dtype), merged_down.to(down.dtype)


def group_by_router(router: torch.Tensor, frequency: torch.Tensor, n_groups: int) -> list[list[int]]:
    """MC-SMoE grouping: the `n_groups` most often routed experts lead the groups; every other
    expert joins the leader whose router row is most similar (cosine; the weight-only form of
    MC-SMoE's router-logit similarity). Each group lists its dominant expert first.

    Ties in frequency go to the lower index, so the plan is deterministic.
    """
    n_experts = router.shape[0]
    order = sorted(range(n_experts), key=lambda e: (-float(frequency[e]), e))
    leaders = order[:n_groups]
    rows = torch.nn.functional.normalize(router.float(), dim=1)
    groups = {leader: [leader] for leader in leaders}
    for expert in order[n_groups:]:
        similarity = rows[leaders] @ rows[expert]
        groups[leaders[int(similarity.argmax())]].append(expert)
    return [groups[leader] for leader in leaders]


def check_plan(groups: Sequence[Sequence[int]], n_experts: int) -> str:
    """Why a merge plan is invalid ("" when valid): every expert in exactly one group, so that no
    router row is left pointing nowhere and none points at two merged experts."""
    seen: list[int] = [e for group in groups for e in group]
    if any(not group for group in groups):
        return "a group is empty"
    bad = sorted({e for e in seen if not 0 <= e < n_experts})
    if bad:
        return f"expert(s) {bad} do not exist (the layer has {n_experts})"
    twice = sorted({e for e in seen if seen.count(e) > 1})
    if twice:
        return f"expert(s) {twice} are in more than one group"
    missing = sorted(set(range(n_experts)) - set(seen))
    if missing:
        return f"expert(s) {missing} are in no group, so their router rows would point nowhere"
    return ""


def merged_router(router: torch.Tensor, groups: Sequence[Sequence[int]], frequency: torch.Tensor,
                  rule: str) -> torch.Tensor:  # fmt: skip
    """[len(groups), H] router of the merged layer: each group's row is the dominant member's
    row ("dominant") or the routing-frequency-weighted mean of the members' rows ("mean")."""
    rows = []
    for group in groups:
        if rule == "dominant" or len(group) == 1:
            rows.append(router[group[0]].float())
            continue
        w = frequency[list(group)].double().clamp_min(0)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(group))
        rows.append((router[list(group)].double() * w.unsqueeze(1)).sum(0).float())
    return torch.stack(rows).to(router.dtype)
