"""After every export the file is reloaded in its runtime and compared with its original: a good
export passes and says so, a broken one is a one-line error (exit 2) and is renamed `.rejected`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kompakt.export.check as check_module
import kompakt.export.check_runtimes as runtimes
from kompakt.export.api import export
from kompakt.export.check import MIN_TOP1, ExportCheckError, check_export, reject
from kompakt.export.manifest import verify_manifest
from kompakt.export.modelfile_check import check_modelfile
from kompakt.model.load import load
from kompakt.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
llama_cpp = pytest.importorskip("llama_cpp")


def _run(argv, cli) -> tuple[int, str, str]:
    """The CLI's exit code, stdout with its line wrapping undone, stderr."""
    code, out, err = cli(argv)
    return code, " ".join(out.split()), err


def test_gguf_export_is_checked_in_llama_cpp(tiny_dir, cli):
    code, out, _ = _run(["export", str(tiny_dir), "--type", "q8_0", "--out", "t.gguf"], cli)
    assert code == 0 and "check: passed: llama.cpp" in out and "top-1 agreement" in out
    saved = json.loads((tiny_dir.parent / "t.gguf.verify.json").read_text())
    assert saved["passed"] and saved["top1"] >= MIN_TOP1["q8_0"] and saved["tokens"] > 100
    assert saved["tokenization"] == "same" and saved["file"] == "t.gguf" and saved["sample_tokens"] == 16
    assert str(tiny_dir.parent) not in json.dumps(saved)  # it ships beside the file


def _listed(manifest: Path) -> set[str]:
    return {line.split("  ", 1)[1] for line in manifest.read_text().splitlines() if line.strip()}


def test_hf_and_ollama_exports_are_checked(tiny_dir):
    """The result ships inside the export and its SHA256SUMS covers it."""
    hf = export(str(tiny_dir), format="hf", type="bf16", out="hf")
    assert hf.check.passed and hf.check.runtime.startswith("transformers") and hf.check.top1 >= MIN_TOP1["bf16"]
    assert json.loads((hf.path / "kompakt-verify.json").read_text())["passed"] is True
    assert "kompakt-verify.json" in _listed(hf.manifest) and verify_manifest(hf.path) == []
    assert not (tiny_dir.parent / "hf.verify.json").exists()
    (tiny_dir.parent / "ol").mkdir()
    (tiny_dir.parent / "ol" / "notes.txt").write_text("the user's own file")
    ollama = export(str(tiny_dir), format="ollama", type="q4_0", out="ol", force=True)  # into a directory of the user
    assert ollama.check.passed and ollama.check.runtime.startswith("llama.cpp")
    assert (tiny_dir.parent / "ol" / "model.gguf.verify.json").is_file()
    assert _listed(ollama.manifest) == {"model.gguf", "model.gguf.sha256", "Modelfile", "model.gguf.verify.json"}
    assert verify_manifest(ollama.path) == [] and (tiny_dir.parent / "ol" / "notes.txt").is_file()
    assert [p.name for p in tiny_dir.parent.iterdir() if p.name.endswith(".staged")] == []


def test_force_replaces_a_directory_export_whole(tiny_dir):
    export(str(tiny_dir), format="hf", type="f32", out="hf", verify=False)
    (tiny_dir.parent / "hf" / "stale.bin").write_bytes(b"old")
    again = export(str(tiny_dir), format="hf", type="f16", out="hf", force=True)
    assert again.check.passed and not (again.path / "stale.bin").exists() and verify_manifest(again.path) == []


def test_no_verify_skips_the_check(tiny_dir, cli):
    code, out, _ = _run(["export", str(tiny_dir), "--type", "f16", "--out", "n.gguf", "--no-verify"], cli)
    assert code == 0 and "check:" not in out and not (tiny_dir.parent / "n.gguf.verify.json").exists()


def _scramble_output_rows(monkeypatch):
    """Write the lm_head with its rows shuffled: a file that loads and talks nonsense."""
    import kompakt.export.gguf as gguf_module

    original = gguf_module.tensor_data

    def scrambled(item, tensor, *args):
        data, raw_type, missed = original(item, tensor, *args)
        if item.gguf_name == "output.weight":
            data = np.ascontiguousarray(data[np.random.default_rng(0).permutation(data.shape[0])])
        return data, raw_type, missed

    monkeypatch.setattr(gguf_module, "tensor_data", scrambled)


def test_broken_export_fails_in_one_line_and_is_renamed(tiny_dir, cli, monkeypatch):
    target = tiny_dir.parent / "bad.gguf"
    _scramble_output_rows(monkeypatch)
    code, _, err = _run(["export", str(tiny_dir), "--type", "f32", "--out", str(target)], cli)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not work in llama.cpp" in err and "top-1 agreement" in err and "--no-verify" in err
    assert not target.exists() and not (tiny_dir.parent / "bad.gguf.sha256").exists()
    assert (tiny_dir.parent / "bad.gguf.rejected").is_file()


def test_a_failed_check_with_force_keeps_the_previous_export(tiny_dir, cli, monkeypatch):
    """--force writes and checks the new file beside the old one: a broken one never replaces it."""
    target = tiny_dir.parent / "keep.gguf"
    code, _, _ = _run(["export", str(tiny_dir), "--type", "f32", "--out", str(target)], cli)
    assert code == 0
    names = ("keep.gguf", "keep.gguf.sha256", "keep.gguf.verify.json")
    before = {name: (tiny_dir.parent / name).read_bytes() for name in names}
    (tiny_dir.parent / "keep.gguf.rejected").mkdir()  # an older rejected export of another kind is replaced
    _scramble_output_rows(monkeypatch)
    code, _, err = _run(["export", str(tiny_dir), "--type", "f32", "--out", str(target), "--force"], cli)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "moved to" in err, err
    assert {name: (tiny_dir.parent / name).read_bytes() for name in before} == before
    assert verify_manifest(target) == [] and (tiny_dir.parent / "keep.gguf.rejected").is_file()
    assert {p.name for p in tiny_dir.parent.iterdir() if p.name.startswith("keep")} == {*before, "keep.gguf.rejected"}
    assert [p.name for p in tiny_dir.parent.iterdir() if p.name.endswith(".staged")] == []


def test_reject_replaces_an_older_rejected_file_or_directory(tmp_path):
    directory, file = tmp_path / "hf", tmp_path / "m.gguf"
    directory.mkdir()
    (directory / "SHA256SUMS").write_text("x")
    file.write_bytes(b"new")
    (tmp_path / "hf.rejected").write_text("an older rejected file")
    (tmp_path / "m.gguf.rejected").mkdir()
    assert reject([directory, file]) == [tmp_path / "hf.rejected", tmp_path / "m.gguf.rejected"]
    assert (tmp_path / "hf.rejected").is_dir() and not (tmp_path / "hf.rejected" / "SHA256SUMS").exists()
    assert (tmp_path / "m.gguf.rejected").read_bytes() == b"new"


def test_a_runtime_error_over_several_lines_is_one_line(tiny_dir):
    """transformers' message for an unknown model type spans lines: the error stays one line."""
    hf = export(str(tiny_dir), format="hf", type="f32", out="hf", verify=False).path
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))
    with pytest.raises(ExportCheckError, match="does not load or run") as failure:
        check_export(load(tiny_dir, device="cpu", dtype="float32"), hf, format="hf", type="f32")
    assert "\n" not in str(failure.value) and "Transformers does not recognize" in str(failure.value)
    assert failure.value.check is not None and failure.value.check.passed is False


def test_broken_agreement_is_far_below_every_floor(tmp_path):
    """A model checked against another (different weights) agrees on a few percent of tokens:
    the floors sit well above what a broken file gives."""
    path = export(tiny_model("llama", seed=0), format="gguf", type="f32", out=tmp_path / "a.gguf", verify=False).path
    with pytest.raises(ExportCheckError, match="top-1 agreement"):
        check_export(tiny_model("llama", seed=1), path, format="gguf", type="f32")
    assert (tmp_path / "a.gguf.rejected").is_file()


def test_tokenizer_difference_fails_the_check(tmp_path, monkeypatch):
    """The GGUF of a merge-less tokenizer turns double spaces into one token (a noted difference):
    a held-out text with a run of spaces shows the check compares tokenization."""
    monkeypatch.setattr(check_module, "HELD_OUT", (*check_module.HELD_OUT, "four    spaces"))
    loaded = tiny_model("llama")
    with pytest.raises(ExportCheckError, match="tokenizer splits held-out text 7 differently"):
        export(loaded, format="gguf", type="f32", out=tmp_path / "t.gguf")


def _fake_worker(tmp_path: Path, body: str) -> Path:
    worker = tmp_path / "worker.py"
    head = "import io, json, os, signal, sys\ndata = sys.stdin.read()\nrequest = json.loads(data)\nsys.stdin = io.StringIO(data)\n"
    worker.write_text(head + body)
    return worker


def test_llama_cpp_crash_is_one_line_and_retried_without_repack(tmp_path, monkeypatch):
    path = export(tiny_model("llama"), format="gguf", type="f32", out=tmp_path / "c.gguf", verify=False).path
    real = runtimes.WORKER
    # Crashes unless run with --no-repack (as llama.cpp's AMX matmul does on some machines).
    crash_by_default = "if not request['no_repack']:\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    monkeypatch.setattr(runtimes, "WORKER", _fake_worker(tmp_path, crash_by_default + f"exec(open({str(real)!r}).read())\n"))
    monkeypatch.setattr(runtimes, "_crashes_by_default", False)
    check = check_export(tiny_model("llama"), path, format="gguf", type="f32")
    assert check.passed and "--no-repack" in check.notes[0] and "SIGSEGV" in check.notes[0]
    monkeypatch.setattr(runtimes, "WORKER", _fake_worker(tmp_path, "os.kill(os.getpid(), signal.SIGSEGV)\n"))
    with pytest.raises(ExportCheckError, match="crashed \\(SIGSEGV\\)") as failure:
        check_export(tiny_model("llama"), path, format="gguf", type="f32")
    assert "\n" not in str(failure.value)


MODELFILE = 'FROM ./model.gguf\n\nTEMPLATE """{{- range .Messages }}{{ .Content }}\n{{ end }}"""\n\nPARAMETER stop "<|im_end|>"\n'


@pytest.mark.parametrize(
    "text, problem",
    [
        (MODELFILE, None),
        (MODELFILE.replace("FROM ./model.gguf", "FROM ./other.gguf"), "does not point at model.gguf"),
        (MODELFILE.replace("FROM ./model.gguf\n", ""), "0 FROM lines"),
        (MODELFILE.replace("{{ end }}", ""), "opens 1 range/if/with blocks but ends 0"),
        (MODELFILE.replace("}}\n", "\n", 1), "unbalanced"),
        (MODELFILE + "PARAMETER temperature warm\n", "needs a number"),
        (MODELFILE + "PARAMETER colour 1\n", "unknown PARAMETER"),
        (MODELFILE + "SYSTEM \"\"\"never closed\n", "not closed"),
        (MODELFILE + "RUN something\n", "unknown Modelfile instruction"),
    ],
)
def test_modelfile_check(tmp_path, text, problem):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "Modelfile").write_text(text)
    problems = check_modelfile(tmp_path / "Modelfile", tmp_path / "model.gguf")
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_the_ollama_modelfile_kompakt_writes_is_valid(tmp_path):
    from kompakt.export.ollama import modelfile_text, ollama_template
    from kompakt.model.tiny import CHATML_TEMPLATE

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for template in (CHATML_TEMPLATE, None, "<start_of_turn>", "<|start_header_id|>", "<|assistant|>", "[INST]"):
        (tmp_path / "Modelfile").write_text(modelfile_text("model.gguf", ollama_template(template)))
        assert check_modelfile(tmp_path / "Modelfile", tmp_path / "model.gguf") == []


@pytest.mark.slow
@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_smollm2_exports_pass_their_floor(type, tmp_path):
    from kompakt.model.load import load

    loaded = load("smollm2-135m", device="cpu", dtype="float32")
    check = export(loaded, format="gguf", type=type, out=tmp_path / f"s-{type}.gguf").check
    assert check.passed and check.top1 >= MIN_TOP1[type] and check.tokens > 150
    assert check.sample  # the greedy continuation decodes to text
