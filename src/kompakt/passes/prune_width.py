"""Width pruning: remove MLP channels, attention heads (whole KV groups) and hidden channels.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): rank every prunable unit by its activations on a small calibration set in
one forward pass, then physically remove the least important ones. The scores are
kompakt.scoring.channels (the paper's (batch=L2, seq=mean) aggregation; formulas there), the
same numbers `kompakt analyze` reports, so the channels it ranks highest are the ones kept:

- MLP channel i of a layer: |a_i| at the input of down_proj;
- attention head: L2 norm of its attention output (the head's slice of the o_proj input);
  under GQA the heads sharing one KV head are summed into a KV-group score and whole groups
  go, so the model stays valid;
- hidden (embedding) channel: |x_i| of every pre-attention and pre-MLP norm output, summed
  over layers.

Mixture of Experts (Mixtral, Qwen-MoE, OLMoE): every expert keeps its own most important channels,
ranked on the tokens routed to it, and heads go as above; hidden cuts and target_params are
refused there (kompakt.passes.prune_width_moe).

`importance: random` is the baseline. The same number of units is removed in every layer, so
the result is a standard config that plain transformers (and llama.cpp) can load.

Sentence encoders (BERT, DistilBERT, RoBERTa, XLM-R, ModernBERT): MLP channels, scored on
padded calibration sentences (padding left out). Heads and hidden channels are refused: these
families compute the head size as hidden_size / num_attention_heads (transformers 5 has no
head_dim setting for them and dropped `pruned_heads`), so either cut would change every head's
size. ModernBERT's fused GLU (Wi = [gate | up] rows) loses both halves of a channel.

Sizes: for each of MLP / heads / hidden give a fraction to remove (`mlp_fraction`,
`heads_fraction`, `hidden_fraction`) or the width to keep (`mlp_channels`, `kv_groups`,
`attention_heads`, `hidden_size`). Or give `target_params` (fraction of parameters to keep):
hidden channels are cut by r and MLP channels by 1.4·r — the ratio Minitron chose for
Llama-3.1-Minitron-4B-Width (hidden 4096→3072, MLP 14336→9216) — with r found by bisection
so the parameter count reaches the target; widths are rounded to a multiple of `round_to`
(llama.cpp quantizes in blocks of 32). Heads are only cut when asked.

When to use: a smaller *and* faster model that keeps every layer; quality drops with the
cut, and hidden-channel pruning changes every RMSNorm's statistics, so heal with
distillation afterwards (Minitron always does).

Sample recipe step::

    - prune.width: {mlp_fraction: 0.5}
    - prune.width: {target_params: 0.5}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, text_config
from kompakt.model.inputs import Batch
from kompakt.model.loaded import LoadedModel
from kompakt.model.surgery import (
    check_config,
    config_problem,
    head_dim_of,
    require_linears,
    shrink_heads,
    shrink_hidden,
    shrink_mlp,
)
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.passes.prune_width_moe import apply_moe
from kompakt.scoring.channels import ChannelImportance, channel_importance, top_k

logger = logging.getLogger(__name__)

IMPORTANCES = ("activation", "random")
MLP_TO_HIDDEN_CUT = 1.4  # Llama-3.1-Minitron-4B-Width: MLP cut 35.7 % vs hidden cut 25 %
MIN_KEPT = 1 / 8  # the solver never keeps less than this share of a width


@dataclass
class WidthConfig:
    mlp_fraction: float | None = field(default=None, metadata=doc("fraction of MLP channels to remove, in [0, 1)"))
    mlp_channels: int | None = field(default=None, metadata=doc("MLP intermediate channels to keep per layer"))
    heads_fraction: float | None = field(
        default=None, metadata=doc("fraction of KV groups (a KV head + its query heads) to remove, in [0, 1)")
    )
    kv_groups: int | None = field(default=None, metadata=doc("KV groups to keep per layer (an integer >= 1)"))
    attention_heads: int | None = field(
        default=None, metadata=doc("query heads to keep per layer; a multiple of the GQA group size")
    )
    hidden_fraction: float | None = field(
        default=None, metadata=doc("fraction of hidden (embedding) channels to remove, in [0, 1)")
    )
    hidden_size: int | None = field(default=None, metadata=doc("hidden channels to keep"))
    target_params: float | None = field(
        default=None, metadata=doc("fraction of parameters to keep, in (0, 1): splits the cut over MLP and hidden")
    )
    round_to: int = field(default=32, metadata=doc("widths chosen by target_params are multiples of this"))
    importance: str = field(default="activation", metadata=doc(f"ranking: {', '.join(IMPORTANCES)}"))
    max_blocks: int = field(default=64, metadata=doc("calibration blocks used for the importance scores"))
    batch_size: int = field(default=4, metadata=doc("calibration blocks per forward pass"))

    def uses_calibration(self) -> bool:
        """importance: random (the baseline) reads no data."""
        return self.importance == "activation"

    def validate(self) -> None:
        for name in ("mlp_fraction", "heads_fraction", "hidden_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"prune.width: {name} must be in [0, 1), got {value}")
        for name in ("mlp_channels", "kv_groups", "attention_heads", "hidden_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"prune.width: {name} must be an integer >= 1, got {value}")
        _exclusive(("mlp_fraction", "mlp_channels"), self)
        _exclusive(("heads_fraction", "kv_groups", "attention_heads"), self)
        _exclusive(("hidden_fraction", "hidden_size"), self)
        if self.target_params is not None:
            if not 0.0 < self.target_params < 1.0:
                raise ConfigError(f"prune.width: target_params must be in (0, 1), got {self.target_params}")
            widths = ("mlp_fraction", "mlp_channels", "hidden_fraction", "hidden_size")
            given = [n for n in widths if getattr(self, n) is not None]
            if given:
                raise ConfigError(f"prune.width: target_params chooses MLP and hidden widths itself; drop {given[0]}")
        sizes = ("mlp_fraction", "mlp_channels", "heads_fraction", "kv_groups", "attention_heads")
        if all(getattr(self, n) is None for n in (*sizes, "hidden_fraction", "hidden_size", "target_params")):
            raise ConfigError("prune.width: say what to cut, e.g. mlp_fraction: 0.5 or target_params: 0.5")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"prune.width: unknown importance {self.importance!r}; valid: {', '.join(IMPORTANCES)}")
        if self.round_to < 1 or self.max_blocks < 1 or self.batch_size < 1:
            raise ConfigError("prune.width: round_to, max_blocks and batch_size must be at least 1")


def _exclusive(names: tuple[str, ...], config: WidthConfig) -> None:
    given = [n for n in names if getattr(config, n) is not None]
    if len(given) > 1:
        raise ConfigError(f"prune.width: give only one of {', '.join(given)}")


# --------------------------------------------------------------------------- widths


def _keep_count(size: int, fraction: float | None, count: int | None, what: str) -> int:
    if count is not None:
        if count > size:
            raise ConfigError(f"prune.width: {what} {count} exceeds the model's {size}; give at most {size}")
        return count
    if fraction is None:
        return size
    return max(1, size - int(fraction * size + 0.5))


def kv_groups_to_keep(config: WidthConfig, n_heads: int, n_kv: int) -> int:
    """KV groups kept; explicit head counts must respect GQA grouping."""
    rep = n_heads // n_kv
    if config.attention_heads is not None:
        if config.attention_heads % rep:
            raise ConfigError(
                f"prune.width: attention_heads {config.attention_heads} breaks GQA grouping; "
                f"use a multiple of {rep} (query heads per KV head)"
            )
        return _keep_count(n_kv, None, config.attention_heads // rep, "attention_heads / group size")
    return _keep_count(n_kv, config.heads_fraction, config.kv_groups, "kv_groups")


def _param_model(loaded: LoadedModel, heads: tuple[int, int] | None = None) -> tuple[float, float, float]:
    """Parameters as a*H + b*H*I + c for hidden size H and MLP width I.

    `heads` = (query heads, KV heads) after a planned head cut (its biases are ignored).
    """
    model, spec, cfg = loaded.model, arch_for(loaded.model), text_config(loaded.model)
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    norms = sum(1 for role in spec.norm_paths if role not in ("attn.q_norm", "attn.k_norm"))
    tied = get_submodule(model, spec.lm_head).weight is get_submodule(model, spec.embed).weight

    def linear_coefficient(n_heads: int, n_kv: int) -> int:
        q_out, kv_out = n_heads * head_dim_of(cfg), n_kv * head_dim_of(cfg)
        return cfg.vocab_size * (1 if tied else 2) + 1 + layers * (norms + 2 * q_out + 2 * kv_out)

    now = (cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads)
    b = 3 * layers
    c = loaded.num_parameters() - linear_coefficient(*now) * hidden - b * hidden * inter
    return linear_coefficient(*(heads or now)), b, c


def solve_target(
    loaded: LoadedModel, target: int, round_to: int, heads: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(hidden, intermediate) widths for about `target` parameters (see module doc).

    For every allowed hidden width h the MLP width that reaches the target is computed
    (rounded both ways); among pairs within 2 % of the original size the one whose MLP cut is
    closest to 1.4x its hidden cut wins, else the pair closest to the target.
    """
    a, b, c = _param_model(loaded, heads)
    cfg = text_config(loaded.model)
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    full = a * hidden + b * hidden * inter + c
    candidates = []
    for h in _hidden_widths(loaded, round_to, heads):
        exact = (target - a * h - c) / (b * h)
        for i in (int(exact // round_to) * round_to, int(-(-exact // round_to)) * round_to):
            i = min(inter, max(i, round_to, int(MIN_KEPT * inter)))
            candidates.append((h, i, a * h + b * h * i + c))
    if min(p for _, _, p in candidates) > target:
        floor = min(p for _, _, p in candidates) / full
        raise ConfigError(
            f"prune.width: target_params is below what width pruning reaches here ({floor:.2f}); raise it"
        )
    close = [x for x in candidates if abs(x[2] - target) <= 0.02 * full]

    def ratio_error(x: tuple[int, int, float]) -> float:
        return abs((1 - x[1] / inter) - MLP_TO_HIDDEN_CUT * (1 - x[0] / hidden))

    best = min(close, key=ratio_error) if close else min(candidates, key=lambda x: abs(x[2] - target))
    return best[0], best[1]


def _hidden_widths(loaded: LoadedModel, round_to: int, heads: tuple[int, int] | None) -> list[int]:
    """Hidden widths the solver may pick: multiples of round_to that give a valid config.

    When few exist (e.g. 9 heads and round_to 32 allow only 288 of 576: Llama configs need
    hidden_size % num_attention_heads == 0), round_to is halved until at least three do.
    """
    cfg = text_config(loaded.model)
    hidden = cfg.hidden_size
    head_counts = {"num_attention_heads": heads[0], "num_key_value_heads": heads[1]} if heads else {}
    head_counts["head_dim"] = head_dim_of(cfg)
    step = round_to
    while True:
        widths = [
            h for h in range(step, hidden, step)
            if h >= MIN_KEPT * hidden and config_problem(loaded, hidden_size=h, **head_counts) is None
        ]  # fmt: skip
        if len(widths) >= 3 or step == 1:
            if step != round_to:
                logger.warning("prune.width: hidden widths are multiples of %d, not %d (head counts)", step, round_to)
            return [*widths, hidden]
        step //= 2


# --------------------------------------------------------------------------- importance


def activation_scores(loaded: LoadedModel, blocks: Batch, batch_size: int) -> ChannelImportance:
    """Minitron importances from one pass over `blocks` [n, L] or padded sentences (kompakt.scoring.channels)."""
    batches = [batch.to(loaded.device) for batch in blocks.split(batch_size)]  # sentences: cut to their length
    return channel_importance(loaded.model, decoder_layers(loaded.model), batches)


def random_scores(loaded: LoadedModel, seed: int) -> ChannelImportance:
    """The baseline: uniform random scores (KV groups sum their heads, like the real ones)."""
    cfg = text_config(loaded.model)
    generator = torch.Generator().manual_seed(seed)
    n_layers = cfg.num_hidden_layers
    n_heads, n_kv, inter, hidden_size = widths_of(loaded)
    mlp = [torch.rand(inter, generator=generator) for _ in range(n_layers)]
    heads = [torch.rand(n_heads, generator=generator) for _ in range(n_layers)]
    hidden = torch.rand(hidden_size, generator=generator)
    return ChannelImportance.from_heads(mlp, heads, hidden, n_kv, aggregation="random")


# --------------------------------------------------------------------------- apply


def widths_of(loaded: LoadedModel) -> tuple[int, int, int, int]:
    """(query heads, KV heads, MLP width, hidden size) under the family's config names."""
    cfg = text_config(loaded.model)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)  # encoders have no GQA
    return n_heads, n_kv, int(getattr(cfg, arch_for(loaded).intermediate_key)), int(cfg.hidden_size)


def _check_head_size(loaded: LoadedModel, config: WidthConfig, cut_heads: bool, cut_hidden: bool) -> None:
    """ConfigError (before any scoring) for cuts a family whose head size is hidden_size /
    num_attention_heads cannot store (ArchSpec.head_dim_from_hidden)."""
    spec = arch_for(loaded)
    if not spec.head_dim_from_hidden:
        return
    what = "target_params" if config.target_params is not None else "removing heads" if cut_heads else (
        "removing hidden channels" if cut_hidden else None)  # fmt: skip
    if what:
        raise ConfigError(
            f"prune.width: {what} is not possible on {spec.family}: transformers computes its head size as "
            "hidden_size / num_attention_heads, so the heads would change size; prune MLP channels "
            "(mlp_fraction / mlp_channels) or layers (prune.depth)"
        )


def apply(ctx: PassContext, config: WidthConfig) -> PassReport:
    loaded = ctx.loaded
    if arch_for(loaded).moe is not None:  # expert channels ranked per expert (kompakt.passes.prune_width_moe)
        return apply_moe(ctx, config, _keep_count, kv_groups_to_keep)
    require_linears(decoder_layers(loaded.model), arch_for(loaded).linear_paths.values())  # not factorized
    cfg = text_config(loaded.model)
    before = loaded.num_parameters()
    n_heads, n_kv, inter, hidden = widths_of(loaded)
    old = {"intermediate_size": inter, "kv_groups": n_kv, "hidden_size": hidden}
    keep_kv = kv_groups_to_keep(config, n_heads, n_kv)
    keep_mlp = _keep_count(inter, config.mlp_fraction, config.mlp_channels, "mlp_channels")
    keep_hidden = _keep_count(hidden, config.hidden_fraction, config.hidden_size, "hidden_size")
    _check_head_size(loaded, config, keep_kv < n_kv, keep_hidden < hidden)
    if config.target_params is not None:  # solved before any edit: an impossible target changes nothing
        heads_after = (keep_kv * (n_heads // n_kv), keep_kv)
        keep_hidden, keep_mlp = solve_target(loaded, int(config.target_params * before), config.round_to, heads_after)
    heads = {} if arch_for(loaded).head_dim_from_hidden else dict(  # no head_dim / GQA keys there
        head_dim=head_dim_of(cfg), num_attention_heads=keep_kv * (n_heads // n_kv), num_key_value_heads=keep_kv)
    check_config(  # widths that transformers would reject fail here, before any scoring
        loaded, hidden_size=keep_hidden, **{arch_for(loaded).intermediate_key: keep_mlp}, **heads,
    )  # fmt: skip
    if config.uses_calibration():  # activation importance
        blocks = ctx.calibration()[: config.max_blocks]
        scores = activation_scores(loaded, blocks, config.batch_size)
    else:
        scores = random_scores(loaded, ctx.seed)
    if keep_kv < n_kv:
        shrink_heads(loaded, [top_k(s, keep_kv) for s in scores.kv_groups])
    if keep_mlp < old["intermediate_size"]:
        shrink_mlp(loaded, [top_k(s, keep_mlp) for s in scores.mlp])
    if keep_hidden < old["hidden_size"]:
        shrink_hidden(loaded, top_k(scores.hidden, keep_hidden))
    after = loaded.num_parameters()
    new = {"intermediate_size": keep_mlp, "kv_groups": keep_kv, "hidden_size": keep_hidden}
    changed = ", ".join(f"{k} {old[k]}→{new[k]}" for k in old if old[k] != new[k]) or "nothing"
    details = {"widths": {k: [old[k], new[k]] for k in old}, "parameters": [before, after]}
    details["importance"] = config.importance
    summary = f"prune.width: {changed}; parameters {before:,} → {after:,} ({after / before:.1%})"
    return PassReport(loaded=loaded, summary=summary, details=details)


PASS = PassSpec(
    name="prune.width",
    config=WidthConfig,
    apply=apply,
    needs_calibration=True,
    changes_architecture=True,
    doc=__doc__,
)
