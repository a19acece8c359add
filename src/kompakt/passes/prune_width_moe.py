"""prune.width on a Mixture-of-Experts model: expert channels and KV groups (not a pass itself).

Every expert keeps its own most important intermediate channels, ranked on the tokens routed to
it (kompakt.scoring.experts.expert_channel_importance); all experts keep the same count, since
transformers stores one expert width. A shared expert (Qwen2-MoE) loses the same fraction of
its channels, ranked over all tokens. Heads go as on a dense model (Minitron head importance).
`target_params` cuts expert (and shared-expert) channels alone, to the width whose parameter
count comes closest to the target (a multiple of `round_to` when the width allows it). Hidden-size
cuts are refused on MoE models (the router, the fused experts and the shared-expert gate all read
the hidden size; not written yet).
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, text_config
from kompakt.model.moe import expert_width, moe_spec
from kompakt.model.moe_surgery import WIDTH_MULTIPLE, shrink_experts, shrink_shared_expert
from kompakt.model.surgery import check_config, head_dim_of, require_linears, shrink_heads
from kompakt.passes.base import PassContext, PassReport
from kompakt.scoring.channels import channel_importance, top_k
from kompakt.scoring.experts import expert_channel_importance


def apply_moe(ctx: PassContext, config: Any, keep_count, kv_groups_to_keep) -> PassReport:
    """prune.width's apply for MoE families (`keep_count`, `kv_groups_to_keep`: its width rules)."""
    loaded = ctx.loaded
    if config.hidden_fraction is not None or config.hidden_size is not None:
        raise ConfigError("prune.width: on a Mixture-of-Experts model it cuts expert channels and heads only; "
                          "give mlp_fraction / mlp_channels / heads_fraction / kv_groups / target_params, no hidden cut")  # fmt: skip
    if config.importance != "activation":
        raise ConfigError("prune.width: on a Mixture-of-Experts model only importance: activation is available")
    spec, cfg = moe_spec(loaded), text_config(loaded)
    require_linears(decoder_layers(loaded), arch_for(loaded).linear_paths.values())
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    width = expert_width(loaded)
    keep_kv = kv_groups_to_keep(config, n_heads, n_kv)
    if keep_kv < n_kv and arch_for(loaded).head_dim_from_hidden:
        raise ConfigError(f"prune.width: heads cannot be removed from {arch_for(loaded).family}: its q/k norms are "
                          "built with hidden_size channels; cut expert channels (mlp_fraction) instead")  # fmt: skip
    keep_mlp = keep_count(width, config.mlp_fraction, config.mlp_channels, "mlp_channels")
    if config.target_params is not None:
        keep_mlp = solve_expert_width(loaded, config.target_params, config.round_to)
    keep_mlp = aligned_width(keep_mlp, width)
    shared_old = int(getattr(cfg, spec.shared_intermediate_key)) if spec.shared_expert else None
    keep_shared = None if shared_old is None else max(1, round(shared_old * keep_mlp / width))
    check_config(loaded, head_dim=head_dim_of(cfg), num_attention_heads=keep_kv * (n_heads // n_kv),
                 num_key_value_heads=keep_kv, **{spec.intermediate_key: keep_mlp})  # fmt: skip
    before = loaded.num_parameters()
    batches = [b.to(loaded.device) for b in ctx.calibration()[: config.max_blocks].split(config.batch_size)]
    changes: dict[str, list[int]] = {}
    if keep_kv < n_kv:
        heads = channel_importance(loaded.model, decoder_layers(loaded), batches)
        changes.update(shrink_heads(loaded, [top_k(s, keep_kv) for s in heads.kv_groups])[1])
    if keep_mlp < width:
        scores = expert_channel_importance(loaded.model, batches)
        keep = [[top_k(expert, keep_mlp) for expert in layer] for layer in scores.experts]
        changes.update(shrink_experts(loaded, keep)[1])
        if keep_shared is not None and keep_shared < shared_old:
            changes.update(shrink_shared_expert(loaded, [top_k(s, keep_shared) for s in scores.shared])[1])
    after = loaded.num_parameters()
    changes.pop("parameters", None)
    text = ", ".join(f"{key} {old}→{new}" for key, (old, new) in changes.items()) or "nothing"
    summary = f"prune.width: {text}; parameters {before:,} → {after:,} ({after / before:.1%})"
    details = {"widths": changes, "parameters": [before, after], "importance": "activation (experts: routed tokens)"}
    return PassReport(loaded=loaded, summary=summary, details=details)


def aligned_width(keep: int, width: int) -> int:
    """`keep` rounded down to a multiple of WIDTH_MULTIPLE (at least that), unless nothing is cut."""
    if keep >= width or width < WIDTH_MULTIPLE:
        return keep
    return max(WIDTH_MULTIPLE, keep // WIDTH_MULTIPLE * WIDTH_MULTIPLE)


def solve_expert_width(loaded, target: float, round_to: int) -> int:
    """The expert width whose model comes closest to `target` x the parameters when every expert
    (and the shared expert, in proportion) keeps that many channels; ConfigError when even an
    eighth of the width is too large."""
    spec, cfg = moe_spec(loaded), text_config(loaded)
    width, total = expert_width(loaded), loaded.num_parameters()
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    per_channel = 3 * hidden * layers * int(getattr(cfg, spec.num_experts_key))  # gate, up rows + down column
    shared = 3 * hidden * layers * int(getattr(cfg, spec.shared_intermediate_key)) if spec.shared_expert else 0
    mlp = per_channel * width + shared
    keep = (target * total - (total - mlp)) / mlp  # the kept share of every expert's channels
    step = round_to if round_to < width else WIDTH_MULTIPLE
    floor = max(1, -(-width // 8))
    if keep * width < floor:
        raise ConfigError(f"prune.width: target_params {target} needs fewer than {floor} of {width} expert channels; "
                          "raise it or remove experts (moe.prune) or layers (prune.depth)")  # fmt: skip
    return min(width, max(floor, int(round(keep * width / step)) * step))
