"""Write a `LoadedModel` as a loadable Hugging Face directory, atomically.

The directory holds config.json (dtype = the storage dtype), generation_config.json,
safetensors weights in `loaded.storage_dtype` and the tokenizer with its chat template, so
plain `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read it.

Atomic: everything is written into a temporary directory beside the target and renamed
into place. An existing target is first renamed aside and removed only after the new one is
in place, so at every instant the target path is either the old or the new complete model;
on any error the temporary directory is removed and nothing half-written remains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kompakt.atomic import atomic_directory
from kompakt.errors import OutputPathError
from kompakt.model.loaded import LoadedModel
from kompakt.model.lora_adapter import save_attached
from kompakt.model.lowrank import record_lowrank
from kompakt.model.sentence import write_sentence_files
from kompakt.model.sharing import is_shared, stored_state_dict

logger = logging.getLogger(__name__)


def save_model(loaded: LoadedModel, directory: str | Path) -> Path:
    """Save model, tokenizer and configs to `directory` (replacing it if it exists).

    Weights are cast tensor by tensor to `loaded.storage_dtype` (the live model is not
    changed); extra memory is one copy of the weights in the storage dtype when it differs
    from the compute dtype, none otherwise.

    Returns:
        The absolute path of the written directory.

    Raises:
        OutputPathError: `directory` is an existing file or its parent cannot be created.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} is a file; choose a directory path for the saved model")
    with atomic_directory(target, replace=True, expected_bytes=weight_bytes(loaded)) as temp:
        _write(loaded, temp)
    logger.info("saved %s to %s", loaded.name, target)
    return target


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes the weights take in the storage dtype (tied tensors once): what a save needs on disk."""
    size = loaded.storage_dtype.itemsize if hasattr(loaded.storage_dtype, "itemsize") else 4
    seen = {p.data_ptr(): p.numel() for p in loaded.model.parameters()}
    return sum(seen.values()) * size


def _write(loaded: LoadedModel, directory: Path) -> None:
    model = loaded.model
    # Shared layers (kompakt.model.sharing): each shared tensor once, in the model's own tensor names,
    # which kompakt.load reads back (transformers' original-format renames are for its own loader).
    state_dict = stored_state_dict(model, _cast_state_dict(model, loaded.storage_dtype))
    save_pretrained_on_every_rank(model, directory, state_dict, original_format=not is_shared(model))
    save_attached(model, directory)  # a LoRA adapter running beside the weights (lowrank.compensate)
    _set_config_dtype(directory / "config.json", loaded.storage_dtype)
    loaded.tokenizer.save_pretrained(directory)
    write_encoder_files(loaded, directory)


def write_encoder_files(loaded: LoadedModel, directory: Path) -> None:
    """A sentence encoder's pooling files, so SentenceTransformer(directory) loads it too (and
    kompakt.load pools as before); nothing for a causal LM. Every writer of a model calls it."""
    if loaded.pooling is not None:
        write_sentence_files(directory, loaded.pooling, _hidden_size(loaded.model.config))


def save_pretrained_on_every_rank(model: torch.nn.Module, directory: Path, state_dict: dict | None,
                                  original_format: bool = True) -> None:  # fmt: skip
    """`model.save_pretrained`, also in processes other than rank 0 of a torch.distributed group.

    transformers writes only on rank 0 once a process group exists (after the first training
    step under `accelerate launch`); kompakt gives every process its own run directory
    (kompakt.train.distributed) and reads each step back from it, so every process writes.
    """
    from kompakt.model.progress import quiet_third_party

    record_lowrank(model)  # config.json names the factorized modules as they are now
    model.should_save_on_this_rank = lambda is_main_process: True  # shadows the mixin's rank check
    try:
        with quiet_third_party():  # no "Writing model shards" / "Compressing model" bars
            model.save_pretrained(directory, state_dict=state_dict, save_original_format=original_format)
    finally:
        del model.should_save_on_this_rank


def _cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """A state dict with floating tensors cast to `dtype`, or None when nothing needs casting.

    Tensors sharing storage (tied embeddings) map to one cast tensor, so transformers still
    sees them as tied and writes them once.
    """
    state = model.state_dict()
    if all(not t.is_floating_point() or t.dtype == dtype for t in state.values()):
        return None
    cast: dict[tuple, torch.Tensor] = {}
    result = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            result[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in cast:
            cast[key] = tensor.detach().to(device="cpu", dtype=dtype)
        result[name] = cast[key]
    return result


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """save_pretrained records the compute dtype; record the dtype the weights are stored in.

    A compressed-tensors `quantization_config` (a model kompakt.load densified) is dropped: the
    weights written here are dense, and transformers would look for packed tensors. What grid
    they came from stays in the compression state (kompakt.model.compression).
    """
    config = json.loads(config_path.read_text())
    qconfig = config.get("quantization_config")
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors":
        del config["quantization_config"]
    name = str(dtype).removeprefix("torch.")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            for key in ("dtype", "torch_dtype"):
                if key in section or (key == "dtype" and section is config):
                    section[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim"))  # DistilBERT calls it dim
