"""Export for Ollama: the GGUF file plus a Modelfile (FROM, TEMPLATE, PARAMETER stop, SYSTEM).

    export_ollama("small.gguf", "ollama/")            # then: ollama create small -f ollama/Modelfile

Ollama does not run the Jinja chat template stored in a GGUF; it needs a Go template. The
common chat formats are recognised by their turn markers and written as the equivalent Go
template over .Messages (Ollama adds the Modelfile's SYSTEM as the first message when a
request has none). A model without a chat template, or with an unrecognised one, gets a
plain "role: content" template (what kompakt's own generation falls back to) and a warning.
A sentence encoder (an embedding model: `ollama embed`, /api/embed) gets a Modelfile with FROM
only: Ollama runs no template for embeddings.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kompakt.errors import ModelFormatError, ModelNotFoundError, OutputPathError
from kompakt.atomic import atomic_file

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class OllamaTemplate:
    style: str  # chatml | gemma | llama3 | phi3 | mistral | plain
    template: str
    stop: list[str] = field(default_factory=list)
    system: str | None = None  # default system prompt found in the chat template


_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_GEMMA = (
    '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
    "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
)
_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
_MISTRAL = (
    '{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}</s>'
    "{{ else }}[INST] {{ .Content }} [/INST]{{ end }}{{ end }}"
)
_PLAIN = "{{- range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"

# (style, marker that identifies it in the Jinja template, Go template, stop strings)
_STYLES = (
    ("chatml", "<|im_start|>", _CHATML, ["<|im_start|>", "<|im_end|>"]),
    ("gemma", "<start_of_turn>", _GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
    ("llama3", "<|start_header_id|>", _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("phi3", "<|assistant|>", _PHI3, ["<|end|>", "<|user|>", "<|assistant|>"]),
    ("mistral", "[INST]", _MISTRAL, ["[INST]", "</s>"]),
)
_DEFAULT_SYSTEM = {
    # A default system prompt written literally into the template (SmolLM2 has one).
    "chatml": re.compile(r"<\|im_start\|>system\\n([^{}<]+?)<\|im_end\|>"),
}


def ollama_template(chat_template: str | None) -> OllamaTemplate:
    """The Ollama template equivalent to a Jinja chat template (plain when unknown or absent)."""
    if chat_template:
        for style, marker, template, stop in _STYLES:
            if marker in chat_template:
                pattern = _DEFAULT_SYSTEM.get(style)
                found = pattern.search(chat_template) if pattern else None
                return OllamaTemplate(style, template, list(stop), found.group(1).strip() if found else None)
    return OllamaTemplate("plain", _PLAIN, ["\nuser:"])


def gguf_chat_template(path: Path) -> str | None:
    """`tokenizer.chat_template` from a GGUF file's metadata (None when absent)."""
    from gguf import GGUFReader

    try:
        found = GGUFReader(str(path)).get_field("tokenizer.chat_template")
    except (ValueError, OSError) as exc:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({exc}); export it again") from None
    return None if found is None else str(found.contents())


def modelfile_text(gguf_name: str, template: OllamaTemplate) -> str:
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template.template}"""', ""]
    if template.system:
        lines += [f'SYSTEM """{template.system}"""', ""]
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in template.stop]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def check_out_dir(out_dir: Path, force: bool) -> Path:
    """The absolute output directory, created; refused when it is a file or already holds an
    export without `force`."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} is a file; --out takes a directory for the GGUF and the Modelfile")
    existing = [name for name in (GGUF_NAME, MODELFILE) if (out_dir / name).exists()]
    if existing and not force:
        raise OutputPathError(
            f"{out_dir} already holds {', '.join(existing)}; pass --force to replace or choose another --out"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {out_dir} ({exc.strerror}); choose a writable --out") from None
    return out_dir


def export_ollama(source, out_dir: str | Path, *, force: bool = False, type: str = "q4_0") -> Path:
    """Write `out_dir/model.gguf` and `out_dir/Modelfile`; returns the Modelfile's path.

    Args:
        source: a .gguf file (copied), or a model (LoadedModel, or anything kompakt.model.load
            accepts) that is exported to GGUF of `type` first.
        out_dir: directory to write into (created).
        force: replace an existing model.gguf / Modelfile there.
        type: GGUF type when `source` is not a GGUF file yet.

    Raises:
        OutputPathError, ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError.
    """
    out_dir = check_out_dir(Path(out_dir), force)
    target = out_dir / GGUF_NAME
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".gguf"):
        source_path = Path(source).expanduser()
        if not source_path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {source_path}; pass an existing .gguf file")
        chat_template = gguf_chat_template(source_path)
        if source_path.resolve() != target.resolve():
            with atomic_file(target, expected_bytes=source_path.stat().st_size) as tmp:
                shutil.copyfile(source_path, tmp)
    else:
        from kompakt.export.gguf import export_gguf
        from kompakt.model.load import load
        from kompakt.model.loaded import LoadedModel

        loaded = source if isinstance(source, LoadedModel) else load(source)
        export_gguf(loaded, target, type=type, force=True)
        if loaded.is_encoder:
            return _write_modelfile(out_dir, f"FROM ./{GGUF_NAME}\n")
        chat_template = getattr(loaded.tokenizer, "chat_template", None)
    template = ollama_template(chat_template)
    if template.style == "plain":
        why = "has no chat template" if not chat_template else "has a chat template kompakt does not recognise"
        log.warning(
            "the model %s; the Modelfile uses a plain 'role: content' template (edit TEMPLATE to change it)", why
        )
    return _write_modelfile(out_dir, modelfile_text(GGUF_NAME, template))


def _write_modelfile(out_dir: Path, text: str) -> Path:
    modelfile = out_dir / MODELFILE
    with atomic_file(modelfile) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return modelfile
