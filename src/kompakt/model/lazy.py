"""Open a model directory without reading its weights; materialise one part at a time.

A model larger than memory (a 7B model is 28 GB in fp32) is never loaded whole. `open_lazy`
reads config.json, the tokenizer and the safetensors headers (sharded or not), and builds the
transformers model on the meta device (accelerate's `init_empty_weights`: parameters on meta,
buffers such as rotary tables real). Parts are then materialised when used and put back on
meta after:

    lazy = open_lazy("Llama-2-7b-hf")               # no weight read yet
    lazy.materialize(lazy.embed_path, torch.float32)
    layer = lazy.materialize(lazy.layer_path(0), torch.float32)   # one decoder layer
    ...                                             # run it, change it, write it
    lazy.release(layer)                             # back on meta: its memory is free
    lazy.live_numel, lazy.peak_numel                # parameters materialised now / at most

Tensors are read with safetensors' `safe_open` (memory-mapped, only the requested tensors),
cast to the requested dtype. Checkpoint keys are mapped to the model's parameter names with
transformers' own key renamings (Gemma 3 stores `language_model.model.*`, the model names it
`model.language_model.*`); a family whose checkpoint needs real conversion (fusing experts) is
refused. A tied output head has no key of its own: it is read from the embedding's key and,
while both are live, shares one tensor with it (as the loaded model does).

`lazy.loaded()` is a LoadedModel around the meta skeleton, so code that reads names, shapes
and config (pass target selection, the arch table) works unchanged; what reads weights must
materialise first. Streaming evaluation and the streaming calibration driver
(kompakt.calib.sequential, kompakt.model.stream_save) are built on this.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kompakt.errors import ModelFormatError
from kompakt.model.arch import ArchSpec, arch_for, decoder_layers, get_submodule, is_encoder_family, text_config
from kompakt.model.device import default_device
from kompakt.model.dtype import compute_dtype_for, parse_dtype
from kompakt.model.hf_dir import check_model_dir
from kompakt.model.lazy_index import NotLazyError, PackedSource, TensorEntry, map_tensors, read_headers
from kompakt.model.loaded import LoadedModel

__all__ = ["LazyModel", "PackedSource", "TensorEntry", "lazy_of", "open_lazy"]

logger = logging.getLogger(__name__)

_LAZY: weakref.WeakKeyDictionary[nn.Module, LazyModel] = weakref.WeakKeyDictionary()


@dataclass
class LazyModel:
    """A model directory opened without its weights (see the module docstring).

    Attributes:
        directory: the Hugging Face directory.
        config: the transformers config.
        model: the skeleton (parameters on meta until materialised).
        tensors: model parameter name -> TensorEntry (tied heads point at the embedding's entry).
        storage_dtype: the dtype most stored weight bytes are in.
        compute_dtype: the dtype streamed passes materialise parameters in: the in-memory path's
            (kompakt.model.dtype.compute_dtype_for: fp32 on the CPU, but bf16 for a bf16 checkpoint
            on a CPU with native bf16; bf16 on a GPU that has it), so both give the same weights.
        device: where the sequential driver onloads each decoder layer and keeps the calibration
            activations (kompakt.model.device: the command's --device); the skeleton stays on meta
            and the embeddings are read on the CPU.
        aliases: parameter names with no stored key of their own (a tied head).
        spill_dir: where the sequential driver keeps calibration activations between layers
            (kompakt.calib.spill) when RAM is short; None: in RAM.
        resume: where a resumable streamed step keeps its finished layers and their outputs
            (kompakt.model.stream_resume); None: not resumable.
        live_numel: parameters materialised now (tied tensors once).
        peak_numel: the most parameters materialised at one time since opening (or `reset_peak`).
    """

    directory: Path
    config: Any
    model: nn.Module
    tensors: dict[str, TensorEntry]
    storage_dtype: torch.dtype
    name: str = ""
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    aliases: frozenset[str] = frozenset()
    spill_dir: Path | None = None
    resume: Any = None  # kompakt.model.stream_resume.LayerResume of a resumable streamed step
    live_numel: int = 0
    peak_numel: int = 0
    _tokenizer: Any = field(default=None, repr=False)
    _live: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)  # stored key -> live tensor
    _users: dict[str, int] = field(default_factory=dict, repr=False)  # stored key -> live parameters using it
    _meta: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)  # stored key -> its meta stand-in

    # -- what the model is ---------------------------------------------------------------------
    @property
    def spec(self) -> ArchSpec:
        return arch_for(self.model)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def embed_path(self) -> str:
        return self.spec.embed

    @property
    def final_norm_path(self) -> str | None:
        return self.spec.final_norm

    @property
    def lm_head_path(self) -> str | None:
        return self.spec.lm_head

    def layer_path(self, index: int) -> str:
        return f"{self.spec.layers}.{index}"

    @property
    def tied(self) -> bool:
        """The output head reads the embedding's stored tensor (no key of its own)."""
        head = self.lm_head_path
        return head is not None and self.tensors.get(f"{head}.weight") == self.tensors.get(f"{self.embed_path}.weight")

    def parameter_count(self) -> int:
        """Parameters of the model, tied tensors once (from the headers, nothing read)."""
        return sum(entry.numel for entry in set(self.tensors.values()))

    def stored_bytes(self) -> int:
        """Bytes of the weights as stored (tied tensors once)."""
        return sum(entry.nbytes for entry in set(self.tensors.values()))

    def bytes_in(self, dtype: torch.dtype) -> int:
        """Bytes of all floating weights in `dtype` (tied once): the in-memory size of a full load."""
        return sum(e.numel * (dtype.itemsize if e.dtype.is_floating_point else e.dtype.itemsize)
                   for e in set(self.tensors.values()))  # fmt: skip

    def layer_bytes(self, index: int, dtype: torch.dtype) -> int:
        """Bytes decoder layer `index` takes when materialised in `dtype`."""
        prefix = self.layer_path(index) + "."
        return sum(e.numel * dtype.itemsize for n, e in self.tensors.items() if n.startswith(prefix))

    def fingerprint(self) -> str:
        """A short stable id of the stored weights without reading them whole: the config, every
        tensor's name, dtype and shape, and its first row's bytes (a recipe run's step hashes
        start from it; it differs from LoadedModel.fingerprint of the same model, so a streamed
        run and an in-memory run of one model keep separate run directories)."""
        import hashlib

        from safetensors import safe_open

        digest = hashlib.sha256(self.config.to_json_string(use_diff=False).encode())
        by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
        for name, entry in sorted(self.tensors.items()):
            by_file.setdefault(entry.file, []).append((name, entry))
        for file, entries in sorted(by_file.items()):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name, entry in entries:
                    digest.update(f"{name}:{entry.dtype}:{entry.shape}".encode())
                    if entry.shape:
                        first = handle.get_slice(entry.key)[0:1]
                        digest.update(first.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from kompakt.model.load import _load_tokenizer

            self._tokenizer = _load_tokenizer(self.directory)
        return self._tokenizer

    def loaded(self) -> LoadedModel:
        """A LoadedModel around the skeleton (names, shapes, config; weights only once materialised)."""
        return LoadedModel(model=self.model, tokenizer=self.tokenizer, name=self.name, path=self.directory,  # type: ignore[arg-type]
                           storage_dtype=self.storage_dtype)  # fmt: skip

    # -- materialise / release -----------------------------------------------------------------
    def is_alias(self, name: str) -> bool:
        """Whether parameter `name` is stored under another name (a tied head: not saved again)."""
        return name in self.aliases

    def _params(self, target: str | nn.Module, recurse: bool = True) -> Iterator[tuple[str, nn.Module, str]]:
        """(full parameter name, owning module, attribute) of every parameter under `target`
        (`recurse` False: the module's own parameters only)."""
        root = get_submodule(self.model, target) if isinstance(target, str) else target
        prefix = self._path_of(root)
        modules = root.named_modules(remove_duplicate=False) if recurse else [("", root)]
        for module_name, module in modules:
            for attr in list(module._parameters):
                if module._parameters[attr] is None:
                    continue
                path = ".".join(p for p in (prefix, module_name, attr) if p)
                yield path, module, attr

    def _path_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules(remove_duplicate=False):
            if candidate is module:
                return name
        raise ValueError("the module is not part of this lazy model")

    @torch.no_grad()
    def materialize(self, target: str | nn.Module, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", *, recurse: bool = True) -> nn.Module:  # fmt: skip
        """Read every parameter under `target` (a dotted path or a submodule) into memory.

        `dtype`: floating parameters are cast to it (None: as stored). Parameters already live
        are kept; a stored tensor another live module uses (a tied head) is shared, not read twice.
        `recurse` False: only the module's own parameters, not its children's. Returns the module.

        Raises:
            ModelFormatError: a parameter has no stored tensor (a shard missing from the index).
        """
        module = get_submodule(self.model, target) if isinstance(target, str) else target
        for path, owner, attr in self._params(module, recurse):
            if not owner._parameters[attr].is_meta:
                continue
            entry = self.tensors.get(path)
            if entry is None:
                raise ModelFormatError(f"{self.directory} stores no tensor for {path}; copy or download the model again")
            key = f"{entry.file.name}:{entry.key}"
            live = self._live.get(key)
            if live is None or (dtype is not None and live.dtype != dtype and live.is_floating_point()):
                live = nn.Parameter(self._read(entry, dtype, device), requires_grad=False)
                if key not in self._live:
                    self.live_numel += entry.numel
                self._live[key] = live
            self._users[key] = self._users.get(key, 0) + 1
            owner._parameters[attr] = live
        self.peak_numel = max(self.peak_numel, self.live_numel)
        return module

    def onload(self, module: nn.Module) -> nn.Module:
        """Materialise `module` (a decoder layer) in the compute dtype on `device`, where the streamed
        passes run it; its buffers go there too."""
        return self.materialize(module, self.compute_dtype, self.device).to(self.device)

    def _read(self, entry: TensorEntry, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(entry.file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(entry.key)
            if entry.source is not None:
                tensor = self._dequantize(entry, tensor)
        except (OSError, SafetensorError) as exc:
            raise ModelFormatError(f"{entry.file} cannot be read ({exc}); copy or download the model again") from None
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def _dequantize(self, entry: TensorEntry, codes: torch.Tensor) -> torch.Tensor:
        """fp32 values of a compressed-tensors weight: codes x scale in fp32, as densify_compressed."""
        from kompakt.model.compression import PackedLayer

        source = entry.source
        assert source is not None
        if source.packed:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            codes = unpack_from_int32(codes, source.bits, torch.Size(entry.shape))
        parts = [self._read(part, None, "cpu") if part is not None else None for part in (source.scale, source.zero)]
        layer = PackedLayer(codes.to(torch.int32), parts[0].float(), None if parts[1] is None else parts[1].to(torch.int32),
                            source.bits, source.group_size, source.symmetric)  # fmt: skip
        return layer.dequantize()

    @torch.no_grad()
    def release(self, target: str | nn.Module, *, recurse: bool = True) -> None:
        """Put every parameter under `target` back on the meta device (its memory is freed once
        nothing else holds it). A tied tensor stays live while another module still uses it."""
        module = get_submodule(self.model, target) if isinstance(target, str) else target
        for path, owner, attr in self._params(module, recurse):
            param = owner._parameters[attr]
            if param.is_meta:
                continue
            entry = self.tensors.get(path)
            key = f"{entry.file.name}:{entry.key}" if entry is not None else path
            if key not in self._meta:  # one meta tensor per stored one: a tied head stays tied
                self._meta[key] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            owner._parameters[attr] = self._meta[key]
            if key in self._users:
                self._users[key] -= 1
                if self._users[key] <= 0:
                    del self._users[key]
                    if self._live.pop(key, None) is not None:
                        self.live_numel -= entry.numel  # type: ignore[union-attr]

    def reset_peak(self) -> None:
        self.peak_numel = self.live_numel

    def is_live(self, target: str | nn.Module, *, recurse: bool = True) -> bool:
        """Whether every parameter under `target` is materialised."""
        return all(not owner._parameters[attr].is_meta for _, owner, attr in self._params(target, recurse))


def lazy_of(model: nn.Module | LoadedModel) -> LazyModel | None:
    """The LazyModel whose skeleton `model` is, or None for an ordinary (in-memory) model."""
    model = getattr(model, "model", model) if isinstance(model, LoadedModel) else model
    return _LAZY.get(model)  # type: ignore[arg-type]


def open_lazy(directory: str | Path, *, name: str | None = None, dtype: str | torch.dtype | None = None) -> LazyModel:
    """Open a local Hugging Face directory (safetensors, sharded or not) without reading weights.

    `dtype`: the compute dtype ("float32", "bf16", ...); None: as kompakt.load chooses it.

    Raises:
        ModelNotFoundError, ModelFormatError, UnsupportedArchitectureError: as kompakt.load,
        checked from config.json and the safetensors headers before anything is built.
    """
    from transformers import AutoConfig

    directory = Path(directory).expanduser()
    config_json, stored = check_model_dir(directory)  # headers checked against file sizes
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if is_encoder_family(config):  # the skeleton is a causal LM; encoders are small enough to load whole
        raise NotLazyError(f"{directory} is a sentence encoder: only causal LMs are opened layer by layer; "
                           "load it whole (drop --max-memory)")  # fmt: skip
    model = _skeleton(config)
    tensors, aliases = map_tensors(model, read_headers(directory), directory)
    device = torch.device(default_device())
    compute = parse_dtype(dtype) or compute_dtype_for(stored, device)
    lazy = LazyModel(directory=directory, config=config, model=model, tensors=tensors, storage_dtype=stored,
                     name=name or directory.resolve().name, compute_dtype=compute, device=device,
                     aliases=frozenset(aliases))  # fmt: skip
    _LAZY[model] = lazy
    logger.info("opened %s lazily: %d tensors, %.2f GB stored", directory, len(tensors), lazy.stored_bytes() / 1e9)
    return lazy


def _skeleton(config: Any) -> nn.Module:
    """The causal LM on the meta device (buffers real: rotary tables are computed, not stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from kompakt.model.progress import quiet_third_party

    with init_empty_weights(include_buffers=False), quiet_third_party():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied head is then the embedding's Parameter, as after from_pretrained
    return model.eval()


def text_hidden_size(lazy: LazyModel) -> int:
    """The decoder's hidden size (the text config of a multimodal model)."""
    return int(text_config(lazy.config).hidden_size)
