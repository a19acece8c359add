"""`kompakt eval`: JSON output on a tiny saved model; bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kompakt.model.tiny import save_tiny

TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # ~1800 byte tokens


def _has_loader() -> bool:
    try:
        import kompakt.model.load  # noqa: F401
    except ImportError:
        return False
    return True


needs_loader = pytest.mark.skipif(not _has_loader(), reason="kompakt.model.load not written yet")


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "kompakt", "eval", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", directory)
    text = directory.parent / "text.txt"
    text.write_text(TEXT)
    return directory, text


def _one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_option_subprocess_exit_2_one_line():
    _one_line_error(_run("--window", "512", "--max-tokens", "100"))


@pytest.mark.parametrize(
    "args",
    [
        ("--window", "128", "--stride", "256"),
        ("--window", "1"),
        ("--threads", "0"),
    ],
)
def test_bad_options_in_process(args, capsys):
    from kompakt.cli.app import main

    with pytest.raises(SystemExit) as done:
        main(["eval", *args])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@needs_loader
def test_window_longer_than_context(tiny_dir):
    directory, text = tiny_dir
    proc = _run(str(directory), "--data", str(text), "--window", "1024", "--no-speed")
    _one_line_error(proc)
    assert "context" in proc.stderr


@needs_loader
def test_missing_data_file(tiny_dir):
    directory, text = tiny_dir
    _one_line_error(_run(str(directory), "--data", str(text.parent / "nope.txt"), "--window", "128"))


@needs_loader
def test_json_on_tiny_model(tiny_dir):
    directory, text = tiny_dir
    proc = _run(
        str(directory), "--reference", str(directory), "--data", str(text),
        "--window", "256", "--stride", "128", "--max-tokens", "1024", "--no-speed", "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # JSON only on stdout
    assert (out["window"], out["stride"], out["tokens_used"], out["tokens_scored"]) == (256, 128, 1024, 1023)
    assert out["kl_mean"] == pytest.approx(0.0, abs=1e-6) and out["top1"] == 1.0
    assert out["ppl"] == pytest.approx(out["ppl_reference"])
    assert out["data"] == str(text) and out["disk_bytes"] > 0 and out["speed"] is None


@needs_loader
def test_table_output_says_self_generated(tiny_dir, monkeypatch, capsys):
    # In-process with the generator stubbed: generating text with a random tiny model is slow.
    import torch

    import kompakt.evaluate.api as api
    from kompakt.cli.app import main

    monkeypatch.setattr(api, "_load_ids", lambda data, loaded, n: torch.randint(0, 256, (n or 512,)))
    directory, _ = tiny_dir
    try:
        main(["eval", str(directory), "--window", "128", "--max-tokens", "512", "--no-speed"])
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert "self-generated" in out and "perplexity" in out
