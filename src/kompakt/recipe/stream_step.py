"""Run one recipe step on a model larger than the memory budget: streamed, one layer at a time.

    need = in_memory_bytes(lazy, data)              # fp32 model + calibration working memory
    if streams(need, max_memory): streamed_step(...)   # else the ordinary in-memory step

The step's input is opened lazily (kompakt.model.lazy): config, tokenizer and safetensors
headers, no weight. The pass gets the meta skeleton as `ctx.loaded` and a LayerStream
(kompakt.model.stream_save) as `ctx.stream`; a pass that declares `PassSpec.streams` (quant.rtn,
quant.gptq, quant.awq, prune.sparse) materialises each decoder layer, changes it, writes it and
releases it (kompakt.passes.streaming); the stream then writes the rest (embeddings, final norm,
head) and the config, and renames the finished directory into place. The weights are those of
the in-memory step bit for bit (tests/recipe/test_stream_step.py).

Any other pass needs the whole model at once (training: distill.kd, finetune.lora, quant.qat;
structural edits) and is refused before any work, in one line naming the ways out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.model.compression import get_state
from kompakt.model.lazy import LazyModel
from kompakt.model.loaded import LoadedModel
from kompakt.model.stream_save import SHARD_BYTES, LayerStream
from kompakt.passes.base import PassContext, PassReport, PassSpec

logger = logging.getLogger(__name__)

# Working memory of an in-memory calibration step beyond the weights: a layer's inputs, outputs
# and caches (about 8 hidden-size tensors per calibration token, kompakt.calib.sequential) plus
# the process itself (torch, transformers: about 0.5 GB).
ACTIVATION_COPIES = 8
PROCESS_BYTES = 500 * 10**6


def in_memory_bytes(lazy: LazyModel, calibration_tokens: int = 0) -> int:
    """What an in-memory step needs: the model in fp32 (the widest dtype kompakt.load computes in
    on a CPU: a bf16 checkpoint on a CPU with native bf16 needs half), the calibration activations
    of one layer and the process."""
    hidden = int(getattr(lazy.config.get_text_config(), "hidden_size", 0))
    return lazy.bytes_in(torch.float32) + ACTIVATION_COPIES * calibration_tokens * hidden * 4 + PROCESS_BYTES


def must_stream(lazy: LazyModel, max_memory: int | None, calibration_tokens: int = 0) -> bool:
    """Whether a step on `lazy` has to run streamed under the budget `max_memory` (None: never)."""
    return max_memory is not None and in_memory_bytes(lazy, calibration_tokens) > max_memory


def must_spill(lazy: LazyModel, max_memory: int | None, calibration_tokens: int) -> bool:
    """Whether a streamed step must keep the calibration activations on disk: one layer in fp32
    (three times: its weights and a solver's working copies), the activations between layers and
    the process do not fit in `max_memory` together."""
    if max_memory is None:
        return False
    hidden = int(getattr(lazy.config.get_text_config(), "hidden_size", 0))
    layer = max((lazy.layer_bytes(i, torch.float32) for i in range(lazy.n_layers)), default=0)
    return 3 * layer + ACTIVATION_COPIES * calibration_tokens * hidden * 4 + PROCESS_BYTES > max_memory


def refuse_unstreamable(spec: PassSpec, lazy: LazyModel, max_memory: int) -> None:
    """ConfigError for a pass that needs the whole model when the model exceeds the budget."""
    if spec.streams:
        return
    need = lazy.bytes_in(torch.float32) / 1e9
    raise ConfigError(
        f"{spec.name} needs the whole model in memory ({need:.1f} GB in fp32) but --max-memory is "
        f"{max_memory / 1e9:.1f} GB; run it where the model fits: a larger --max-memory, or GPUs with FSDP "
        "via `accelerate launch`"
    )


def streamed_step(spec: PassSpec, config: Any, lazy: LazyModel, directory: Path,
                  context: Callable[[LoadedModel, LayerStream], PassContext],
                  shard_bytes: int = SHARD_BYTES, spill_dir: Path | None = None,
                  resume_dir: Path | None = None, key: str = "") -> PassReport:  # fmt: skip
    """Apply `spec` to `lazy` streamed and write the result to `directory` (atomically).

    `context(loaded, stream)` builds the pass's PassContext (the runner's calibration, seed,
    work dir) around the skeleton and the stream. `spill_dir`: keep the calibration activations
    there instead of RAM (kompakt.calib.spill). `resume_dir`: keep the finished layers and their
    outputs there, so a run of the same step (`key`) killed mid-way resumes after its last
    finished layer (kompakt.model.stream_resume; the activations are then spilled there).
    Returns the pass's report (its `packed_layers` were written; the model in it is the
    skeleton, not to be used for weights).
    """
    from kompakt.model.stream_resume import LayerResume

    resume = LayerResume(Path(resume_dir)) if resume_dir is not None else None
    lazy.spill_dir = resume.activations if resume is not None and spill_dir is not None else spill_dir
    loaded = lazy.loaded()
    stream = LayerStream(lazy, directory, loaded.storage_dtype, shard_bytes=shard_bytes, resume=resume, key=key)
    lazy.resume = resume
    try:
        report = spec.apply(context(loaded, stream), config)
        quantization = get_state(report.loaded).quantization
        exact = set(quantization.modules if quantization else ()) - set(report.packed_layers)
        stream.finish(report.loaded, report.packed_layers, exact)
    except BaseException:
        stream.abort()
        raise
    finally:
        lazy.resume = None
    if lazy.live_numel:
        logger.debug("%d parameters still materialised after the streamed step", lazy.live_numel)
    return report
