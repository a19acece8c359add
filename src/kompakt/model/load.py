"""`load(source)`: any model kompakt accepts, as a LoadedModel ready to run.

Sources, in the order they are recognised:
  None                      the embedded default (smollm2-135m)
  "smollm2-135m", ...       an embedded model (kompakt.model.embedded)
  an existing directory     a Hugging Face directory (config.json + *.safetensors); a
                            directory holding just one .gguf file counts as that file
  an existing *.gguf file   converted once into a cached HF directory (gguf_convert)
  "owner/name"              a hub id: downloaded (safetensors only) when online
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

import torch

from kompakt.errors import KompaktError, ModelFormatError, ModelNotFoundError
from kompakt.model.compression import check_stored_state, stores_shared
from kompakt.model.arch import is_encoder_family
from kompakt.model.device import default_device
from kompakt.model.dtype import compute_dtype_for, parse_dtype
from kompakt.model.embedded import (
    DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf, embedded_hf_dir, is_embedded, verify_embedded,
)
from kompakt.model.gguf_blocks import load_blocks
from kompakt.model.gguf_convert import convert_gguf, converted_dir_for, is_converted
from kompakt.model.hf_dir import check_model_dir
from kompakt.model.loaded import LoadedModel
from kompakt.model.lowrank_load import factorized_class, restore_family
from kompakt.model.lora_adapter import load_attached
from kompakt.model.progress import quiet_third_party
from kompakt.model.quantized import densify_compressed, is_compressed_config
from kompakt.model.sentence import read_pooling
from kompakt.model.sharing import load_shared_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what a safetensors model needs: never pickled weights, never remote code.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_TRUTHY = {"1", "true", "yes", "on"}


def _source_kind(source: str | Path) -> tuple[str, Path | str]:
    """("dir" | "gguf" | "embedded" | "hub", resolved source)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return "gguf", ggufs[0]
        return "dir", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        if path.name == "config.json":
            return "dir", path.parent
        raise ModelFormatError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
    if isinstance(source, str) and is_embedded(text):
        return "embedded", text.lower()
    if isinstance(source, str) and _HUB_ID.match(text) and not text.startswith((".", "~")):
        return "hub", text
    raise ModelNotFoundError(
        f"no model at {text!r}: not a directory, .gguf file, embedded model "
        f"({', '.join(EMBEDDED_MODELS)}) or hub id (owner/name)"
    )


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so a machine without network fails in seconds, not after hub retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_dir(repo_id: str) -> Path:
    """The local snapshot of a hub repo (safetensors only); cached snapshots work offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline_hint = (
        f"{repo_id!r} looks like a Hugging Face hub id but kompakt is offline{{why}}; "
        "pass a local model directory or .gguf file instead"
    )
    local_only = _offline() or not _hub_reachable()
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=local_only))
    except (GatedRepoError, RepositoryNotFoundError):
        raise ModelNotFoundError(
            f"hub repo {repo_id!r} does not exist or needs a login (`hf auth login`); check the id"
        ) from None
    except LocalEntryNotFoundError:
        why = " (HF_HUB_OFFLINE=1)" if _offline() else " (no network)"
        raise ModelNotFoundError(offline_hint.format(why=why)) from None
    except (OSError, ValueError) as exc:  # connection errors, bad ids
        raise ModelNotFoundError(offline_hint.format(why=f" or the hub failed ({type(exc).__name__})")) from None
    if (directory / "config.json").is_file() and not any(directory.glob("*.safetensors")):
        raise ModelFormatError(
            f"hub repo {repo_id!r} has no *.safetensors weights and kompakt never loads pickled ones; "
            "convert it once where you trust it (save_pretrained(dir, safe_serialization=True)) and pass dir"
        )
    return directory


def resolve_model_dir(source: str | Path | None = None) -> Path:
    """A local Hugging Face directory for `source` (converting a GGUF into the cache once)."""
    return _resolve(source)[0]


def resolve_model(source: str | Path | None = None) -> tuple[Path, str]:
    """(local Hugging Face directory, the name `load` gives the model) of `source`: what the
    streaming export opens lazily under the same name the in-memory export would use."""
    return _resolve(source)


def _resolve(source: str | Path | None) -> tuple[Path, str]:
    """(local HF directory, display name)."""
    source = DEFAULT_MODEL if source is None else source
    kind, value = _source_kind(source)
    if kind == "embedded":
        hf_dir = embedded_hf_dir(str(value))
        if hf_dir is not None:
            return hf_dir, str(value)
        gguf_path = embedded_gguf(str(value))
        if not is_converted(converted_dir_for(gguf_path)):
            verify_embedded(str(value), gguf_path)
        return convert_gguf(gguf_path), str(value)
    if kind == "gguf":
        return convert_gguf(Path(value)), Path(value).stem
    if kind == "hub":
        return _hub_dir(str(value)), str(value)
    return Path(value), Path(value).resolve().name


def load(
    source: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a causal LM or a sentence encoder (BERT family) and its tokenizer, in eval mode, in the compute dtype of the hardware.

    Args:
        source: see the module docstring; None is the embedded default model.
        device: "cpu", "cuda", "cuda:1", ...; None picks a GPU when there is one.
        dtype: compute dtype; None derives it from the stored dtype and the device
            (kompakt.model.dtype.compute_dtype_for).

    Raises:
        ModelNotFoundError, ModelFormatError, UnsupportedArchitectureError: one-line reasons.
    """
    start = time.perf_counter()
    directory, name = _resolve(source)
    config, stored = check_model_dir(directory)
    check_stored_state(config, str(directory))
    device = torch.device(device or default_device())
    compute = parse_dtype(dtype) or compute_dtype_for(stored, device)
    family = factorized_class(config, str(directory))  # None unless Linears are stored factorized
    encoder = is_encoder_family(config)
    if stores_shared(config):
        if is_compressed_config(config):
            raise ModelFormatError(f"{directory} stores shared layers as packed integers, which this version cannot "
                                   "rebuild; upgrade kompakt or save the model unpacked")  # fmt: skip
        model = load_shared_model(directory, compute).to(device)
    elif is_compressed_config(config):
        # Packed integer weights: decompressed exactly in fp32 into a plain dense model (see
        # kompakt.model.quantized.densify_compressed), then cast to the compute dtype.
        model = _load_weights(directory, torch.float32, torch.device("cpu"), family, encoder)
        densify_compressed(model, config["quantization_config"])
        model = model.to(device=device, dtype=compute)
    else:
        model = _load_weights(directory, compute, device, family, encoder)
    load_attached(model, directory)  # a LoRA adapter that runs beside the weights (lowrank.compensate)
    tokenizer = _load_tokenizer(directory)
    blocks = load_blocks(directory)  # exact GGUF bytes a quant step saved beside the weights
    log.info("loaded %s (%s stored, %s on %s) in %.1f s", name, stored, compute, device, time.perf_counter() - start)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name, path=directory, storage_dtype=stored,
                         gguf_blocks=blocks)  # fmt: skip
    if encoder:  # a sentence encoder: how its token states become one embedding
        loaded.pooling = read_pooling(directory, loaded.context_length)
    return loaded


def _load_weights(
    directory: Path, dtype: torch.dtype, device: torch.device, family: type | None = None, encoder: bool = False
):
    """transformers' from_pretrained; `family`: a class that rebuilds factorized Linears first;
    `encoder`: a sentence encoder, loaded as the base model (AutoModel) without a head."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        with quiet_third_party():
            model, info = (family or (AutoModel if encoder else AutoModelForCausalLM)).from_pretrained(
                directory, dtype=dtype, trust_remote_code=False, use_safetensors=True, output_loading_info=True
            )
    except KompaktError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelFormatError(
            f"transformers cannot load {directory} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "copy or download the model again"
        ) from None
    # BERT's pooler (dense + tanh on [CLS]) feeds classification heads, never sentence embeddings;
    # checkpoints saved without it are complete.
    missing = sorted(key for key in info.get("missing_keys") or [] if not (encoder and key.startswith("pooler.")))
    if missing:
        raise ModelFormatError(
            f"{directory} lacks {len(missing)} weights (e.g. {missing[0]}) that would be random; "
            "copy or download the model again"
        )
    return restore_family(model).to(device).eval()


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(
            f"{directory} has no usable tokenizer ({type(exc).__name__}); "
            "save the tokenizer into the model directory (tokenizer.save_pretrained(dir))"
        ) from None
