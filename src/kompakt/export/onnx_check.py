"""After an ONNX export, prove it: run the directory in onnxruntime with its own tokenizer and
compare the sentence embeddings with kompakt's embed() of the model it came from.

    check = check_onnx(loaded, "enc-onnx", type="f32")      # an OnnxCheck; .failed says whether it agrees

- f32 must agree within MAX_ABS_F32 (largest absolute difference of any embedding component,
  token embeddings of real positions included): the graph is the model, so anything more is a
  bug in the export, and the export is refused.
- int8 reports its mean and lowest cosine to the original's embeddings; below MIN_COSINE_INT8
  it is refused (a broken quantization, not a lossy one).
- The exported tokenizer must give the same token ids as the model's own, or users feeding it
  would get other embeddings.

The sentences are CHECK_SENTENCES: short and long, prose, numbers, code, one longer than any
encoder's position limit, so the truncation rule (min(max_seq_length, position limit) tokens,
kompakt.model.encode) is part of what is checked.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from kompakt.model.loaded import LoadedModel

MAX_ABS_F32 = 1e-4
# Lowest mean int8 cosine (over CHECK_SENTENCES) that passes. Measured, per-channel int8:
# all-MiniLM-L6-v2 0.990 here (lowest sentence 0.964, the two-letter "ok") and 0.993 over 256
# WikiText-2 sentences (bench/onnx_int8.py); the five tiny random encoders 0.9999 and above.
# A broken export lands far below: a tiny bert (roberta) int8 graph against another seed gives 0.14 (0.04).
MIN_COSINE_INT8 = 0.9
LONG = " ".join(["The committee met again on Thursday to discuss the budget for the next year."] * 80)
CHECK_SENTENCES = (
    "A man is playing a guitar on the street.",
    "Water boils at 100 degrees Celsius at sea level.",
    "def area(width, height): return width * height",
    "She opened the letter slowly; it was from her brother in Canada.",
    "To reset the router, unplug it for thirty seconds and wait until the light stops blinking.",
    "ok",
    "Search engines rank documents by how close their embeddings are to the query's embedding.",
    LONG,
)


@dataclasses.dataclass
class OnnxCheck:
    """What the check found (kompakt-verify.json in the export, one line in the CLI)."""

    format: str
    type: str
    runtime: str
    file: str
    sentences: int = 0
    max_abs: float | None = None  # f32: largest |onnx - kompakt| over embeddings and token embeddings
    threshold: float | None = None  # f32: MAX_ABS_F32; int8: MIN_COSINE_INT8
    mean_cosine: float | None = None
    min_cosine: float | None = None
    tokenization: str = ""
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None  # never set: onnxruntime is what the export needs anyway

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    @property
    def passed(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.problems)
        cosine = ""
        if self.mean_cosine is not None:
            cosine = f"mean cosine {self.mean_cosine:.4f} (lowest {self.min_cosine:.4f})"
        limit = ""
        if self.max_abs is not None:
            limit = f", max |diff| {self.max_abs:.1e} (limit {self.threshold:.0e})"
        elif self.threshold is not None:
            limit = f" (floor {self.threshold} for int8)"
        return f"{verdict}: {self.runtime}, {self.sentences} sentences, {cosine}{limit}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def check_onnx(reference: LoadedModel, directory: str | Path, *, type: str) -> OnnxCheck:
    """Compare the exported `directory` with `reference` on CHECK_SENTENCES; nothing is written."""
    import onnxruntime

    from kompakt.export.onnx import MODEL_FILE, OUTPUTS

    started = time.perf_counter()
    directory = Path(directory)
    check = OnnxCheck("onnx", type, f"onnxruntime {onnxruntime.__version__}", MODEL_FILE, len(CHECK_SENTENCES),
                      threshold=MAX_ABS_F32 if type == "f32" else MIN_COSINE_INT8)  # fmt: skip
    sentences = list(CHECK_SENTENCES)
    try:
        runner = session(directory / MODEL_FILE)
        feeds, same_ids = _feeds(reference, directory, runner, sentences)
        embedding, hidden = runner.run(list(OUTPUTS), feeds)
    except Exception as error:  # noqa: BLE001 - whatever onnxruntime or the tokenizer says is the finding
        check.problems.append(f"it does not load or run: {' '.join(str(error).split())[:300]}")
        return check
    check.tokenization = "same" if same_ids else "differs"
    if not same_ids:
        check.problems.append("its tokenizer gives other token ids than the model's own")
    want_embedding, want_hidden = _reference(reference, sentences, feeds)
    cosine = _cosine(embedding, want_embedding)
    check.mean_cosine, check.min_cosine = round(float(cosine.mean()), 6), round(float(cosine.min()), 6)
    if type == "f32":
        mask = feeds["attention_mask"].astype(bool)
        diff = max(np.abs(embedding - want_embedding).max(), np.abs(hidden[mask] - want_hidden[mask]).max())
        check.max_abs = float(diff)
        if diff > MAX_ABS_F32:
            check.problems.append(f"its embeddings differ from the model's by up to {diff:.2e} "
                                  f"(limit {MAX_ABS_F32:.0e})")  # fmt: skip
    elif check.mean_cosine < MIN_COSINE_INT8:
        check.problems.append(f"mean cosine to the model's embeddings {check.mean_cosine:.4f} < {MIN_COSINE_INT8}")
    check.seconds = round(time.perf_counter() - started, 3)
    return check


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (`threads` intra-op threads; None = onnxruntime's choice)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its warnings about unused initializers are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(reference: LoadedModel, directory: Path, runner, sentences: list[str]) -> tuple[dict, bool]:
    """The exported tokenizer's arrays for the session's inputs, and whether its ids equal the model's."""
    from transformers import AutoTokenizer

    from kompakt.model.encode import tokenize

    exported = AutoTokenizer.from_pretrained(directory)
    ours = tokenize(reference, sentences)
    theirs = tokenize(dataclasses.replace(reference, tokenizer=exported), sentences)
    ids, want = theirs["input_ids"], ours["input_ids"]
    same = ids.shape == want.shape and bool((ids == want).all())
    arrays = {key: value.cpu().numpy() for key, value in theirs.items()}
    zeros = np.zeros_like(arrays["input_ids"])  # token_type_ids the tokenizer leaves out: segment 0
    return {i.name: arrays.get(i.name, zeros) for i in runner.get_inputs()}, same


def _reference(reference: LoadedModel, sentences: list[str], feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    """kompakt's embed() of the sentences (its own tokenization and batching) and the encoder's
    token embeddings for the same arrays the session got, in float32."""
    import torch

    from kompakt.model.encode import embed

    inputs = {name: torch.from_numpy(array).to(reference.device) for name, array in feeds.items()}
    with torch.no_grad():
        hidden = reference.model(**inputs).last_hidden_state
    return embed(reference, sentences).float().cpu().numpy(), hidden.float().cpu().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
