"""Ollama export: GGUF + Modelfile with a Go template translated from the chat template."""

from __future__ import annotations

import logging

import pytest

from kompakt.errors import ModelNotFoundError, OutputPathError
from kompakt.export.ollama import export_ollama, gguf_chat_template, modelfile_text, ollama_template
from kompakt.model.tiny import CHATML_TEMPLATE, tiny_model

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
)


@pytest.mark.parametrize(
    "template, style, stop",
    [
        (CHATML_TEMPLATE, "chatml", "<|im_end|>"),
        (GEMMA_TEMPLATE, "gemma", "<end_of_turn>"),
        (LLAMA3_TEMPLATE, "llama3", "<|eot_id|>"),
        (None, "plain", "\nuser:"),
        ("{{ messages }}", "plain", "\nuser:"),
    ],
)
def test_template_styles(template, style, stop):
    result = ollama_template(template)
    assert result.style == style and stop in result.stop
    assert "range .Messages" in result.template


def test_default_system_prompt_is_carried_over():
    result = ollama_template(SMOLLM2_TEMPLATE)
    assert result.style == "chatml"
    assert result.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile_text("model.gguf", result)
    assert text.startswith("FROM ./model.gguf\n")
    assert 'SYSTEM """You are a helpful AI assistant' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from kompakt.export.gguf import export_gguf

    return export_gguf(tiny_model("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf", type="q8_0")


def test_export_from_gguf(tiny_gguf, tmp_path):
    modelfile = export_ollama(tiny_gguf, tmp_path / "ollama")
    assert (tmp_path / "ollama" / "model.gguf").read_bytes() == tiny_gguf.read_bytes()
    text = modelfile.read_text()
    assert "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert gguf_chat_template(tiny_gguf) == CHATML_TEMPLATE
    assert not [path.name for path in (tmp_path / "ollama").iterdir() if path.name.startswith(".")]


def test_existing_output_needs_force(tiny_gguf, tmp_path):
    export_ollama(tiny_gguf, tmp_path)
    with pytest.raises(OutputPathError, match="--force"):
        export_ollama(tiny_gguf, tmp_path)
    assert export_ollama(tiny_gguf, tmp_path, force=True).is_file()


def test_missing_gguf_is_one_line_error(tmp_path):
    with pytest.raises(ModelNotFoundError):
        export_ollama(tmp_path / "nothing.gguf", tmp_path / "out")


def test_model_without_chat_template_gets_plain_template_and_a_warning(tmp_path, caplog):
    loaded = tiny_model("llama")
    loaded.tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING, logger="kompakt.export.ollama"):
        modelfile = export_ollama(loaded, tmp_path / "plain", type="q8_0")
    assert "no chat template" in caplog.text
    text = modelfile.read_text()
    assert "{{ .Role }}: {{ .Content }}" in text
    assert (tmp_path / "plain" / "model.gguf").stat().st_size > 0


def test_export_api_ollama_format_writes_modelfile_gguf_and_manifest(tiny_gguf, tmp_path):
    from kompakt.export.api import export
    from kompakt.export.manifest import verify_manifest

    result = export(str(tiny_gguf), format="ollama", out=tmp_path / "ollama")
    assert result.format == "ollama"
    assert (result.path / "Modelfile").is_file() and (result.path / "model.gguf").is_file()
    assert verify_manifest(result.path) == []
