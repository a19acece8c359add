"""`kompakt compress --target` end to end on a tiny model: plan, attempts, exports, the measured
side-by-side report (rendered by headless chromium when it is installed), the model card,
resume, `kompakt report`, and the bad inputs that must stop before any work."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest
import yaml

from kompakt.cli.app import main
from kompakt.model.tiny import save_tiny
from kompakt.auto.api import compress_auto
from kompakt.recipe.schema import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {"calibration_blocks": 8, "block_len": 64, "eval_tokens": 512, "window": 64, "stride": 64}
CHECK = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(i => i.complete ? i.naturalWidth : -1);
  document.body.setAttribute('data-check', JSON.stringify({tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tr').length, images}));
});</script>"""


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the kompakt CLI in-process: (exit code, stdout + stderr with line wraps joined)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("auto") / "tiny-llama"
    save_tiny("llama", directory)
    return directory


@pytest.fixture(scope="module")
def text(laptop_text):
    return laptop_text


@pytest.fixture(scope="module")
def run(tiny, text, tmp_path_factory):
    """One run for the module, under umask 022 (the usual one: files 0644, directories 0755)."""
    out = tmp_path_factory.mktemp("runs") / "auto"
    previous = os.umask(0o022)
    try:
        result = compress_auto(str(tiny), target="size=2x,max-kl=1.0", data=str(text), out=out, data_sizes=SIZES)
    finally:
        os.umask(previous)
    return out, result


def test_run_meets_a_reachable_target_and_exports(run):
    out, result = run
    assert result.final is not None and (out / "final").exists()
    assert result.outcomes[-1]["status"] == "within floor"
    gguf = out / "export" / "model.gguf"
    assert gguf.is_file() and (out / "export" / "model.gguf.sha256").is_file()
    comparison = json.loads((out / "comparison.json").read_text())
    original, small = comparison["values"]["size_bytes"]
    assert original / small >= 2.0  # the target, measured on the written GGUF
    assert comparison["values"]["generate_tps"][1] > 0  # the GGUF ran in llama.cpp (or transformers)
    assert len(comparison["samples"]) == 3 and all(s["result"] is not None for s in comparison["samples"])
    exports = json.loads((out / "exports.json").read_text())  # both files reloaded in their runtime
    assert exports["gguf_check"].startswith("passed") and exports["hf_check"].startswith("passed")
    assert (out / "export" / "model.gguf.verify.json").is_file() and "gguf_check" in (out / "report.md").read_text()
    # each tensor's type, grouped, in the report and the model card
    assert exports["gguf_tensor_types"].startswith(("q4_0:", "q8_0:")) and "tensors" in exports["gguf_tensor_types"]
    assert exports["gguf_tensor_types"] in (out / "report.md").read_text()
    card = (out / "export" / "hf" / "README.md").read_text()
    assert "## GGUF tensor types" in card and exports["gguf_tensor_types"] in card


def test_every_file_written_follows_the_umask(run):
    """A server running as another user (Ollama's service user, a container) can read everything
    the run wrote: files 0644 and directories 0755 under umask 022, as open() and mkdir give."""
    out, _ = run
    wanted = ["plan.json", "recipe.yaml", "export/hf/model.safetensors", "export/hf/README.md", "export/model.gguf",
              "report.html", "report.md", "report.json", "attempts/1/report.md", "attempts/1/lineage.jsonl"]  # fmt: skip
    assert all((out / name).is_file() for name in wanted), [n for n in wanted if not (out / n).is_file()]
    wrong = []
    for path in [out, *out.rglob("*")]:
        if path.is_symlink():
            continue
        mode, expected = stat.S_IMODE(path.stat().st_mode), 0o755 if path.is_dir() else 0o644
        if mode != expected:
            wrong.append(f"{path.relative_to(out)}: {mode:o}")
    assert not wrong, wrong


def test_recipe_written_is_the_one_that_ran_and_validates(run):
    out, _ = run
    recipe = Recipe.from_file(out / "recipe.yaml").validate()
    assert [s.name for s in recipe.steps][-1] == "quant.gptq"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["choices"] and plan["attempts"]


def test_report_files_and_model_card(run):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    kl = report["comparison"]["values"]["kl_mean"]
    assert kl[0] == 0.0 and kl[1] > 0 and kl[1] == pytest.approx(report["trajectory"][-1]["kl"])  # the final step's
    markdown = (out / "report.md").read_text()
    for label in ("size on disk", "peak memory while generating", "hardware needed", "generation speed",
                  "energy per 1k generated tokens (estimate)", "Trajectory", "Recipe"):
        assert label in markdown
    card = (out / "export" / "hf" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "quantized" and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation" and "kompakt" in front["tags"]
    assert "| size on disk |" in card
    assert front["base_model"] == "tiny-llama" and str(out.parent.parent) not in card  # no local path is shared


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (make setup installs it)")
def test_html_renders_tables_and_images_in_headless_chromium(run, tmp_path):
    out, _ = run
    page = tmp_path / "check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    marker = done.stdout.split('data-check="', 1)[1].split('"', 1)[0].replace("&quot;", '"')
    check = json.loads(marker)
    assert check["tables"] >= 3 and check["rows"] >= 15
    assert check["images"] and all(width > 0 for width in check["images"])


def test_rerun_resumes_and_report_rebuilds(run, tiny, text, capsys):
    out, first = run
    again = compress_auto(str(tiny), target="size=2x,max-kl=1.0", data=str(text), out=out, data_sizes=SIZES)
    lineage = (out / "attempts" / "1" / "lineage.jsonl").read_text().splitlines()
    assert len(lineage) == len(first.plan.attempts[0].steps)  # nothing ran twice
    (out / "report.html").unlink()
    code, output = cli(capsys, "report", str(out))
    assert code == 0 and (out / "report.html").is_file() and "report.html" in output
    assert again.final is not None


def test_a_failed_export_check_is_reported_then_raised(run, tiny, text, tmp_path, monkeypatch):
    """The run's report and exports.json show the failed check before the one-line error."""
    from kompakt.auto import deliver
    from kompakt.export.check import ExportCheckError

    out = tmp_path / "copy"
    shutil.copytree(run[0], out, symlinks=True)  # a rerun: the steps are reused, the export is redone
    copy = shutil.copytree

    def copy_and_corrupt(source, destination, **kwargs):
        copied = copy(source, destination, **kwargs)
        save_tiny("llama", destination, seed=1)  # the export now holds another model's weights
        return copied

    monkeypatch.setattr(deliver.shutil, "copytree", copy_and_corrupt)
    with pytest.raises(ExportCheckError, match="does not work in transformers") as failure:
        compress_auto(str(tiny), target="size=2x,max-kl=1.0", data=str(text), out=out, data_sizes=SIZES)
    assert "\n" not in str(failure.value) and "hf.rejected" in str(failure.value)
    exports = json.loads((out / "exports.json").read_text())
    assert exports["hf_check"].startswith("FAILED") and exports["hf"].endswith("hf.rejected")
    assert "hf_check: `FAILED" in (out / "report.md").read_text() and (out / "outcome.json").is_file()
    assert not (out / "comparison.json").exists() and not (out / "export" / "hf").exists()


def test_plan_only_writes_the_recipe_and_runs_nothing(tiny, text, tmp_path):
    result = compress_auto(str(tiny), target="size=2x", data=str(text), out=tmp_path / "p", plan_only=True,
                           data_sizes=SIZES)  # fmt: skip
    assert (tmp_path / "p" / "recipe.yaml").is_file() and not (tmp_path / "p" / "attempts").exists()
    assert result.plan.attempts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "size=1000x"], "cannot be met in principle"),
        (["--target", "smaller please"], "expected key=value"),
        (["--target", "max-kl=0"], "violated by the original against itself"),
        (["--budget", "1s"], "--budget 1 s is too small to run even the first step"),
    ],
)
def test_bad_input_stops_before_work(tiny, text, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code, output = cli(capsys, "compress", str(tiny), "--data", str(text), "--out", str(out), *args)
    assert code == 2 and message in output, output
    assert not (out / "analysis").exists()


def test_run_dir_of_another_model_is_refused(run, text, tmp_path, capsys):
    out, _ = run
    other = tmp_path / "other"
    save_tiny("qwen2", other)
    code, output = cli(capsys, "compress", str(other), "--target", "size=2x,max-kl=1.0", "--data", str(text), "--out", str(out))
    assert code == 2 and "another model" in output, output


def test_when_every_attempt_crosses_the_floor_the_closest_is_kept(tmp_path):
    from kompakt.auto.api import AutoResult, _keep_closest

    outcomes = []
    for attempt, kl in ((1, 2.5), (2, 3.2)):
        run_dir = tmp_path / str(attempt)
        run_dir.mkdir()
        record = {"index": 1, "dir": f"steps/01-x{attempt}", "metrics": {"kl_mean": kl, "ppl_ratio": 9.0}}
        (run_dir / "lineage.jsonl").write_text(json.dumps(record) + "\n")
        outcomes.append({"attempt": attempt, "label": str(attempt), "run_dir": str(run_dir), "status": "floor crossed"})
    result = AutoResult(tmp_path, plan=None, outcomes=outcomes)
    _keep_closest(result)
    assert result.attempt == 0 and result.final.name == "01-x1"
    assert outcomes[0]["status"].startswith("kept although") and outcomes[1]["status"] == "floor crossed"


def test_every_attempt_has_predicted_beside_measured_kl_and_bytes(run):
    out, result = run
    outcomes = json.loads((out / "outcome.json").read_text())["outcomes"]
    delivered = next(o for o in outcomes if o["attempt"] == result.attempt + 1)
    assert delivered["finished"] and delivered["predicted_kl"] is not None and delivered["measured_kl"] is not None
    assert delivered["measured_bytes"] == (out / "export" / "model.gguf").stat().st_size
    # planned on the original, written from out/export/hf: only the name / source strings differ
    assert abs(delivered["predicted_bytes"] - delivered["measured_bytes"]) <= 512
    markdown = (out / "report.md").read_text()
    assert "## Attempts: predicted vs measured KL and bytes" in markdown
    assert f"| {delivered['measured_kl']:.3f} |" in markdown and "top-1024 tokens plus the rest" in markdown
