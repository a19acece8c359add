"""`kompakt chat`: streaming terminal chat; /reset, /exit and EOF end cleanly."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from kompakt.cli import chat as chat_cli
from kompakt.model.tiny import save_tiny, tiny_model

SCRIPT = "hello\n/reset\nhi\n/exit\n"
HAS_LOAD = importlib.util.find_spec("kompakt.model.load") is not None


def _app() -> typer.Typer:
    app = typer.Typer()
    chat_cli.register(app)
    app.command("noop", hidden=True)(lambda: None)  # keeps typer in multi-command mode
    return app


def _run(monkeypatch, loaded, script: str, *args: str):
    from kompakt.serve.backend_transformers import TransformersBackend

    monkeypatch.setattr(chat_cli, "_open_backend", lambda source, engine: TransformersBackend(loaded))
    return CliRunner().invoke(_app(), ["chat", "tiny", "--max-new-tokens", "6", *args], input=script)


def test_chat_streams_replies_and_exits(monkeypatch):
    result = _run(monkeypatch, tiny_model("llama"), SCRIPT, "--temperature", "0", "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    assert result.output.count(">>> ") == 4
    assert "conversation cleared" in result.output


def test_chat_ends_cleanly_on_eof(monkeypatch):
    result = _run(monkeypatch, tiny_model("llama"), "hello\n")
    assert result.exit_code == 0, result.output


def test_chat_plain_mode_without_template(monkeypatch):
    loaded = tiny_model("gemma3_text")
    loaded.tokenizer.chat_template = None
    result = _run(monkeypatch, loaded, SCRIPT, "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "no chat template" in result.output


def test_bad_option_fails_before_loading(monkeypatch):
    def refuse(source, engine):
        raise AssertionError("loaded a model for a bad option")

    monkeypatch.setattr(chat_cli, "_open_backend", refuse)
    result = CliRunner().invoke(_app(), ["chat", "--temperature", "-1"], input=SCRIPT)
    assert result.exit_code != 0
    assert "temperature" in str(result.exception)


@pytest.mark.skipif(not HAS_LOAD, reason="kompakt.model.load not written yet")
def test_kompakt_chat_subprocess(tmp_path):
    save_tiny("llama", tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "-m", "kompakt", "chat", str(tmp_path / "tiny"), "--max-new-tokens", "8", "--seed", "0"],
        input=SCRIPT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(">>> ") == 4
    assert len(done.stdout) > len(">>> ") * 4 + 2  # the replies printed something
    assert "/reset" in done.stderr  # the help line
