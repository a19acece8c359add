"""The export check of a sentence encoder: the GGUF's embeddings in llama.cpp against kompakt's.

A few held-out sentences (SENTENCES: prose, a question, numbers, punctuation, capitals and an
accent, none from any calibration or distillation set) are embedded by llama.cpp
(llama-cpp-python `Llama(path, embedding=True)` with the pooling the file declares, in a child
process: kompakt.export.check_runtimes) and by `kompakt.model.encode.embed` on the model the file
was written from. Both are L2-normalised before comparing — llama.cpp pools without normalising
unless asked (`embed(normalize=True)`), sentence-transformers normalises when the model's
pipeline says so — so the cosine of each pair is the measure. The check fails when the lowest
cosine is below MIN_COSINE[type], when llama.cpp splits a sentence into other tokens than the
Hugging Face tokenizer, or when llama.cpp cannot load or run the file. A sentence longer than
the model's input limit (kompakt.model.encode.input_limit) is left out: kompakt truncates it and
llama.cpp would not, so they would embed different text.

A Hugging Face directory of an encoder is checked the same way in sentence-transformers
(`SentenceTransformer(dir)`, as a user loads it; skipped, with the reason, when it is not installed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kompakt.export.check_runtimes import RuntimeFailure, ask_llamacpp

SENTENCES = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp.",
    "How long does it take to boil an egg at the top of a mountain?",
    "Shopping list: eggs, flour, 2 lemons and a bag of rice (about 1.5 kg).",
    "She opened the letter slowly; it was from her brother in Canada.",
    "Unplug the router for thirty seconds, then plug it back in.",
    "The cafe on Main Street serves the best coffee in TOWN!",
    "Gradient descent updates each weight against the slope of the loss.",
    "Cats sleep for most of the day and hunt at night.",
)
# Lowest cosine to kompakt's embeddings that passes (the minimum over SENTENCES), per type.
# Measured on all-MiniLM-L6-v2, SENTENCES (mean / min): f16 0.999999 / 0.999999, q8_0 0.99967 /
# 0.99961, q4_0 0.972 / 0.963; over 256 WikiText-2 sentences (bench/encoder_gguf.py, mean / p5 /
# min): q8_0 0.9996 / 0.9995 / 0.9983, q4_0 0.968 / 0.959 / 0.897. The tiny random encoders of
# every family: f16 >= 0.99999. 0.99 is the floor for f16 / q8_0; grids of 6 bits and
# fewer written from float weights lose more by design (compared with the float model they came
# from), so their floors sit below what was measured, with room for other models, and above a
# broken file (another model's weights: < 0.9 on the tiny encoders, far lower on real ones). A
# model a quant pass put on the grid is compared with its own on-grid weights and lands near 1.
MIN_COSINE = {"f32": 0.99, "f16": 0.99, "bf16": 0.99, "q8_0": 0.99, "q6_k": 0.97, "q5_1": 0.95, "q5_0": 0.95,
              "q5_k": 0.95, "q4_1": 0.9, "q4_0": 0.9, "iq4_nl": 0.9, "q4_k": 0.9, "q3_k": 0.8,
              "q2_k": 0.6}  # fmt: skip


def sentences_for(reference) -> list[str]:
    """The SENTENCES that fit the model's input limit untruncated (special tokens included)."""
    from kompakt.model.encode import input_limit

    limit = input_limit(reference)
    return [text for text in SENTENCES if len(reference.tokenizer(text)["input_ids"]) <= limit]


def compare_embeddings(reference, checked: Path, check) -> None:
    """Fill `check` (kompakt.export.check.ExportCheck) with the cosine of llama.cpp's embeddings of
    the file at `checked` to `embed(reference)`, and the problems found (module docstring)."""
    from kompakt.model.encode import embed

    check.runtime = "llama.cpp"
    texts = sentences_for(reference)
    if not texts:
        check.skipped = "the model's input limit is shorter than every check sentence"
        return
    expected = [reference.tokenizer(text)["input_ids"] for text in texts]
    longest = max(len(ids) for ids in expected)
    request = {"embed": True, "path": str(checked), "texts": texts, "n_ctx": 64 * (longest // 64 + 1)}
    try:
        answer, check.notes = ask_llamacpp(request)
    except RuntimeFailure as failure:
        check.problems.append(f"it does not load or run: {failure}")
        return
    check.runtime = f"llama.cpp (llama-cpp-python {answer['version']})"
    got = torch.nn.functional.normalize(torch.tensor(answer["embeddings"], dtype=torch.float32), dim=-1)
    want = torch.nn.functional.normalize(embed(reference, texts).float(), dim=-1)
    if got.shape != want.shape:
        check.problems.append(f"it embeds into {tuple(got.shape)[1:]} dimensions, the model into {want.shape[1]}")
        return
    cosines = (got * want).sum(-1)
    check.sentences = len(texts)
    check.cosine, check.cosine_min = round(float(cosines.mean()), 6), round(float(cosines.min()), 6)
    differs = [str(i + 1) for i, (a, b) in enumerate(zip(answer["tokens"], expected)) if a != b]
    check.tokenization = "same" if not differs else f"differs on sentence {', '.join(differs)} of {len(texts)}"
    if differs:
        check.problems.append(f"its tokenizer splits check sentence {', '.join(differs)} differently")
    if check.threshold is not None and check.cosine_min < check.threshold:
        check.problems.append(f"lowest cosine {check.cosine_min:.4f} < {check.threshold} over {len(texts)} sentences")


def compare_hf_embeddings(reference, directory: Path, check) -> None:
    """Fill `check` with the cosine of `SentenceTransformer(directory)`'s embeddings to `embed(reference)`."""
    import importlib.util

    from kompakt.model.encode import embed
    from kompakt.model.progress import quiet_third_party

    check.runtime = "sentence-transformers"
    if importlib.util.find_spec("sentence_transformers") is None:
        check.skipped = "sentence-transformers is not installed (pip install sentence-transformers)"
        return
    from sentence_transformers import SentenceTransformer

    texts = sentences_for(reference)
    try:
        with quiet_third_party():
            model = SentenceTransformer(str(directory), device="cpu", model_kwargs={"dtype": torch.float32})
            got = torch.nn.functional.normalize(model.encode(texts, convert_to_tensor=True).float().cpu(), dim=-1)
    except Exception as error:  # noqa: BLE001 - any failure to load or run is the check's answer
        check.problems.append(f"it does not load or run: {type(error).__name__}: {' '.join(str(error).split())[:200]}")
        return
    want = torch.nn.functional.normalize(embed(reference, texts).float(), dim=-1)
    cosines = (got * want).sum(-1)
    check.sentences, check.tokenization = len(texts), "same"
    check.cosine, check.cosine_min = round(float(cosines.mean()), 6), round(float(cosines.min()), 6)
    if check.threshold is not None and check.cosine_min < check.threshold:
        check.problems.append(f"lowest cosine {check.cosine_min:.4f} < {check.threshold} over {len(texts)} sentences")
