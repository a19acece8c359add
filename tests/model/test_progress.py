"""kompakt's progress: `quiet_third_party` nests and survives two threads (the server loads in
the background) without leaving tqdm silenced or restoring the wrong __init__; off a terminal,
kompakt's own progress is one plain line per stage."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading

import pytest
import tqdm.std
from transformers.utils import logging as hf_logging

from kompakt.model import progress
from kompakt.model.progress import quiet_third_party, spinner, stage_line, stages


def _own_init():
    return vars(tqdm.std.tqdm)["__init__"]  # the attribute itself (tqdm wraps it in a partialmethod)


def _draws() -> bool:
    """Would a tqdm created now draw? (`disable` is what quiet_third_party forces.)"""
    bar = tqdm.std.tqdm(range(2), file=io.StringIO())
    drawn = not bar.disable
    bar.close()
    return drawn


def test_nested_blocks_restore_only_when_the_outermost_exits():
    original = _own_init()
    bars_on = hf_logging.is_progress_bar_enabled()
    with quiet_third_party():
        with quiet_third_party():
            assert not _draws()
        assert not _draws()  # the inner exit must not restore while the outer block is open
    assert _draws() and _own_init() is original
    assert hf_logging.is_progress_bar_enabled() == bars_on


def test_two_threads_overlapping_leave_tqdm_as_it_was():
    """A enters, B enters, A exits (B still inside: still quiet), B exits: tqdm draws again.
    Saving and restoring per block would restore A's original under B, then B's patched one."""
    original = _own_init()
    a_in, b_in, a_out, b_may_leave = (threading.Event() for _ in range(4))
    seen: dict[str, bool] = {}

    def thread_a() -> None:
        with quiet_third_party():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(10)
        with quiet_third_party():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = _draws()
            b_may_leave.wait(10)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    a_out.wait(10)
    b_may_leave.set()
    for thread in threads:
        thread.join(10)
    assert seen == {"b after a left": False}
    assert _draws() and _own_init() is original


def test_an_exception_inside_still_restores():
    original = _own_init()
    with pytest.raises(RuntimeError), quiet_third_party():
        raise RuntimeError("boom")
    assert _own_init() is original and progress._quiet_depth == 0


def test_off_a_terminal_one_plain_line_per_stage(capsys):
    """pytest's stderr is no terminal; show_stage_lines is what the CLI calls."""
    progress.show_stage_lines()
    progress.show_stage_lines()  # again (the CLI's main may run twice): still one handler
    logging.getLogger("transformers.test").info("a third-party INFO line")
    with stages() as bars:
        task = bars.add_task("calibration pass", total=8)
        for _ in range(8):
            bars.advance(task)
        bars.add_task("skip each layer", total=4)
    with spinner("converting tiny.gguf"):
        pass
    stage_line("baseline perplexity")
    assert capsys.readouterr().err.splitlines() == [
        "calibration pass (8)", "skip each layer (4)", "converting tiny.gguf", "baseline perplexity"]


SMALL = ["--tokens", "1024", "--blocks", "2", "--block-len", "32", "--eval-tokens", "64", "--window", "32",
         "--no-speed"]  # fmt: skip


def test_cli_analyze_off_a_terminal_prints_its_stages(tmp_path):
    from kompakt.model.tiny import save_tiny

    save_tiny("llama", tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n\n".join(" ".join(["alpha beta gamma delta model"] * 8)
                                                   for _ in range(60)))  # fmt: skip
    args = ["analyze", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "o")]
    done = subprocess.run([sys.executable, "-m", "kompakt", *args, *SMALL], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    for stage in ("calibration pass (2)", "skip each layer (4)", "4-bit quantize each layer (4)",
                  "baseline perplexity", "writing analysis.json"):  # fmt: skip
        assert [line for line in lines if line.startswith(stage)], (stage, done.stderr[-2000:])
    assert "\r" not in done.stderr and not [line for line in lines if line.startswith("INFO")]
