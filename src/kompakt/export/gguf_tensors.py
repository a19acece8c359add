"""Model tensors as GGUF tensors: llama.cpp names, layout conversions, per-tensor types, bytes.

Tensor types follow what llama.cpp's `llama_model_quantize` chooses for the same file type
(llama-quant.cpp, no imatrix, not --pure), so a kompakt Q4_0 and a llama.cpp Q4_0 of the same
model have the same size and compare fairly:

- 1-D tensors (norms, biases): F32.
- the output projection (output.weight, or token_embd when the embeddings are tied):
  Q8_0 for every quantized type when its rows are not a multiple of 256 (SmolLM2 576,
  Gemma 3 640); llama.cpp would pick Q6_K otherwise, which gguf-py cannot write: kompakt keeps
  Q8_0 there and says so.
- every other 2-D weight: the requested type; rows not a multiple of 32 -> F16 (llama.cpp's
  own fallback for 32-block types), reported per tensor.

Weights on a GGUF grid (the recorded quantization, see kompakt.export.gguf) are written
with their exact block parameters (gguf_grid_recover), never re-rounded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export.gguf_arch import GGUFFamily, head_dim
from kompakt.export.gguf_grid_recover import recover_blocks
from kompakt.ops.gguf_grid import BLOCK, FORMATS, pack_blocks, quantize_blocks

log = logging.getLogger(__name__)

FLOAT_TYPES = ("f32", "f16", "bf16")
TYPES = FLOAT_TYPES + FORMATS
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
              "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
              "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "iq4_nl": "MOSTLY_IQ4_NL"}  # fmt: skip
_OUTPUT_BLOCK = 256  # Q6_K super-block: llama.cpp uses Q8_0 for the output when rows don't divide


@dataclass
class TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # HF shape [out, in]
    type: str  # f32 | f16 | bf16 | q8_0 | q4_0 | q4_1
    grid: str | None = None  # the GGUF grid the weights already lie on (exact export)
    transform: str | None = None  # "permute_q" | "permute_k" | "norm_shift"


@dataclass
class GGUFPlan:
    tensors: list[TensorPlan]
    notes: list[str] = field(default_factory=list)

    def data_bytes(self) -> int:
        """Bytes of the tensor data the file will hold (metadata aside): what a full-disk error
        names as needed."""
        import gguf

        total = 0
        for item in self.tensors:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[item.type.upper()]]
            total += math.prod(item.shape) // block * size
        return total


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (convert_hf_to_gguf LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(plan_type: str, name: str, shape: tuple[int, ...], is_output: bool, notes: list[str]) -> str:
    if len(shape) < 2:
        return "f32"
    if plan_type in FLOAT_TYPES:
        return plan_type
    cols = shape[-1]
    if is_output:
        if plan_type != "q8_0" and cols % _OUTPUT_BLOCK == 0:
            notes.append(f"{name}: Q8_0 (llama.cpp's quantizer would use Q6_K, which kompakt cannot write)")
        return "q8_0" if cols % BLOCK == 0 else "f16"
    if cols % BLOCK:
        notes.append(f"{name}: F16 (rows of {cols} are not a multiple of {BLOCK}, as llama.cpp falls back)")
        return "f16"
    return plan_type


def plan_tensors(model: Any, config: Any, family: GGUFFamily, type: str, grid_modules: dict[str, str]) -> GGUFPlan:
    """Names, shapes and types of every tensor; raises before writing if any has no GGUF name."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    from kompakt.model.quantized import dense_state_dict

    state = dense_state_dict(model)
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state.get(
        "model.embed_tokens.weight", torch.empty(0)
    ).data_ptr()
    plan = GGUFPlan([])
    has_output = "lm_head.weight" in state and not tied
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitectureError(
                f"tensor {hf_name} has no llama.cpp name for {family.arch.lower()}; "
                "this structure cannot be exported to GGUF"
            )
        shape = tuple(tensor.shape)
        is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
        ttype = _tensor_type(type, gguf_name, shape, is_output, plan.notes)
        module = hf_name.removesuffix(".weight")
        grid = grid_modules.get(module) if hf_name.endswith(".weight") else None
        transform = None
        if family.permute_qk and gguf_name.endswith("attn_q.weight"):
            transform = "permute_q"
        elif family.permute_qk and gguf_name.endswith("attn_k.weight"):
            transform = "permute_k"
        elif family.norm_shift and hf_name.endswith("norm.weight"):
            transform = "norm_shift"
        if transform == "permute_q" or transform == "permute_k":
            _check_permutable(config, shape, transform)
        plan.tensors.append(TensorPlan(hf_name, gguf_name, shape, ttype, grid, transform))
    return plan


def _check_permutable(config: Any, shape: tuple[int, ...], transform: str) -> None:
    heads = config.num_attention_heads if transform == "permute_q" else config.num_key_value_heads
    if shape[0] != heads * head_dim(config) or head_dim(config) % 2:
        raise UnsupportedArchitectureError(
            f"q/k projection with {shape[0]} rows does not match {heads} heads of {head_dim(config)}; "
            "config.json and weights disagree"
        )


def tensor_data(plan: TensorPlan, tensor: torch.Tensor, config: Any, family: GGUFFamily) -> tuple[np.ndarray, Any, int]:
    """(array, raw ggml type or None, blocks re-quantized) of one tensor, ready for GGUFWriter."""
    import gguf

    w = tensor.detach().to("cpu", torch.float32)
    if plan.transform == "permute_q":
        w = _permute(w, config.num_attention_heads)
    elif plan.transform == "permute_k":
        w = _permute(w, config.num_key_value_heads)
    elif plan.transform == "norm_shift":
        w = w + family.norm_shift
    if plan.type == "f32":
        return w.numpy(), None, 0
    if plan.type == "f16":
        return w.to(torch.float16).numpy(), None, 0
    if plan.type == "bf16":
        return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16, 0
    qtype = gguf.GGMLQuantizationType[plan.type.upper()]
    missed = 0
    if plan.grid == plan.type:
        # Permuting rows keeps every 32-column block intact, so exact recovery still applies.
        q, d, m, missed = recover_blocks(w, plan.type)
    else:
        q, d, m = quantize_blocks(w, plan.type)
    return pack_blocks(q, d, m, plan.type), qtype, missed
