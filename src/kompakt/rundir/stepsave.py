"""How the runner saves a step's model: packed when the quant pass reported packed layers.

A quant pass (quant.rtn / quant.gptq on an integer grid) reports them (PassReport.packed_layers);
the step is then written in the compressed-tensors format (kompakt.model.quantized), so a 4-bit
step takes about a quarter of its fp16 bytes in the quantized Linears. Everything else is saved
as a plain Hugging Face directory. Either way `kompakt.load` reads the step back as a dense
model (a compressed one with `config.quantization_config` naming its grid), so the next step,
`kompakt export` and evaluation work from the directory.

The exact GGUF bytes a pass carried on the model (`LoadedModel.gguf_blocks`, e.g. K-quant
blocks GPTQ chose) are saved beside the weights (kompakt.model.gguf_blocks) and read back by load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kompakt.model.compression import PackedLayer
from kompakt.model.loaded import LoadedModel

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def save_step_model(
    loaded: LoadedModel, directory: Path, input_dtype: torch.dtype, packed: Mapping[str, PackedLayer]
) -> dict[str, Any]:
    """Save `loaded` to `directory`, packed when the step's report has `packed` layers; returns
    what to add to the step's details.

    Packed: integer codes with fp16 scales; the weights that were not quantized (embeddings,
    norms, lm_head) in 16 bits: the step's input dtype when it was fp16 / bf16, else fp16 (a
    fp32 copy of them would be larger than all the 4-bit layers together), or bf16 for a family
    whose activations overflow fp16 (the arch table's `fp16_overflows`: Gemma), since plain
    transformers computes in the stored dtype.
    """
    from kompakt.model.gguf_blocks import save_blocks
    from kompakt.model.quantized import save_quantized
    from kompakt.model.save import save_model

    from kompakt.model.arch import arch_for

    if not packed or not arch_for(loaded).stores_packed:  # stored dense: see ArchSpec.stores_packed
        save_model(loaded, directory)
        save_blocks(loaded.gguf_blocks, directory)
        return {"gguf_blocks": len(loaded.gguf_blocks)} if loaded.gguf_blocks else {}

    dense = input_dtype if input_dtype in SIXTEEN_BIT else torch.float16
    if dense == torch.float16 and arch_for(loaded).fp16_overflows:
        dense = torch.bfloat16
    saved = save_quantized(loaded, directory, packed, dense_dtype=dense)
    save_blocks(loaded.gguf_blocks, directory)
    stored: dict[str, Any] = {
        "stored_as": "compressed-tensors",
        "packed_layers": saved.layers,
        "dense_dtype": str(dense).removeprefix("torch."),
        "bytes_safetensors": saved.size_bytes,
    }
    if saved.regrouped:
        stored["regrouped"] = saved.regrouped
    if loaded.gguf_blocks:
        stored["gguf_blocks"] = len(loaded.gguf_blocks)
    return stored
