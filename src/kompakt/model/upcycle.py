"""Upcycle a dense Llama-layout model into a Mixture of Experts (Mixtral, or Qwen2-MoE with a shared expert).

No MoE weights install offline, yet expert pruning and merging need a real MoE to be measured
on; this builds one from the embedded SmolLM2 (or any llama / mistral model with a plain
gate / up / down MLP). Attention, norms and embeddings are copied; each MLP becomes a sparse
block of `experts` experts routed top-`top_k`, saved as an ordinary Mixtral (or, with `shared`,
Qwen2-MoE) directory that transformers, kompakt and llama.cpp load.

Two ways to make the experts (the two the MoE literature uses):

- ``split`` (LLaMA-MoE, Zhu et al. 2024, "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with
  Continual Pre-training"): the MLP's intermediate neurons are partitioned into `experts` groups
  of equal size, so the MoE has the dense model's parameter count and each token runs
  top_k / experts of the MLP. Neurons that fire together go to the same expert (balanced
  clustering of their activation magnitudes over calibration tokens, LLaMA-MoE's co-activation
  idea), the router is fitted by least squares to predict each expert's log output norm from the
  block input (tokens go to the experts that would contribute most) and scaled down so the chosen
  experts' gates stay near uniform (every kept neuron weighted as in the dense MLP; `router_spread`
  sets how sharply: larger values keep the same top-k choice and move the gates away from uniform,
  KL to SmolLM2 0.83 at the default 0.1, 0.98 at 1, 0.99 at 2), and one scale per layer,
  fitted the same way, restores the dense MLP's output size. Experts differ from the start; the
  model needs distillation from the dense one (distill.kd) to win back quality.
- ``copy`` (Sparse Upcycling, Komatsuzaki et al. 2023): every expert is the whole MLP plus small
  noise, the router random; the MoE starts as good as the dense model but `experts` times its MLP
  parameters, and its experts stay near-identical until long training separates them.

``shared=f`` (DeepSeekMoE's shared-expert isolation, Dai et al. 2024, in the Qwen2-MoE layout):
the fraction f of the neurons contributing most to the MLP's output (RMS activation x norm of the
down column) becomes an always-on shared expert (its sigmoid gate starts at 0.5, so its down
projection is doubled); only the rest is split or copied into routed experts. The neurons
SmolLM2's massive activations come from then run for every token, and a flipped top-k choice
swaps a small part of the MLP instead of most of it. The recipe the MoE bench uses (bench/moe.py).

Measured on SmolLM2-135M, 8 experts top-2 split, before distillation (8 calibration blocks, KL to
the dense model on the first 1024 WikiText-2 test tokens, under load): no shared expert KL 9.2
(ppl ratio ~5e3), shared 0.25 KL 1.67 (x4.1), shared 0.5 KL 0.92 (x2.0), shared 0.75 KL 0.43
(x1.35). Shared 0.5 then 20k tokens of distill.kd (14.6 min on 2 loaded cores; bench/moe.py, first
4096 test tokens): KL 0.83 -> 0.76, ppl ratio 2.11 -> 1.40, top-1 0.55; its routed experts stay
distinct (mean pairwise cosine of their outputs 0.007) and the router stays near uniform (routing
entropy 2.074 of log 8 = 2.079): 20 optimiser steps barely move it. 20k tokens more did not help
(KL 0.78, ppl ratio 1.39): the KD budget a CPU allows leaves it at ~x1.4, not the ~x1.3 hoped for.
Its F16 GGUF passes the llama.cpp export check (top-1 agreement 100 % over 185 tokens).

Without a shared expert the split model is chaotic in its routing: 1e-3 relative noise on the
input embeddings leaves only 13 % of its top-1 tokens unchanged (the dense model: 100 %),
because a flipped top-2 choice swaps in disjoint neurons and the change cascades over 30 layers,
so llama.cpp's F32 GGUF of it agrees on the top-1 token only ~40 % of the time.

Why in the product, not a bench helper: it is architecture surgery (a new config family, weight
layouts), which lives in model/; the bench and the tests call the same function.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, text_config
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

MODES = ("split", "copy")
CLUSTER_TOKENS = 512
ROUTER_SPREAD = 0.1  # std of the fitted router logits: gates within a few % of uniform
SHARED_GATE_INIT = 1e-6  # std of the shared expert's gate weights: sigmoid within ~1e-3 of 0.5 (|x| < 1e3)
# Config keys a Llama-layout dense model and a Mixtral share, copied as they are.
_SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id",
                "pad_token_id")  # fmt: skip


def _check_dense(loaded: LoadedModel, experts: int, top_k: int, mode: str, shared: float = 0.0,
                 router_spread: float = ROUTER_SPREAD) -> None:
    spec = arch_for(loaded)
    config = text_config(loaded)
    if mode not in MODES:
        raise ConfigError(f"unknown upcycling mode {mode!r}; choose one of {', '.join(MODES)}")
    if spec.moe is not None or spec.encoder or spec.gate is None or spec.up is None or spec.fused_gate_up:
        raise ConfigError(f"{spec.family} cannot be upcycled; give a llama or mistral model (a plain gate/up/down MLP)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) or spec.q_norm:
        raise ConfigError(f"{spec.family} with biases or q/k norms has no Mixtral equivalent; give a plain llama model")
    if not 1 <= top_k <= experts or experts < 2:
        raise ConfigError(f"need 2 or more experts and 1 <= top_k <= experts, got {experts} experts, top-k {top_k}")
    if not 0 <= shared < 1:
        raise ConfigError(f"shared is the fraction of MLP neurons kept always on, in [0, 1); got {shared}")
    if not router_spread > 0:
        raise ConfigError(f"router_spread is the std of the router logits and must be positive; got {router_spread}")
    routed = config.intermediate_size - round(config.intermediate_size * shared)
    if mode == "split" and routed % experts:
        raise ConfigError(f"split needs the routed MLP width {routed} divisible by {experts} experts"
                          + (" (change shared)" if shared else ""))


def mixtral_config(dense_config, experts: int, top_k: int, width: int):
    """The Mixtral config of the upcycled model: the dense model's shapes, experts of `width`."""
    from transformers import MixtralConfig

    values = {key: getattr(dense_config, key) for key in _SHARED_KEYS if getattr(dense_config, key, None) is not None}
    return MixtralConfig(**values, intermediate_size=width, num_local_experts=experts, num_experts_per_tok=top_k,
                         router_aux_loss_coef=0.0, sliding_window=None)  # fmt: skip


def qwen2_moe_config(dense_config, experts: int, top_k: int, width: int, shared_width: int):
    """The Qwen2-MoE config of an upcycled model with a shared expert of `shared_width` neurons.
    No renormalisation of the top-k weights (llama.cpp's qwen2moe graph has none) and zero q/k/v
    biases (Qwen2's attention has them, llama's not)."""
    from transformers import Qwen2MoeConfig

    values = {key: getattr(dense_config, key) for key in _SHARED_KEYS if getattr(dense_config, key, None) is not None}
    return Qwen2MoeConfig(**values, intermediate_size=dense_config.intermediate_size, moe_intermediate_size=width,
                          shared_expert_intermediate_size=shared_width, num_experts=experts, num_experts_per_tok=top_k,
                          norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
                          use_sliding_window=False, router_aux_loss_coef=0.0)  # fmt: skip


def _mlp_inputs(loaded: LoadedModel, blocks: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Each layer's MLP input [T, H] over the calibration blocks (the dense model's own)."""
    spec = arch_for(loaded)
    captured: list[list[torch.Tensor]] = [[] for _ in decoder_layers(loaded)]
    hooks = [get_submodule(layer, spec.mlp).register_forward_hook(
        lambda module, args, output, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(decoder_layers(loaded))]  # fmt: skip
    try:
        with torch.no_grad():
            for batch in blocks.split(2):
                loaded.model(input_ids=batch.to(loaded.device))
                if sum(t.shape[0] for t in captured[0]) >= max_tokens:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts)[:max_tokens].cpu() for parts in captured]


def _dense_mlp(loaded: LoadedModel, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    spec = arch_for(loaded)
    gate, up, down = (get_submodule(layer, p).weight.detach().float().cpu() for p in (spec.gate, spec.up, spec.down))
    return gate, up, down, get_submodule(layer, spec.mlp).act_fn


def balanced_clusters(features: torch.Tensor, groups: int, iterations: int = 6, seed: int = 0) -> list[list[int]]:
    """Partition the rows of `features` [N, D] into `groups` equal groups of similar rows
    (k-means with a capacity: each round, rows are assigned greedily by similarity to the
    centroids, most similar pairs first, until every group holds N / groups rows)."""
    n = features.shape[0]
    size = n // groups
    rows = nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(n, generator=generator)[:groups]]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        similarity = rows @ centroids.t()  # [N, groups]
        order = similarity.flatten().argsort(descending=True).tolist()
        chosen: list[int] = [-1] * n
        load = [0] * groups
        for flat in order:  # plain Python lists: this loop runs N * groups times
            row, group = divmod(flat, groups)
            if chosen[row] < 0 and load[group] < size:
                chosen[row] = group
                load[group] += 1
        assignment = torch.tensor(chosen)
        members = nn.functional.one_hot(assignment, groups).float()  # [N, groups]
        centroids = nn.functional.normalize(members.t() @ rows, dim=1)
    return [sorted((assignment == g).nonzero().squeeze(1).tolist()) for g in range(groups)]


def _least_squares_router(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The router [E, H] whose logits x @ router.T best match `target` [T, E] (ridge-regularised)."""
    ridge = 1e-3 * x.pow(2).mean() * torch.eye(x.shape[1])
    return torch.linalg.solve(x.t() @ x + ridge * x.shape[0], x.t() @ target).t()


def balancing_offsets(logits: torch.Tensor, top_k: int, step: float, rounds: int = 200) -> torch.Tensor:
    """Per-expert offsets [E] that give every expert the same share of the tokens' top-k choices:
    each round moves an overloaded expert's offset down and an idle one's up, in proportion to its
    load error (DeepSeek-V3's auxiliary-loss-free balancing bias, fitted here on calibration tokens)."""
    experts = logits.shape[1]
    offset = torch.zeros(experts)
    for _ in range(rounds):
        chosen = (logits + offset).topk(top_k, dim=1).indices
        share = torch.bincount(chosen.flatten(), minlength=experts).float() / chosen.numel()
        offset -= step * (share * experts - 1)
    return offset


def _split_layer(gate, up, down, act, x: torch.Tensor | None, experts: int, seed: int, spread: float = ROUTER_SPREAD,
                 balance_top_k: int = 0):  # fmt: skip
    """(gate_up [E, 2w, H], down [E, H, w], router [E, H]) of one split layer; `spread`: the std of
    the fitted router logits over the calibration tokens; `balance_top_k`: refit the router so the
    top-k choices load every expert equally (0: as fitted)."""
    inter = gate.shape[0]
    if x is None:  # no calibration: contiguous neuron groups, a random router (scale: see upcycle)
        groups = [list(range(e * inter // experts, (e + 1) * inter // experts)) for e in range(experts)]
    else:
        sample = x[:CLUSTER_TOKENS]  # co-activation profiles: a few hundred tokens are enough to group neurons
        hidden = act(sample @ gate.t()) * (sample @ up.t())  # [T, I]
        groups = balanced_clusters(hidden.abs().t(), experts, seed=seed)
    gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
    down_e = torch.stack([down[:, g] for g in groups])
    if x is None:
        router = torch.randn(experts, gate.shape[1], generator=torch.Generator().manual_seed(seed)) * 0.02
        return gate_up, down_e, router
    outputs = [(act(x @ gate[g].t()) * (x @ up[g].t())) @ down[:, g].t() for g in groups]  # E x [T, H]
    target = torch.stack([torch.log(o.norm(dim=1) + 1e-6) for o in outputs], dim=1)  # [T, E]
    router = _least_squares_router(x, target - target.mean(1, keepdim=True))
    # Top-k choice is invariant to scaling the logits, the gate values are not: near-uniform gates
    # keep every chosen neuron at the dense weight (up to the fitted scale), as the dense MLP does.
    router = router * (spread / (x @ router.t()).std().clamp_min(1e-12))
    if balance_top_k:
        # The routers of Mixtral / Qwen2-MoE have no bias: the refit carries the offsets through
        # the inputs' mean (shares within ~1 % of equal on the calibration tokens of SmolLM2).
        logits = x @ router.t()
        router = _least_squares_router(x, logits + balancing_offsets(logits, balance_top_k, step=0.5 * spread))
    return gate_up, down_e, router


def _fit_scale(block: nn.Module, target: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | float = 0.0) -> float:
    """The scalar s minimising ||target - s * (block(x) - offset)|| over the calibration tokens
    (offset: the shared expert's part of the block output, which is not rescaled)."""
    with torch.no_grad():
        routed = block(x[None])[0].float() - offset
    return float((target * routed).sum() / routed.pow(2).sum().clamp_min(1e-12))


def _shared_neurons(gate, up, down, act, x: torch.Tensor | None, count: int) -> torch.Tensor:
    """The `count` neurons whose contribution to the MLP's output is largest: RMS of the neuron's
    activation over the calibration tokens times the norm of its down column (the weights' norms
    without calibration). RMS, not the mean, so the rare huge activations SmolLM2's attention sinks
    depend on (massive activations, Sun et al. 2024) stay in the always-on part."""
    if x is None:
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    else:
        score = (act(x @ gate.t()) * (x @ up.t())).pow(2).mean(0).sqrt() * down.norm(dim=0)
    return score.topk(count).indices.sort().values


def _uncalibrated_scale(experts: int, top_k: int, renormalized: bool) -> float:
    """With a near-zero random router every gate is 1/top_k (renormalised) or 1/experts, each
    expert holds 1/experts of the routed neurons and is chosen with probability top_k/experts:
    this scale makes the expected routed output the dense one."""
    gate = 1 / top_k if renormalized else 1 / experts
    return experts / (top_k * gate)


def _empty_moe(loaded: LoadedModel, experts: int, top_k: int, mode: str, shared: float):
    """The MoE model of the requested shape with the dense model's attention, norms and embeddings."""
    dense_config = text_config(loaded)
    inter = dense_config.intermediate_size
    if shared:
        from transformers import Qwen2MoeForCausalLM

        shared_width = round(inter * shared)
        config = qwen2_moe_config(dense_config, experts, top_k, (inter - shared_width) // experts, shared_width)
        model = Qwen2MoeForCausalLM(config)
    else:
        from transformers import MixtralForCausalLM

        config = mixtral_config(dense_config, experts, top_k, inter // experts if mode == "split" else inter)
        model = MixtralForCausalLM(config)
    model = model.to(torch.float32).eval()
    state = {k: v for k, v in loaded.model.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    biases = [name for name in missing if name.endswith("_proj.bias") and ".self_attn." in name]
    if unexpected or any(".mlp." not in name for name in missing if name not in biases):
        raise ConfigError(f"{arch_for(loaded).family} does not map onto {config.model_type} ({(unexpected or missing)[:3]})")
    with torch.no_grad():
        for name in biases:  # Qwen2-MoE's q/k/v biases (llama.cpp's qwen2moe requires them): zero, as llama has none
            model.get_parameter(name).zero_()
    return model


def _fill_layer(block: nn.Module, dense_mlp, x: torch.Tensor | None, *, experts: int, top_k: int, mode: str,
                shared: float, noise: float, seed: int, generator: torch.Generator,
                router_spread: float = ROUTER_SPREAD, balance: bool = False) -> None:  # fmt: skip
    """Write one dense MLP into one sparse block (see the module docstring for the modes)."""
    gate, up, down, act = dense_mlp
    offset: torch.Tensor | float = 0.0
    with torch.no_grad():
        if shared:
            always = _shared_neurons(gate, up, down, act, x, block.shared_expert.gate_proj.weight.shape[0])
            rest = torch.ones(gate.shape[0], dtype=torch.bool)
            rest[always] = False
            block.shared_expert.gate_proj.weight.copy_(gate[always])
            block.shared_expert.up_proj.weight.copy_(up[always])
            block.shared_expert.down_proj.weight.copy_(down[:, always] * 2)  # the sigmoid gate starts at 0.5
            # Gate logits near 0 (sigmoid 0.5) but never exactly 0: llama.cpp's qwen2moe graph takes
            # the sigmoid as silu(x) / x, which is NaN at x = 0 (an all-zero gate gave NaN logits).
            gate_row = torch.randn(block.shared_expert_gate.weight.shape, generator=generator)
            block.shared_expert_gate.weight.copy_(gate_row * SHARED_GATE_INIT)
            if x is not None:
                offset = (act(x @ gate[always].t()) * (x @ up[always].t())) @ down[:, always].t()
            gate, up, down = gate[rest], up[rest], down[:, rest]
        if mode == "split":
            gate_up, down_e, router = _split_layer(gate, up, down, act, x, experts, seed, router_spread,
                                                   top_k if balance else 0)  # fmt: skip
        else:
            def noisy(w: torch.Tensor) -> torch.Tensor:
                return w + torch.randn(w.shape, generator=generator) * noise * w.std()

            gate_up = torch.stack([noisy(torch.cat([gate, up])) for _ in range(experts)])
            down_e = torch.stack([noisy(down) for _ in range(experts)])
            router = torch.randn(experts, gate.shape[1], generator=generator) * 0.02
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(down_e)
        block.gate.weight.copy_(router)
        if mode == "split":
            if x is None:
                scale = _uncalibrated_scale(experts, top_k, renormalized=not shared)
            else:
                scale = _fit_scale(block, (act(x @ gate.t()) * (x @ up.t())) @ down.t(), x, offset)
            block.experts.down_proj.mul_(scale)


def upcycle(loaded: LoadedModel, *, experts: int = 8, top_k: int = 2, mode: str = "split",
            calibration: torch.Tensor | None = None, noise: float = 0.01, seed: int = 0,
            max_tokens: int = 4096, shared: float = 0.0, router_spread: float = ROUTER_SPREAD,
            balance: bool = False) -> LoadedModel:  # fmt: skip
    """A Mixtral-family MoE (Qwen2-MoE with `shared`) made from the dense `loaded` (module docstring).

    Args:
        calibration: token blocks [n, len] for split's neuron clustering, router and scale fits
            (None: contiguous neuron groups, a random router, the scale that makes the expected
            routed output the dense one).
        noise: copy mode: each expert's weights get Gaussian noise of this fraction of the weight's std.
        shared: fraction of the MLP's neurons (those contributing most) kept in an always-on shared
            expert; only the rest is split or copied into routed experts.
        router_spread: split with calibration: std of the fitted router logits (the default keeps the
            gates near uniform, the best start before distillation; larger values route more sharply).
        balance: split with calibration: refit the router so that every expert gets the same share
            of the calibration tokens' top-k choices, as a load-balancing loss trains a router to.
            It is fitted on the dense model's layer inputs; through the upcycled model's own, the
            coefficient of variation of SmolLM2's shares falls from 0.27-0.29 to 0.15-0.18.
    """
    _check_dense(loaded, experts, top_k, mode, shared, router_spread)
    dense_config = text_config(loaded)
    inputs = _mlp_inputs(loaded, calibration, max_tokens) if calibration is not None and mode == "split" else None
    model = _empty_moe(loaded, experts, top_k, mode, shared)
    generator = torch.Generator().manual_seed(seed)
    for index, (dense_layer, layer) in enumerate(zip(decoder_layers(loaded), model.model.layers, strict=True)):
        _fill_layer(layer.mlp, _dense_mlp(loaded, dense_layer), None if inputs is None else inputs[index],
                    experts=experts, top_k=top_k, mode=mode, shared=shared, noise=noise, seed=seed + index,
                    generator=generator, router_spread=router_spread, balance=balance)  # fmt: skip
    if dense_config.tie_word_embeddings:
        model.tie_weights()
    kind = f"{mode}, shared {shared:g}" if shared else mode
    logger.info("upcycled %s into %d experts (top-%d, %s)", loaded.name, experts, top_k, kind)
    suffix = f"-shared{round(shared * 100)}" if shared else ""
    return LoadedModel(model=model.to(loaded.device, loaded.compute_dtype), tokenizer=loaded.tokenizer,
                       name=f"{loaded.name}-moe{experts}x{top_k}-{mode}{suffix}")  # fmt: skip


def expert_similarity(loaded: LoadedModel, inputs: list[torch.Tensor]) -> list[float]:
    """Per MoE layer, the mean pairwise cosine similarity of its experts' outputs on the same
    tokens (each layer's block input [T, H]): 1.0 for identical experts, ~0 for unrelated ones.
    Output space, so it does not depend on how each expert orders its neurons."""
    from kompakt.model.moe import expert_forward, moe_spec, num_experts

    spec, n = moe_spec(loaded), num_experts(loaded)
    result = []
    for layer, x in zip(decoder_layers(loaded), inputs, strict=True):
        with torch.no_grad():
            outs = torch.stack([expert_forward(layer, spec, e, x.to(loaded.device)).float().flatten() for e in range(n)])
        unit = nn.functional.normalize(outs, dim=1)
        similarity = unit @ unit.t()
        result.append(float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))))
    return result


def block_inputs(loaded: LoadedModel, blocks: torch.Tensor, max_tokens: int = 2048) -> list[torch.Tensor]:
    """Each layer's MLP / MoE-block input [T, H] over the blocks (for expert_similarity)."""
    return _mlp_inputs(loaded, blocks, max_tokens)
