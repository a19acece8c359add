"""Per-channel sums of squared inputs of every decoder Linear: what llama.cpp calls an importance matrix.

llama-imatrix (tools/imatrix/imatrix.cpp) adds, for every matrix multiplication whose weight is a
`blk.*` tensor, Σ x_j² over the rows of its input (one row per token, batches of ≥ 16 tokens)
and counts those rows. The weight's input in llama.cpp's graph is exactly what the matching
transformers Linear receives (q/k/v: the normalised hidden state; o: the attention output;
gate/up: the normalised hidden state; down: act(gate)·up), so pre-hooks on the decoder Linears
during one plain forward pass over the calibration blocks give the same statistics. The output
projection is left out, as llama-imatrix leaves it out unless asked (--process-output).

The statistics are `LinearStats` (kompakt.calib.stats), so `sq_sum` / `n_samples` are what
the GGUF imatrix file stores as `<tensor>.in_sum2` / `<tensor>.counts`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kompakt.calib.stats import LinearStats
from kompakt.model.arch import arch_for, decoder_layers, linear_modules


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name (as in model.named_modules()) -> Linear, for every Linear of every decoder layer."""
    spec = arch_for(model)
    names = {id(module): name for name, module in model.named_modules()}
    return {
        names[id(linear)]: linear
        for layer in decoder_layers(model)
        for linear in linear_modules(layer, spec).values()
    }


@torch.inference_mode()
def collect_input_sums(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> dict[str, LinearStats]:
    """Σ x² per input channel and the token count of every decoder Linear's inputs over `blocks`.

    Args:
        model: a transformers causal LM of a family in the arch table (not changed).
        blocks: token ids [n_blocks, block_len]; each row is one sequence (as one llama-imatrix chunk).
        batch_size: blocks per forward pass.
        advance: called with the number of blocks after each batch (a progress bar).

    Returns:
        module name -> LinearStats with `sq_sum` [in] and `n_samples` (tokens) filled.
    """
    linears = decoder_linears(model)
    stats = {name: LinearStats.create(name, linear, frozenset()) for name, linear in linears.items()}
    handles = [
        linear.register_forward_pre_hook(lambda module, args, name=name: stats[name].add(args[0]))
        for name, linear in linears.items()
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, blocks.shape[0], batch_size):
            chunk = blocks[start : start + batch_size].to(device)
            # Only the Linears' inputs are read: logits of one position, not [batch, len, vocab].
            model(input_ids=chunk, use_cache=False, logits_to_keep=1)
            if advance is not None:
                advance(chunk.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats
