"""After every export, prove the file works: reload it in the runtime it was made for, run a short
greedy generation and compare its next-token predictions with the model it came from.

    check = check_export(loaded, "small.gguf", format="gguf", type="q4_0")   # raises when it fails

- GGUF: llama.cpp (llama-cpp-python; not checked, with the reason, when it is not installed).
- Hugging Face directory: plain `transformers` (AutoModelForCausalLM / AutoTokenizer).
- Ollama: the Modelfile parsed (kompakt.export.modelfile_check), then its GGUF in llama.cpp.

The check feeds the same token ids to both models (HELD_OUT, a few short texts no calibration
set contains) and counts the positions where their top-1 next tokens agree; the runtime's own
tokenizer must split the texts as the original's does. It fails when the agreement is below
MIN_TOP1[type], the tokenization differs, the runtime cannot load or run the file, or the
Modelfile is invalid. A sentence encoder's GGUF is checked by its embeddings instead
(kompakt.export.check_embed: cosine to kompakt's own, MIN_COSINE[type]). A check that could not run (no llama-cpp-python) neither passes nor
fails: `passed` is None and `skipped` says why.

`kompakt export` checks the new file before it replaces anything (kompakt.export.staging); a
failed export is renamed `<name>.rejected` (its sha256 manifest is dropped) and a one-line
ExportCheckError (exit 2) names it; `--no-verify` skips the check. The result ships with the
export, without local paths: `<file>.verify.json` beside a GGUF file, `kompakt-verify.json`
inside a Hugging Face directory, `model.gguf.verify.json` in an Ollama directory (both listed
in the directory's SHA256SUMS).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kompakt.atomic import write_text
from kompakt.errors import KompaktError
from kompakt.export.check_runtimes import Answer, RuntimeFailure, predict, run_llamacpp, run_transformers
from kompakt.export.staging import REJECTED, move_replacing
from kompakt.model.loaded import LoadedModel

log = logging.getLogger(__name__)

# Short held-out texts: prose, numbers, code, a list. 4 x at most MAX_TOKENS positions keeps the
# check well under a second on the tiny test models and a few seconds on SmolLM2-135M. No runs of
# spaces: a tokenizer without BPE merges (the tiny test models') gets the merge "Ġ Ġ" in GGUF, a
# known and noted difference (kompakt.export.gguf_tokenizer) the check would otherwise fail on.
HELD_OUT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships. "
    "In winter the storms were so strong that the whole tower shook.",
    "Water boils at 100 degrees Celsius at sea level, but at a lower temperature high on a mountain, "
    "because the air pressure there is lower.",
    "def area(width, height):\n\treturn width * height\n\nfor size in (2, 3, 4):\n\tprint(size, area(size, 10))\n",
    "Shopping list for Saturday: eggs, flour, two lemons, a bag of rice, fresh basil from the market "
    "and something sweet for the children.",
    "She opened the letter slowly. It was from her brother, who had moved to Canada ten years ago "
    "and had not written since.",
    "To reset the router, unplug it for thirty seconds, plug it back in and wait until the green light "
    "stops blinking.",
)
PROMPT = "The capital of France is"
MAX_TOKENS = 48
NEW_TOKENS = 16

# Lowest top-1 agreement with the original that passes, per type. Measured on the 7 tiny random
# families (288 positions) and SmolLM2-135M-Instruct (185 positions), in llama.cpp for GGUF and
# transformers for hf; lowest correct export of each type (README, "Export"):
#   f32 1.000, f16 0.997, bf16 0.976, q8_0 0.951 (SmolLM2), q4_1 0.611 and q4_0 0.535 (tiny
#   gemma2; SmolLM2 0.962 and 0.676); q5_1 0.715, iq4_nl 0.628, q5_0 0.622 (tiny gemma2).
# Each floor sits below that with room for other models and far above a broken export (a
# scrambled output matrix: 0 %; a tiny llama against another seed's weights: 5.6 %). Tiny random models have
# nearly flat next-token distributions, so a 4-bit grid flips many near-ties: they set the low end.
MIN_TOP1 = {"f32": 0.95, "f16": 0.9, "bf16": 0.85, "q8_0": 0.8, "q5_1": 0.5, "q5_0": 0.45, "q4_1": 0.45,
            "iq4_nl": 0.45, "q4_0": 0.4,
            # K-quants: the floor of the 32-block type with as many bits or fewer (the tiny
            # models' 64-wide rows cannot hold 256-weight super-blocks, so none was measured there)
            "q6_k": 0.5, "q5_k": 0.45, "q4_k": 0.4, "q3_k": 0.3, "q2_k": 0.2}  # fmt: skip
VERIFY_FILE = "kompakt-verify.json"  # inside a Hugging Face directory (ships with it)


class ExportCheckError(KompaktError):
    """The exported file does not load or does not agree with its original in its runtime."""

    def __init__(self, message: str, check: ExportCheck | None = None) -> None:
        super().__init__(message)
        self.check = check  # what the check found (a caller records it before raising again)


@dataclass
class ExportCheck:
    """What the check found (written as verify.json and shown by the CLI and the report)."""

    format: str
    type: str
    runtime: str
    file: str  # the checked file's name (never a path: this ships with the export)
    top1: float | None = None  # agreement of next-token predictions with the original
    tokens: int = 0  # positions compared
    threshold: float | None = None
    tokenization: str = ""  # "same" or which texts split differently
    prompt: str = PROMPT
    sample: str = ""  # the runtime's greedy continuation of the prompt
    sample_agrees: int = 0  # leading greedy tokens equal to the original's
    sample_tokens: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # why it failed; [] = passed (or skipped)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the runtime check did not run (e.g. llama-cpp-python not installed)
    cosine: float | None = None  # encoders: mean cosine of the runtime's embeddings to the original's
    cosine_min: float | None = None  # encoders: the lowest (what the threshold applies to)
    sentences: int = 0  # encoders: sentences compared

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    @property
    def passed(self) -> bool | None:
        """True or False; None when the runtime check did not run (nothing was proven)."""
        return False if self.problems else None if self.skipped else True

    def line(self) -> str:
        """One line for the CLI and the report."""
        if self.skipped and not self.problems:
            return f"not checked: {self.skipped}"
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.problems)
        if self.cosine is not None:
            floor = f" (floor {self.threshold} for {self.type})" if self.threshold is not None else ""
            return (f"{verdict}: {self.runtime}, embedding cosine mean {self.cosine:.5f}, min {self.cosine_min:.5f} "
                    f"over {self.sentences} sentences{floor}")  # fmt: skip
        agreement = f"top-1 agreement {self.top1:.1%} over {self.tokens} tokens" if self.top1 is not None else ""
        floor = f" (floor {self.threshold:.0%} for {self.type})" if self.threshold is not None else ""
        sample = f"; greedy sample {self.sample!r}" if self.sample else ""
        return f"{verdict}: {self.runtime}, {agreement}{floor}{sample}"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _canonical_type(type: str) -> str:
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(type, type)


def check_export(reference: LoadedModel, path: str | Path, *, format: str, type: str,
                 written: list[Path] | None = None) -> ExportCheck:  # fmt: skip
    """Check the export at `path` against `reference` in place; record the result (verify.json)
    and return it, or reject the export (`written`: the paths it wrote, default [path]) and raise.

    Raises:
        ExportCheckError: the export failed the check (one line; the files were renamed).
    """
    path = Path(path)
    check = run_check(reference, path, format=format, type=type)
    if check.failed:
        raise check_error(check, reject(written or [path])[0])
    record_check(check, path, format)
    return check


def run_check(reference: LoadedModel, path: Path, *, format: str, type: str) -> ExportCheck:
    """The check of the export at `path`, with nothing written, moved or raised."""
    from kompakt.export.modelfile_check import check_modelfile

    started = time.perf_counter()
    checked = path / "model.gguf" if format == "ollama" else path
    check = ExportCheck(format, _canonical_type(type), "", checked.name, threshold=MIN_TOP1.get(_canonical_type(type)))
    if format == "ollama":
        check.problems += check_modelfile(path / "Modelfile", checked)
    if format in ("gguf", "ollama") and not llamacpp_installed():
        check.runtime, check.skipped = "llama.cpp", "llama-cpp-python is not installed (pip install 'kompakt[llamacpp]')"
    elif reference.is_encoder and format in ("gguf", "ollama"):
        from kompakt.export.check_embed import MIN_COSINE, compare_embeddings

        check.threshold = MIN_COSINE.get(check.type)
        compare_embeddings(reference, checked, check)
    elif reference.is_encoder and format == "hf":
        from kompakt.export.check_embed import MIN_COSINE, compare_hf_embeddings

        check.threshold = MIN_COSINE.get(check.type)
        compare_hf_embeddings(reference, checked, check)
    else:
        _compare(reference, checked, format, check)
    check.seconds = round(time.perf_counter() - started, 3)
    log.info("export check %s", check.line())
    return check


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_error(check: ExportCheck, moved: Path) -> ExportCheckError:
    """The one-line error of a failed check whose export now lies at `moved`."""
    message = (
        f"the export does not work in {check.runtime or check.format}: {'; '.join(check.problems)}; "
        f"moved to {moved} (`kompakt export --no-verify` keeps a file as written)"
    )
    return ExportCheckError(" ".join(message.split()), check)


def verify_path(path: Path, format: str) -> Path:
    """Where the result of checking the export at `path` is written: inside a directory, so it
    ships with it (and its SHA256SUMS lists it); beside a GGUF file."""
    if format == "hf":
        return path / VERIFY_FILE
    checked = path / "model.gguf" if format == "ollama" else path
    return checked.with_name(checked.name + ".verify.json")


def record_check(check: ExportCheck, path: Path, format: str) -> Path:
    """Write verify.json for the export at `path` (refreshing the directory's SHA256SUMS when it
    has one, so the manifest covers it); returns its path."""
    from kompakt.export.manifest import manifest_path, write_manifest

    target = verify_path(path, format)
    write_text(target, json.dumps(check.to_dict(), indent=1) + "\n")
    if format != "gguf" and manifest_path(path).is_file():
        write_manifest(path)
    return target


def _reference_inputs(reference: LoadedModel) -> tuple[list[list[int]], list[int], list[list[int]]]:
    tokenizer = reference.tokenizer
    expected = [tokenizer(text)["input_ids"] for text in HELD_OUT]
    return [ids[:MAX_TOKENS] for ids in expected], tokenizer(PROMPT)["input_ids"], expected


def _compare(reference: LoadedModel, checked: Path, format: str, check: ExportCheck) -> None:
    sequences, prompt, expected = _reference_inputs(reference)
    want_top1, want_greedy = predict(reference.model, sequences, prompt, NEW_TOKENS)
    runner = run_transformers if format == "hf" else run_llamacpp
    try:
        answer: Answer = runner(checked, sequences, prompt, NEW_TOKENS, list(HELD_OUT))
    except RuntimeFailure as failure:
        check.runtime = "transformers" if format == "hf" else "llama.cpp"
        check.problems.append(f"it does not load or run: {failure}")
        return
    check.runtime, check.sample, check.notes = answer.runtime, answer.sample.strip(), answer.notes
    pairs = [(a, b) for got, want in zip(answer.top1, want_top1) for a, b in zip(got, want)]
    check.tokens = len(pairs)
    check.top1 = round(sum(a == b for a, b in pairs) / max(1, len(pairs)), 4)
    check.sample_tokens = len(want_greedy)
    check.sample_agrees = next((i for i, (a, b) in enumerate(zip(answer.greedy, want_greedy)) if a != b), len(want_greedy))
    differs = [str(i + 1) for i, (got, want) in enumerate(zip(answer.tokens, expected)) if got != want]
    check.tokenization = "same" if not differs else f"differs on text {', '.join(differs)} of {len(expected)}"
    if differs:
        check.problems.append(f"its tokenizer splits held-out text {', '.join(differs)} differently")
    if check.threshold is not None and check.top1 < check.threshold:
        check.problems.append(f"top-1 agreement {check.top1:.1%} < {check.threshold:.0%} over {check.tokens} tokens")


def reject(paths: list[Path], into: Path | None = None) -> list[Path]:
    """Rename each written file or directory to `<name>.rejected`, beside it or in `into` (a
    staged export: its destination), replacing an older one, file or directory; remove sha256
    manifests, which would vouch for a rejected file. Returns the new paths."""
    from kompakt.export.manifest import DIRECTORY_MANIFEST

    moved = []
    for path in paths:
        if not path.exists():
            continue
        if path.name.endswith(".sha256") or path.name == DIRECTORY_MANIFEST:
            path.unlink()
            continue
        target = move_replacing(path, (into or path.parent) / (path.name + REJECTED))
        if target.is_dir():
            (target / DIRECTORY_MANIFEST).unlink(missing_ok=True)
        moved.append(target)
    return moved or paths


def check_run_exports(exports: dict[str, str],
                      reference: LoadedModel) -> tuple[dict[str, str], ExportCheckError | None]:  # fmt: skip
    """Check `compress --target`'s exports (the hf directory and the GGUF, as deliver wrote them)
    against `reference`, the run's final model (never the export itself, which would agree with
    itself). Returns ({"hf_check": line, "gguf_check": line}, the first failure or None); a failed
    export is renamed `<name>.rejected` and its entry in the returned lines points there, so the
    caller can record and report the failure before raising it."""
    from kompakt.export.manifest import manifest_path

    lines: dict[str, str] = {}
    failure: ExportCheckError | None = None
    hf = Path(exports["hf"])
    items = [("hf", hf, str(reference.storage_dtype).removeprefix("torch."), [hf])]
    if "gguf" in exports:
        gguf = Path(exports["gguf"])
        items.append(("gguf", gguf, exports["gguf_type"], [gguf, manifest_path(gguf)]))
    for kind, path, type, written in items:
        try:
            lines[f"{kind}_check"] = check_export(reference, path, format=kind, type=type, written=written).line()
        except ExportCheckError as error:
            lines[f"{kind}_check"] = error.check.line() if error.check else str(error)
            lines[kind] = str(path.with_name(path.name + REJECTED))
            failure = failure or error
    return lines, failure
