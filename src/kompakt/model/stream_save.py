"""Write a model directory layer by layer while a streamed pass runs (never the whole model in memory).

The streamed twin of `kompakt.rundir.stepsave.save_step_model` (what the runner writes after an
in-memory step) for a model opened with `kompakt.model.lazy`:

    stream = LayerStream(lazy, target_dir, input_dtype)
    ... pass: for each decoder layer: materialise, change, then
    stream.write_layer(index, layer, packed={name: PackedLayer}, exact={names on a grid, unpacked})
    ... (the layer is released: back on meta)
    stream.finish(loaded, packed_rest)          # embeddings, norms, head, anything else; config, index

Tensors go into safetensors shards of at most `shard_bytes` (`model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json`, as transformers' sharded save), written into a temporary
directory beside the target and renamed into place at `finish` (kompakt.atomic), so nothing
half-written is ever at the target. The stored values and dtypes are those of the in-memory
save, tensor for tensor:

- a step with packed layers (a quant pass on an integer grid, or q4_0 / q8_0) is stored as
  compressed-tensors: packed Linears as `weight_packed` / `weight_scale` / `weight_shape`
  (kompakt.model.quantized), weights a pass put on a grid without packing in the storage dtype
  (fp32), everything else in 16 bits (the input's 16-bit dtype, else fp16, bf16 for families
  whose activations overflow fp16);
- any other step stores every weight in `loaded.storage_dtype`.

Shards are written at a layer's end once FLUSH_BYTES are pending (a 7B layer packed at 4 bits is
0.1 GB: the buffer never holds many). Given a `resume` (kompakt.model.stream_resume), every layer's
shard is written at its end into the resume directory with the stream's progress, so a killed
step resumes after its last finished layer; `finish` moves the shards into place.

Tensors use the model's own parameter names (transformers reads them as they are); a tied output
head is not stored (the config ties it). The exact GGUF bytes a pass kept
(`LoadedModel.gguf_blocks`) are written beside the weights at `finish`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from kompakt.atomic import atomic_directory
from kompakt.errors import OutputPathError
from kompakt.model.arch import arch_for
from kompakt.model.compression import PackedLayer
from kompakt.model.lazy import LazyModel
from kompakt.model.loaded import LoadedModel
from kompakt.model.shard_writer import SHARD_BYTES, ShardWriter, checkpoint_names
from kompakt.model.stream_resume import LayerResume

logger = logging.getLogger(__name__)

# A finished layer's tensors wait in RAM only until this much is pending: at a layer's end the shard
# is written once it holds this many bytes, so the buffer is at most about one layer (a 7B layer
# packed at 4 bits is 0.1 GB; waiting for a 2 GB shard would hold 20 of them), and small models
# still get few shards.
FLUSH_BYTES = 64 * 1024**2
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class LayerStream:
    """Where a streamed step writes its result (see the module docstring).

    Args:
        lazy: the model being streamed (opened with kompakt.model.lazy.open_lazy).
        target: the model directory to write (replaced atomically at `finish`).
        input_dtype: the storage dtype of the step's input (chooses the 16-bit dtype of a packed save).
        shard_bytes: the most bytes per safetensors shard.
        flush_bytes: a shard is written at the end of a layer once it holds this many bytes.
        resume: where a killed run left its finished layers (kompakt.model.stream_resume; the
            shards are written there, one per layer, and the progress after each layer), None:
            not resumable. `key` names the step (an earlier run's progress counts only for it).
    """

    def __init__(self, lazy: LazyModel, target: str | Path, input_dtype: torch.dtype,
                 shard_bytes: int = SHARD_BYTES, flush_bytes: int = FLUSH_BYTES,
                 resume: LayerResume | None = None, key: str = "") -> None:  # fmt: skip
        self.lazy, self.input_dtype, self.flush_bytes = lazy, input_dtype, flush_bytes
        self.resume, self.key = resume, key
        self.target = Path(target).expanduser().absolute()
        if self.target.exists() and not self.target.is_dir():
            raise OutputPathError(f"{self.target} is a file; choose a directory path for the saved model")
        self._stack = ExitStack()
        self.temp = self._stack.enter_context(atomic_directory(self.target, replace=True))
        self.shards = ShardWriter(self.temp if resume is None else resume.shards, shard_bytes,
                                  checkpoint_names(lazy.model))  # fmt: skip
        self.packed_mode: bool | None = None  # decided by the first layer written
        self.written: set[str] = set()
        self.groups: dict[tuple, list[str]] = {}  # compressed-tensors scheme -> module names
        self.packed_names: set[str] = set()
        self.regrouped: dict[str, int] = {}
        self.layers_written = 0
        if resume is not None:
            self._restore(resume.load(key))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.lazy.compute_dtype

    def dense_dtype(self, loaded: LoadedModel) -> torch.dtype:
        """What a tensor nobody quantized is stored in (see the module docstring)."""
        if not self.packed_mode:
            return loaded.storage_dtype
        dense = self.input_dtype if self.input_dtype in SIXTEEN_BIT else torch.float16
        if dense == torch.float16 and arch_for(loaded).fp16_overflows:
            dense = torch.bfloat16
        return dense

    def _mode(self, packed: Mapping[str, PackedLayer]) -> bool:
        mode = bool(packed) and arch_for(self.lazy.model).stores_packed
        if self.packed_mode is None:
            self.packed_mode = mode
        elif self.packed_mode != mode and packed:
            raise RuntimeError("a streamed step packed some layers and not others; run it in memory")
        return self.packed_mode

    def write_module(self, prefix: str, module: nn.Module, loaded: LoadedModel,
                     packed: Mapping[str, PackedLayer] | None = None,
                     exact: set[str] | frozenset[str] = frozenset()) -> None:  # fmt: skip
        """Store every tensor under `module` (named `prefix`); see `write_tensors`."""
        self.write_tensors(prefix, module.state_dict(), loaded, packed, exact)

    def write_tensors(self, prefix: str, tensors: Mapping[str, torch.Tensor], loaded: LoadedModel,
                      packed: Mapping[str, PackedLayer] | None = None,
                      exact: set[str] | frozenset[str] = frozenset()) -> None:  # fmt: skip
        """Store `tensors` (names relative to `prefix`): packed Linears as compressed-tensors,
        `exact` modules (on a grid, unpacked) in the storage dtype, the rest in the dense dtype."""
        from kompakt.model.quantized import _compressed_tensors, _regroup, _scheme

        packed = packed or {}
        self._mode(packed)
        dense = self.dense_dtype(loaded)
        for name, tensor in tensors.items():
            full = f"{prefix}.{name}" if prefix else name
            owner = full.rsplit(".", 1)[0]
            if full in self.written or self.lazy.is_alias(full):
                continue
            self.written.add(full)
            if owner in packed and full.endswith(".weight") and self.packed_mode:
                layer = _regroup(owner, packed[owner], self.regrouped)
                self.groups.setdefault(_scheme(layer), []).append(owner)
                self.packed_names.add(owner)
                for key, value in _compressed_tensors(owner, layer).items():
                    self.shards.add(key, value)
                continue
            if tensor.is_meta:
                raise RuntimeError(f"{full} is not materialised; materialise it before writing")
            dtype = (loaded.storage_dtype if owner in exact and self.packed_mode else dense) \
                if tensor.is_floating_point() else tensor.dtype  # fmt: skip
            self.shards.add(full, tensor.detach().to("cpu", dtype))

    def write_layer(self, index: int, layer: nn.Module, loaded: LoadedModel,
                    packed: Mapping[str, PackedLayer] | None = None,
                    exact: set[str] | frozenset[str] = frozenset()) -> None:  # fmt: skip
        """Store decoder layer `index` (call before releasing it); the shard is written once
        FLUSH_BYTES are pending."""
        if self.resume is not None and index < self.resume.start:  # the pass did not skip it: start over
            self._restart()
        self.write_module(self.lazy.layer_path(index), layer, loaded, packed, exact)
        self.layers_written += 1
        if self.resume is not None and self.resume.resumable:
            self.shards.flush()
            self.resume.save(self._state(), self.key, index + 1, self._files())
        elif self.shards.pending_bytes >= self.flush_bytes:
            self.shards.flush()

    def finish(self, loaded: LoadedModel, packed: Mapping[str, PackedLayer] | None = None,
               exact: set[str] | frozenset[str] = frozenset()) -> Path:  # fmt: skip
        """Store every tensor not written yet (materialised one module at a time, released after:
        a module the pass left live, such as a quantized embedding, is written as it is), the config, generation config, tokenizer, GGUF bytes and
        index, and move the directory into place. Returns the target path."""
        from kompakt.model.gguf_blocks import save_blocks

        try:
            self._write_rest(loaded, packed or {}, exact)
            self.shards.close()
            if self.resume is not None:  # the shards were written beside the progress: move them in
                self.resume.decline()
                for path in sorted(self.shards.directory.glob("model*")):  # not a killed run's stray shard
                    path.rename(self.temp / path.name)
            self._write_configs(loaded)
            loaded.tokenizer.save_pretrained(self.temp)
            save_blocks(loaded.gguf_blocks, self.temp)
        except BaseException:
            self.abort()
            raise
        self._stack.close()  # the temporary directory becomes the target
        logger.info("streamed %d layers to %s", self.layers_written, self.target)
        return self.target

    def abort(self) -> None:
        """Remove the temporary directory (a failed step leaves nothing behind); once is enough."""
        error = RuntimeError("streamed step aborted")
        self._stack.__exit__(RuntimeError, error, None)  # atomic_directory removes its temporary

    # -- resuming (kompakt.model.stream_resume) ---------------------------------------------------
    def _state(self) -> dict:
        shards = self.shards
        return {"shard_files": shards.files, "weight_map": shards.weight_map, "total_bytes": shards.total_bytes,
                "written": sorted(self.written), "groups": [[list(k), v] for k, v in self.groups.items()],
                "packed_names": sorted(self.packed_names), "regrouped": self.regrouped,
                "packed_mode": self.packed_mode, "layers_written": self.layers_written}  # fmt: skip

    def _files(self) -> dict[str, int]:
        return {name: (self.shards.directory / name).stat().st_size for name in self.shards.files}

    def _restore(self, state: dict | None) -> None:
        if state is None:
            return
        shards = self.shards
        shards.files, shards.weight_map, shards.total_bytes = list(state["shard_files"]), dict(state["weight_map"]), \
            int(state["total_bytes"])  # fmt: skip
        self.written, self.packed_names = set(state["written"]), set(state["packed_names"])
        self.groups = {tuple(k): list(v) for k, v in state["groups"]}
        self.regrouped, self.packed_mode = dict(state["regrouped"]), state["packed_mode"]
        self.layers_written = int(state["layers_written"])

    def _restart(self) -> None:
        """Forget an earlier run's layers: the pass is writing them again."""
        assert self.resume is not None
        logger.info("the pass does not skip finished layers: the step restarts from layer 0")
        self.resume.decline()
        for name in self.shards.files:
            (self.shards.directory / name).unlink(missing_ok=True)
        self.shards.files, self.shards.weight_map, self.shards.total_bytes = [], {}, 0
        self.written, self.groups, self.packed_names, self.regrouped = set(), {}, set(), {}
        self.packed_mode, self.layers_written = None, 0

    def _write_rest(self, loaded: LoadedModel, packed: Mapping[str, PackedLayer], exact) -> None:
        lazy = self.lazy
        if self.packed_mode is None:
            self._mode(packed)
        for module_name, module in lazy.model.named_modules():
            own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            names = [f"{module_name}.{n}" if module_name else n for n in own]
            if not names or all(n in self.written or lazy.is_alias(n) for n in names):
                continue
            # Kept as the pass left it when live; else read as stored (the pass did not touch it, and
            # the stored 16 bits cast to the dense dtype are what a trip through fp32 gives: the
            # 7B embedding and head are then 0.26 GB each in memory, not 0.52 + 0.26).
            untouched = not lazy.is_live(module, recurse=False)
            lazy.materialize(module, None if untouched else lazy.compute_dtype, recurse=False)
            self.write_tensors(module_name, _own_tensors(module), loaded, packed, exact)
            lazy.release(module, recurse=False)
            if self.shards.pending_bytes >= self.flush_bytes:
                self.shards.flush()

    def _write_configs(self, loaded: LoadedModel) -> None:
        from kompakt.model.quantized import _quantization_config

        model = self.lazy.model
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.temp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(self.temp)
        path = self.temp / "config.json"
        config = json.loads(path.read_text())
        if self.packed_mode:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in self.packed_names]
            config["quantization_config"] = _quantization_config(self.groups, linears)
            config["dtype"] = str(self.dense_dtype(loaded)).removeprefix("torch.")
        else:
            config.pop("quantization_config", None)
            config["dtype"] = str(loaded.storage_dtype).removeprefix("torch.")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and persistent buffers (not its children's): what its
    state_dict holds at its own level."""
    own: dict[str, torch.Tensor] = dict(module.named_parameters(recurse=False))
    own.update({n: b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set})
    return own
