"""Predicted GPU memory, RAM and time of a streamed step whose layers are onloaded to a GPU.

    step = estimate_gpu_step("quant.gptq", shapes, tokens=16 * 512, hessians=True)
    step.line()  # 'quant.gptq (streamed on the GPU): peak ≈ 2.6 GB (...); GPU ≈ 2.3 GB (...), ≈ 2.6 min'

With `--device cuda` (kompakt.calib.sequential) the GPU holds, at a layer's peak:

- weights: the layer in the compute dtype (bf16);
- activations: its inputs and outputs for every calibration token (never spilled on a GPU);
- caches: the layer caches (kompakt.calib.layer_cache): the attention's q, k, v, o and the MLP's
  gate, up and their product for every token, so a group's statistics run does not recompute them;
- hessians: the largest group's solve (fp32 Hessian, rows and codes, as on the CPU) and the codes
  of the layer's solved Linears before they move to the CPU.

RAM then holds the process with the CUDA libraries, the layer as read from disk before it moves,
the codes waiting to be written and the output buffer.

Fitted on one run (bench/results/stream_big-llama2-7b-cuda-h200.json: Llama 2 7B shape, 32
layers, 16 x 512 tokens, 1 x H200): GPU 2.79 GB allocated and 2.61 GB RSS measured; GPTQ's time
there is its column loop (small kernels, launch-bound: 211 us per input column per layer, 4.9 s a
layer), not arithmetic, so it is predicted per column. Other passes' GPU time is not predicted.
"""

from __future__ import annotations

import torch

from kompakt.calib.memory_plan import PROCESS_BYTES, ModelShapes, StepEstimate, solve_bytes

# RSS the CUDA runtime and its libraries (cuBLAS, cuDNN, the context) add to a kompakt process:
# the H200 run's 2.61 GB peak less what the CPU side of its step holds (1.17 GB).
CUDA_RUNTIME_BYTES = 1_400 * 10**6
# GPTQ / SparseGPT on a GPU: seconds per input column of a layer's groups (the H200 run: 157.4 s
# calibrating 32 layers of 23 296 columns each).
GPU_COLUMN_SECONDS = 211e-6


def estimate_gpu_step(step: str, shapes: ModelShapes, *, tokens: int, hessians: bool,
                      compute: torch.dtype = torch.bfloat16, stored: torch.dtype = torch.bfloat16) -> StepEstimate:  # fmt: skip
    """The estimate of one streamed step onloaded to a GPU (module docstring); `tokens`: the
    calibration tokens (0 for a step without calibration)."""
    from kompakt.model.stream_save import FLUSH_BYTES

    item = compute.itemsize
    codes = shapes.layer_params if hessians and tokens else 0  # int8, one per weight of the layer
    gpu = {
        "weights": shapes.layer_params * item,
        "activations": 2 * tokens * shapes.hidden * item,
        "caches": tokens * (4 * shapes.hidden + 3 * shapes.intermediate) * item,
        "hessians": solve_bytes(shapes) + codes if hessians and tokens else 0,
    }
    ram = {
        "weights": shapes.layer_params * stored.itemsize,  # read on the CPU, then moved
        "output": codes + FLUSH_BYTES,
        "process": PROCESS_BYTES + CUDA_RUNTIME_BYTES,
    }
    columns = sum(width for width, _ in shapes.linear_groups())
    seconds = shapes.n_layers * columns * GPU_COLUMN_SECONDS if hessians and tokens else None
    return StepEstimate(step, "streamed on the GPU", ram, seconds, gpu_parts=gpu)
