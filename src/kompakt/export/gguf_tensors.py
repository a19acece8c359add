"""Model tensors as GGUF tensors: llama.cpp names, layout conversions, per-tensor types, bytes.

Each tensor's type is chosen by kompakt.export.gguf_types (`--tensor-type` overrides, then the
model's per-tensor types, then `--type` with llama.cpp's own output-tensor and fallback rules),
so a kompakt Q4_0 and a llama.cpp Q4_0 of the same model have the same size and compare fairly;
1-D tensors (norms, biases) are F32, and so are an encoder's position and token-type tables
(kompakt.export.gguf_encoder.F32_TENSORS; llama.cpp does not quantize them either). An encoder
family's `skip` tensors (BERT's pooler) are left out; RoBERTa's position table loses its first
pad_token_id + 1 rows (transform "position_offset").

The bytes of a quantized tensor, best first:
- the exact bytes a quant pass handed over (LoadedModel.gguf_blocks, e.g. K-quant blocks GPTQ
  chose), while they still decode to exactly the current weights (q/k rows permuted like the
  weights); otherwise re-quantized, counted and noted;
- weights on a 32-block grid (the recorded quantization, see kompakt.export.gguf) written with
  their exact block parameters (gguf_grid_recover), never re-rounded;
- llama.cpp's reference quantizer (kompakt.ops.ggml_types.quantize; kompakt.ops.ggml_imatrix with the tensor's imatrix
  entry when the export was given one, `--imatrix`: llama-quantize --imatrix's bytes).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export.gguf_arch import GGUFFamily, head_dim
from kompakt.export.gguf_grid_recover import recover_blocks
from kompakt.export.gguf_types import TypeChooser, main_type, summarize
from kompakt.model.gguf_blocks import GgufBlocks
from kompakt.ops import ggml_imatrix, ggml_types
from kompakt.ops.gguf_grid import FORMATS, pack_blocks

log = logging.getLogger(__name__)

TYPES = ggml_types.NAMES


@dataclass
class TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # HF shape [out, in]
    type: str  # a kompakt.ops.ggml_types name
    grid: str | None = None  # the GGUF grid the weights already lie on (exact export)
    transform: str | None = None  # "permute_q" | "permute_k" | "norm_shift" | "position_offset"
    blocks: GgufBlocks | None = None  # exact bytes a quant pass handed over, in this type
    importance: np.ndarray | None = None  # its imatrix entry, [cols] ([experts, cols] for a stack)


@dataclass
class GGUFPlan:
    tensors: list[TensorPlan]
    notes: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)  # where the types came from (GGUF metadata)
    imatrix: dict[str, Any] = field(default_factory=dict)  # the quantize.imatrix.* keys, when one was used

    def data_bytes(self) -> int:
        """Bytes of the tensor data the file will hold (metadata aside): what a full-disk error
        names as needed."""
        return sum(ggml_types.ggml_type(item.type).tensor_bytes(item.shape) for item in self.tensors)

    def weights_by_type(self) -> dict[str, int]:
        """Number of weights in each type (all tensors)."""
        counts: Counter = Counter()
        for item in self.tensors:
            counts[item.type] += math.prod(item.shape)
        return dict(counts)

    def file_type(self) -> str:
        """The type holding most weights: what general.file_type names (llama.cpp's MOSTLY_*)."""
        return main_type(self.weights_by_type())

    def types_summary(self) -> str:
        """Each weight tensor's type in one line (kompakt.export.gguf_types.summarize)."""
        return summarize((item.gguf_name, item.type) for item in self.tensors if len(item.shape) > 1)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (convert_hf_to_gguf LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan_tensors(model: Any, config: Any, family: GGUFFamily, type: str, grid_modules: dict[str, str],
                 overrides: list | None = None, blocks: Mapping[str, GgufBlocks] | None = None) -> GGUFPlan:  # fmt: skip
    """Names, shapes and types of every tensor; raises before writing if any has no GGUF name, an
    override is wrong (kompakt.export.gguf_types) or a type cannot be written yet.

    `type`: the default (`--type`); `overrides`: `--tensor-type` (gguf_types.Override); the
    model's per-tensor types come from its compression state; `blocks`: LoadedModel.gguf_blocks.
    """
    import gguf

    from kompakt.export.gguf_encoder import F32_TENSORS
    from kompakt.export.gguf_moe import expand_experts, is_router
    from kompakt.model.compression import get_state
    from kompakt.model.quantized import dense_state_dict

    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    state = expand_experts(dense_state_dict(model))
    tied = _tied(model, state) and family.tied_output  # else llama.cpp needs the tied head written as output.weight
    recorded = get_state(model)
    plan = GGUFPlan([], source=_types_source(recorded, bool(overrides)))
    chooser = TypeChooser(type, list(overrides or []), recorded.per_tensor_types, plan.notes)
    has_output = "lm_head.weight" in state and not tied
    for hf_name, tensor in state.items():
        if (hf_name == "lm_head.weight" and tied) or hf_name.startswith(family.skip):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitectureError(
                f"tensor {hf_name} has no llama.cpp name for {family.arch.lower()}; "
                "this structure cannot be exported to GGUF"
            )
        shape = tuple(tensor.shape)
        module = hf_name.removesuffix(".weight")
        is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
        if len(shape) < 2 or gguf_name in F32_TENSORS or is_router(gguf_name):
            ttype = "f32"
        else:
            searched = (gguf_name, hf_name) + (("lm_head.weight",) if is_output and tied else ())
            ttype = chooser.choose(gguf_name, searched, module, int(shape[-1]), is_output)
        grid = grid_modules.get(module) if hf_name.endswith(".weight") else None
        carried = (blocks or {}).get(module) if hf_name.endswith(".weight") else None
        transform, shape = _transform(config, family, hf_name, gguf_name, shape)
        plan.tensors.append(TensorPlan(hf_name, gguf_name, shape, ttype, grid, transform,
                                       carried if carried is not None and carried.type == ttype else None))  # fmt: skip
    chooser.check_used()
    return plan


def _tied(model: Any, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the output head reads the embedding's tensor. A model opened lazily
    (kompakt.model.lazy) has its weights on the meta device, where every data_ptr is 0: there
    a tied head is the same Parameter as the embedding."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or embed is None:
        return False
    if head.is_meta or embed.is_meta:
        params = dict(model.named_parameters(remove_duplicate=False))
        return params.get("lm_head.weight") is params.get("model.embed_tokens.weight")
    return head.data_ptr() == embed.data_ptr()


def _transform(config: Any, family: GGUFFamily, hf_name: str, gguf_name: str,
               shape: tuple[int, ...]) -> tuple[str | None, tuple[int, ...]]:  # fmt: skip
    """(the layout conversion llama.cpp needs for this tensor or None, its shape in the file)."""
    from kompakt.export.gguf_encoder import position_offset

    if family.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        transform = "permute_q" if gguf_name.endswith("attn_q.weight") else "permute_k"
        _check_permutable(config, shape, transform)
        return transform, shape
    if family.norm_shift and hf_name.endswith("norm.weight"):
        return "norm_shift", shape
    if gguf_name == "position_embd.weight" and position_offset(config, family):
        return "position_offset", (shape[0] - position_offset(config, family), *shape[1:])
    return None, shape


def _types_source(state: Any, overridden: bool) -> dict[str, str]:
    """{"source", "calibration"} for the GGUF metadata: the model's record of its per-tensor
    types ("recipe", "allocation: ...") and "--tensor-type" when overrides were given."""
    recorded = state.types_source if state.per_tensor_types else {}
    sources = [recorded.get("source", "")] + (["--tensor-type"] if overridden else [])
    source = " + ".join(s for s in sources if s) or "--type"
    return {k: v for k, v in {"source": source, "calibration": recorded.get("calibration", "")}.items() if v}


def _check_permutable(config: Any, shape: tuple[int, ...], transform: str) -> None:
    heads = config.num_attention_heads if transform == "permute_q" else config.num_key_value_heads
    if shape[0] != heads * head_dim(config) or head_dim(config) % 2:
        raise UnsupportedArchitectureError(
            f"q/k projection with {shape[0]} rows does not match {heads} heads of {head_dim(config)}; "
            "config.json and weights disagree"
        )


def tensor_data(plan: TensorPlan, tensor: torch.Tensor, config: Any, family: GGUFFamily) -> tuple[np.ndarray, Any, int]:
    """(array, raw ggml type or None, blocks re-quantized) of one tensor, ready for GGUFWriter.

    Blocks re-quantized: of a tensor on a grid (or with carried bytes), those that were not
    exactly on it (carried bytes that no longer decode to the weights count every block).
    """
    w = tensor.detach().to("cpu", torch.float32)
    if plan.transform in ("permute_q", "permute_k"):
        heads = config.num_attention_heads if plan.transform == "permute_q" else config.num_key_value_heads
        w = _permute(w, heads)
    elif plan.transform == "norm_shift":
        w = w + family.norm_shift
    elif plan.transform == "position_offset":  # RoBERTa's position i is row pad_token_id + 1 + i
        from kompakt.export.gguf_encoder import position_offset

        w = w[position_offset(config, family) :]
    if w.ndim == 3 and plan.type not in ("f32", "f16") and _per_expert_importance(plan):
        return _experts_one_by_one(plan, w, config, family)
    if w.ndim == 3 and plan.type not in ("f32", "f16"):  # MoE expert stacks: rows of all experts at once
        flat = TensorPlan(**{**plan.__dict__, "shape": (plan.shape[0] * plan.shape[1], plan.shape[2]),
                             "importance": None})  # per expert: only rounded from the weights (above)
        data, qtype, missed = tensor_data(flat, w.reshape(-1, w.shape[-1]), config, family)
        return data.reshape(*plan.shape[:2], *data.shape[1:]), qtype, missed
    if plan.type == "f32":
        return w.numpy(), None, 0
    if plan.type == "f16":
        return w.to(torch.float16).numpy(), None, 0
    qtype = ggml_types.gguf_enum(plan.type)
    if plan.type == "bf16":
        return quantize_rows(w.numpy(), "bf16"), qtype, 0
    if plan.blocks is not None:
        data = plan.blocks.data
        if plan.transform in ("permute_q", "permute_k"):  # whole rows move: a row's bytes move with it
            data = _permute(torch.from_numpy(np.ascontiguousarray(data)), heads).numpy()
        if GgufBlocks(plan.type, data).matches(w.numpy()):
            return np.ascontiguousarray(data), qtype, 0
        t = ggml_types.ggml_type(plan.type)
        missed = t.tensor_bytes(tuple(w.shape)) // t.block_bytes
        return ggml_imatrix.quantize(w.numpy(), plan.type, plan.importance), qtype, missed
    if plan.grid == plan.type and plan.type in FORMATS:
        # Permuting rows keeps every 32-column block intact, so exact recovery still applies.
        q, d, m, missed = recover_blocks(w, plan.type)
        return pack_blocks(q, d, m, plan.type), qtype, missed
    return quantize_rows(w.numpy(), plan.type, plan.importance), qtype, 0


def _per_expert_importance(plan: TensorPlan) -> bool:
    """An expert stack quantized from its weights with one imatrix row per expert."""
    return plan.importance is not None and plan.importance.ndim == 2 and plan.blocks is None and plan.grid != plan.type


def _experts_one_by_one(plan: TensorPlan, w: torch.Tensor, config, family: GGUFFamily) -> tuple[np.ndarray, Any, int]:
    """An expert stack [experts, rows, cols] quantized expert by expert, each with its own
    imatrix row (llama-quantize's per-expert slices of the entry)."""
    parts = [tensor_data(TensorPlan(plan.hf_name, plan.gguf_name, tuple(plan.shape[1:]), plan.type,
                                    importance=plan.importance[expert]), w[expert], config, family)
             for expert in range(w.shape[0])]  # fmt: skip
    return np.stack([data for data, _, _ in parts]), parts[0][1], 0


QUANT_CHUNK = 1 << 22  # values quantized at a time (16 MB of fp32)


def quantize_rows(w: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_types.quantize of a [rows, cols] array (with its imatrix entry `importance` [cols]
    when given), QUANT_CHUNK values' worth of rows at a time.

    Every llama.cpp type quantizes each row on its own, so the bytes are those of one call; the
    numpy quantizer's fp32 temporaries stay at a chunk instead of several copies of the tensor
    (the embedding of a 7B model is 0.5 GB in fp32), which is what bounds the streaming export.
    llama.cpp's own quantizer (kompakt.ops.ggml_native) writes into the output with no
    temporaries, so it takes the tensor whole."""
    from kompakt.ops import ggml_native

    rows = max(1, QUANT_CHUNK // max(1, w.shape[1]))
    if w.shape[0] <= rows or ggml_native.available():  # C writes in place: no temporaries
        return ggml_imatrix.quantize(w, name, importance)
    first = ggml_imatrix.quantize(w[:rows], name, importance)
    out = np.empty((w.shape[0], first.shape[1]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, w.shape[0], rows):
        out[start : start + rows] = ggml_imatrix.quantize(w[start : start + rows], name, importance)
    return out
