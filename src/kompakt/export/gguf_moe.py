"""Mixture-of-Experts models in llama.cpp's expert layout (as its convert_hf_to_gguf.py writes them).

transformers 5 keeps a layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (rows
[gate | up]) and `mlp.experts.down_proj` [E, H, I]; the router is `mlp.gate` [E, H]. llama.cpp
wants three 3-D tensors per layer, `ffn_gate_exps` / `ffn_up_exps` [E, I, H] and `ffn_down_exps`
[E, H, I] (GGUF lists dimensions reversed), the router as `ffn_gate_inp`, Qwen2-MoE's shared
expert as `ffn_{gate,up,down}_shexp` with its sigmoid gate `ffn_gate_inp_shexp`, and the
`expert_count` / `expert_used_count` (+ `expert_feed_forward_length`) header keys.
`expand_experts` splits the fused stacks under the names gguf-py's tensor map knows
("model.layers.N.mlp.experts.gate_proj.weight"), so planning and writing stay name-driven.

llama.cpp's MoE graphs hard-code whether the top-k routing weights are renormalised to sum 1
(llama / Mixtral and Qwen3-MoE: yes; Qwen2-MoE and OLMoE: no; GGUFFamily.moe_norm); a model whose
config says otherwise (`norm_topk_prob`; Mixtral always renormalises) would compute differently
there, so it is refused in one line before anything is written, as are the layouts llama.cpp
has no tensors for (Qwen-MoE layers with a dense MLP, OLMoE's clip_qkv).

Routers stay F32, as llama.cpp's converter and llama-quantize keep every `ffn_gate_inp`.
"""

from __future__ import annotations

from typing import Any

import torch

from kompakt.errors import UnsupportedArchitectureError

_GATE_UP = "mlp.experts.gate_up_proj"
_DOWN = "mlp.experts.down_proj"


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def expert_count(config: Any) -> int:
    """Experts per MoE layer (0 for a dense model); the keys are kompakt.model.arch's MoESpec."""
    from kompakt.model.arch import ARCHITECTURES
    from kompakt.model.moe import num_experts

    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    return num_experts(config) if spec is not None and spec.moe is not None else 0


def check_moe(config: Any, family: Any) -> None:
    """Refuse, in one line and before writing, an MoE that llama.cpp would compute differently."""
    n_experts = expert_count(config)
    if not n_experts:
        return
    name = family.model_type
    if family.moe_norm is None:
        raise UnsupportedArchitectureError(
            f"{name} with {n_experts} experts: llama.cpp's {family.arch.lower()} architecture has no experts; "
            "export it with --format hf instead"
        )
    from kompakt.model.moe import renormalizes, sparse_layer_problem

    if renormalizes(config) != family.moe_norm:
        said = "renormalises" if renormalizes(config) else "does not renormalise"
        raise UnsupportedArchitectureError(
            f"{name} {said} its top-k routing weights (norm_topk_prob) but llama.cpp's {family.arch.lower()} "
            f"graph {'always' if family.moe_norm else 'never'} does, so the GGUF would compute differently; "
            "export with --format hf"
        )
    problem = sparse_layer_problem(config)
    if problem:
        raise UnsupportedArchitectureError(
            f"{name} with dense-MLP layers among the MoE layers ({problem}) has no llama.cpp layout; "
            "export with --format hf"
        )
    if _get(config, "clip_qkv", None) is not None:
        raise UnsupportedArchitectureError(
            f"{name} with clip_qkv {config.clip_qkv}: llama.cpp's graph does not clip q/k/v; export with --format hf"
        )


def add_moe_hyperparameters(writer: Any, config: Any) -> None:
    """expert_count, expert_used_count and the expert widths llama.cpp reads (no-op when dense)."""
    n_experts = expert_count(config)
    if not n_experts:
        return
    writer.add_expert_count(n_experts)
    from kompakt.model.moe import top_k

    writer.add_expert_used_count(top_k(config))
    if _get(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    if _get(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))


def is_router(gguf_name: str) -> bool:
    """Routers (and Qwen2-MoE's shared-expert gate) stay F32, as llama.cpp keeps them."""
    return gguf_name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))


def expand_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every fused expert stack split into llama.cpp's three per-layer tensors
    (views, no copies), in the state's order; other tensors unchanged."""
    result: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(_GATE_UP):
            prefix = name[: -len("gate_up_proj")]
            inter = tensor.shape[1] // 2
            result[f"{prefix}gate_proj.weight"] = tensor[:, :inter]
            result[f"{prefix}up_proj.weight"] = tensor[:, inter:]
        elif name.endswith(_DOWN):
            result[f"{name[: -len('down_proj')]}down_proj.weight"] = tensor
        else:
            result[name] = tensor
    return result
