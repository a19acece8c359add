"""Healing benchmark (issue 5): distillation after pruning, QAT after 4-bit RTN, LoRA on a task.

Protocol (../shared/BENCH.md): SmolLM2-135M (embedded, fp32) is the original and the teacher.
Evaluation: the first `--eval-tokens` (default 32768) tokens of WikiText-2 test, windows of
512, stride 512: perplexity, KL(original ‖ candidate) and top-1 agreement. Training text:
WikiText-2 validation (" <unk>" removed), packed into 4 x 256-token batches. Every training
run has the same budget (`--tokens`, stated in the output) and reports tokens seen, wall time
and training tokens/s (2 CPU threads unless --threads says otherwise).

Parts (each writes bench/results/heal-<part>.json and prints its table):
  depth  prune.depth 25 % (block_influence, 32 calibration blocks of 512) -> distill.kd
         (alpha 0.5, T 2) vs plain cross-entropy (alpha 0) from the same pruned weights
  width  prune.width to ~50 % of the parameters -> distill.kd; ppl / KL curve against tokens
         seen on the first `--curve-tokens` test tokens, final numbers on --eval-tokens
  qat    quant.rtn 4-bit, group 64, symmetric -> quant.qat with KD on that grid
         (--qat-start awq+gptq: AWQ then GPTQ on 128 calibration blocks of 512 first, as bench/quant.py;
         --qat-from DIR: a saved quantized model, e.g. bench/quant.py's kept AWQ+GPTQ q4_0 model)
  lora   finetune.lora on a sentence-completion chat task built from WikiText-2 (train pairs
         from validation, held-out pairs from test); answer-token loss on held-out pairs
         before / after; merged model vs the PEFT adapter model on the same inputs

    nice -n 10 .venv/bin/python bench/heal.py --part depth --tokens 49152
    .venv/bin/python bench/heal.py --report          # the tables of every part run so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
RESULTS = REPO / "bench" / "results"


def _atomic_json(path: Path, data: dict) -> None:
    from kompakt.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def clean_valid_text() -> Path:
    path = Path(tempfile.gettempdir()) / "kompakt-bench-wiki-valid.txt"
    if not path.exists():
        path.write_text((DATA / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", ""))
    return path


def eval_ids(tokenizer) -> torch.Tensor:
    from kompakt.data import read_texts, tokenize_texts

    return tokenize_texts(read_texts(DATA / "wiki.test.raw"), tokenizer)


def quality(reference, candidate, ids: torch.Tensor, tokens: int) -> dict:
    from kompakt.evaluate import fidelity

    start = time.perf_counter()
    r = fidelity(reference, candidate, ids, window=512, stride=512, max_tokens=tokens)
    return {"ppl": r.ppl_candidate, "ppl_reference": r.ppl_reference, "kl": r.kl_mean, "top1": r.top1,
            "eval_tokens": tokens, "eval_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def context(loaded, teacher, *, calib=None, evaluation=None, work=None):
    from kompakt.passes.base import PassContext

    return PassContext(loaded=loaded, original=lambda: teacher, calibration=lambda: calib, seed=0,
                       work_dir=work, evaluation=evaluation)  # fmt: skip


def apply(name: str, ctx, values: dict):
    from kompakt.passes.base import build_config, get_pass

    spec = get_pass(name)
    start = time.perf_counter()
    report = spec.apply(ctx, build_config(spec, values))
    return report, time.perf_counter() - start


def copy_model(loaded):
    import copy

    from kompakt.model.loaded import LoadedModel

    return LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name=loaded.name,
                       path=loaded.path, storage_dtype=loaded.storage_dtype)  # fmt: skip


def train_row(label: str, report, wall: float, quality_row: dict) -> dict:
    d = report.details
    return {"name": label, "tokens_seen": d.get("tokens"), "steps": d.get("steps"), "wall_s": round(wall, 1),
            "train_tokens_per_s": d.get("tokens_per_s"), "loss_first": d.get("loss_first"),
            "loss_last": d.get("loss_last"), "curve": d.get("evals"), **quality_row}  # fmt: skip


def kd_settings(tokens: int, alpha: float, lr: float, batch: int, threads: int) -> dict:
    """distill.kd's settings in the healing benches (this one and bench/moe.py): WikiText-2
    validation, T 2, sequences of 256."""
    return {"data": str(clean_valid_text()), "tokens": tokens, "alpha": alpha, "temperature": 2.0,
            "lr": lr, "batch_size": batch, "seq_len": 256, "checkpoint_every": 0, "threads": threads}  # fmt: skip


def kd_values(args, alpha: float) -> dict:
    return kd_settings(args.tokens, alpha, args.lr, args.batch, args.threads)


def calibration(tokenizer, n_blocks: int) -> torch.Tensor:
    from kompakt.data import sample_blocks, tokenize_texts

    ids = tokenize_texts([clean_valid_text().read_text()], tokenizer)
    return sample_blocks(ids, n_blocks, 512, seed=0)


def part_depth(args, teacher, ids) -> list[dict]:
    pruned = copy_model(teacher)
    report, wall = apply("prune.depth", context(pruned, teacher, calib=calibration(teacher.tokenizer, 32)),
                         {"fraction": 0.25, "method": "block_influence"})  # fmt: skip
    rows = [{"name": "depth 25% (pruned)", "parameters": pruned.num_parameters(), "wall_s": round(wall, 1),
             "summary": report.summary, **quality(teacher, pruned, ids, args.eval_tokens)}]  # fmt: skip
    emit(args, rows)
    runs = (("depth 25% -> KD a=0.5 T=2", 0.5), ("depth 25% -> CE (a=0)", 0.0))
    for label, alpha in [r for r in runs if r[1] in args.alphas]:
        student = copy_model(pruned)
        report, wall = apply("distill.kd", context(student, teacher), kd_values(args, alpha))
        rows.append(train_row(label, report, wall, quality(teacher, student, ids, args.eval_tokens)))
        emit(args, rows)
        del student
    return rows


def part_width(args, teacher, ids) -> list[dict]:
    pruned = copy_model(teacher)
    report, wall = apply("prune.width", context(pruned, teacher, calib=calibration(teacher.tokenizer, 32)),
                         {"target_params": 0.5})  # fmt: skip
    rows = [{"name": "width ~50% (pruned)", "parameters": pruned.num_parameters(), "wall_s": round(wall, 1),
             "summary": report.summary, **quality(teacher, pruned, ids, args.eval_tokens)}]  # fmt: skip
    emit(args, rows)
    values = {**kd_values(args, 0.5), "eval_every": args.curve_every, "eval_tokens": args.curve_tokens}
    ctx = context(pruned, teacher, evaluation=lambda: ids[: args.curve_tokens])
    report, wall = apply("distill.kd", ctx, values)
    rows.append(train_row("width ~50% -> KD a=0.5 T=2", report, wall, quality(teacher, pruned, ids, args.eval_tokens)))
    return rows


QAT_STARTS = {  # --qat-start: the post-training quantization QAT starts from (bench/quant.py's rows)
    "rtn": ("RTN int4 g64 sym", ["quant.rtn"]),
    "awq+gptq": ("AWQ+GPTQ int4 g64 sym", ["quant.awq", "quant.gptq"]),
}


def quantized_start(args, teacher):
    """(label, model, wall s): the --qat-start quantization of the original, or the --qat-from model."""
    if args.qat_from:
        from kompakt.model.load import load

        return f"saved {Path(args.qat_from).name}", load(args.qat_from), 0.0
    label, passes = QAT_STARTS[args.qat_start]
    quantized = copy_model(teacher)
    grid = {"bits": 4, "group_size": 64, "symmetric": True}
    calib = calibration(teacher.tokenizer, 128) if args.qat_start != "rtn" else None  # as bench/quant.py
    wall = 0.0
    for name in passes:
        report, seconds = apply(name, context(quantized, teacher, calib=calib), grid)
        quantized, wall = report.loaded, wall + seconds
    return label, quantized, wall


def part_qat(args, teacher, ids) -> list[dict]:
    label, quantized, wall = quantized_start(args, teacher)
    rows = [{"name": label, "wall_s": round(wall, 1), **quality(teacher, quantized, ids, args.eval_tokens)}]
    emit(args, rows)
    for alpha in args.qat_alphas:
        student = copy_model(quantized)
        values = {**kd_values(args, alpha), "lr": args.qat_lr}
        report, wall = apply("quant.qat", context(student, teacher), values)
        rows.append(train_row(f"{label} -> QAT KD a={alpha:g} T=2", report, wall, quality(teacher, student, ids, args.eval_tokens)))
        emit(args, rows)
    return rows


# --- LoRA task ---------------------------------------------------------------------------------


def completion_pairs(path: Path, limit: int, seed: int) -> list[dict]:
    """Chat records: the first half of a WikiText sentence -> the rest of it."""
    text = path.read_text(encoding="utf-8").replace(" <unk>", "")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?]) ", text) if 12 <= len(s.split()) <= 40 and "=" not in s]
    random.Random(seed).shuffle(sentences)
    records = []
    for sentence in sentences[:limit]:
        words = sentence.split()
        cut = len(words) // 2
        records.append({"messages": [
            {"role": "user", "content": "Continue this encyclopedia sentence: " + " ".join(words[:cut])},
            {"role": "assistant", "content": " ".join(words[cut:])},
        ]})  # fmt: skip
    return records


def answer_loss(model, data, seq_len: int = 256) -> float:
    """Mean cross-entropy on the answer tokens of packed held-out conversations."""
    from kompakt.ops.kd_losses import cross_entropy, shift_for_next_token
    from kompakt.train.data import SequenceBatches

    batches = SequenceBatches(data, seq_len=seq_len, batch_size=1, seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(batches.sequences):
            ids, labels = batches.ids[row : row + 1], batches.labels[row : row + 1]
            logits, targets = shift_for_next_token(model(input_ids=ids, use_cache=False).logits, labels)
            n = int((targets != -100).sum())
            if n:
                total += float(cross_entropy(logits, targets)) * n
                count += n
    return total / max(count, 1)


def part_lora(args, teacher, ids) -> list[dict]:
    from kompakt.train.data import chat_data

    work = Path(tempfile.mkdtemp(prefix="kompakt-heal-lora-"))
    train_file, test_file = work / "train.jsonl", work / "heldout.jsonl"
    for path, source, limit in ((train_file, DATA / "wiki.valid.tokens", 2000), (test_file, DATA / "wiki.test.raw", 120)):
        path.write_text("".join(json.dumps(r) + "\n" for r in completion_pairs(source, limit, seed=0)))
    heldout = chat_data(test_file, teacher.tokenizer)
    student = copy_model(teacher)
    before = answer_loss(student.model, heldout)
    values = {"data": str(train_file), "tokens": args.lora_tokens, "r": 16, "lora_alpha": 32, "lr": 5e-4,
              "target_modules": "all-linear", "checkpoint_every": 0, "threads": args.threads}  # fmt: skip
    ctx = context(student, teacher, work=work)
    report, wall = apply("finetune.lora", ctx, values)
    after = answer_loss(student.model, heldout)
    # merged = adapter: load the saved adapter onto a fresh copy of the original, compare logits
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(copy_model(teacher).model, str(work / "adapter")).eval()
    probe = heldout.ids[:256].unsqueeze(0)
    with torch.no_grad():
        diff = (adapter_model(input_ids=probe).logits - student.model(input_ids=probe).logits).abs().max().item()
    row = train_row("LoRA r=16 all-linear, sentence completion", report, wall, {})
    row.update({"heldout_answer_loss_before": before, "heldout_answer_loss_after": after,
                "train_pairs": 2000, "heldout_pairs": 120, "merged_vs_adapter_max_abs_logit_diff": diff,
                "trainable_parameters": report.details.get("trainable_parameters")})  # fmt: skip
    return [row]


PARTS = {"depth": part_depth, "width": part_width, "qat": part_qat, "lora": part_lora}


def emit(args, rows: list[dict]) -> None:
    lora = args.part == "lora"
    header = {"bench": "heal", "part": args.part, "model": "smollm2-135m (fp32)",
              "train_tokens": args.lora_tokens if lora else args.tokens,
              "batch": "4 x 256" if lora else f"{args.batch} x 256", "lr": 5e-4 if lora else args.lr, "qat_lr": args.qat_lr, "threads": args.threads, "eval": "WikiText-2 test, window 512",
              "eval_tokens": None if lora else args.eval_tokens, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "torch": torch.__version__}  # fmt: skip
    path = RESULTS / f"heal-{args.part}{args.suffix}.json"
    if args.merge and path.exists():  # keep rows of an earlier (e.g. killed) run, replace by name
        names = {r["name"] for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if r["name"] not in names] + rows
    _atomic_json(path, {**header, "rows": rows})


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def print_tables() -> None:
    columns = ("name", "tokens_seen", "wall_s", "train_tokens_per_s", "ppl", "ppl_reference", "kl", "top1", "eval_tokens",
               "heldout_answer_loss_before", "heldout_answer_loss_after", "merged_vs_adapter_max_abs_logit_diff")  # fmt: skip
    for path in sorted(RESULTS.glob("heal-*.json")):
        data = json.loads(path.read_text())
        lr = data.get("qat_lr") if data["part"] == "qat" else data["lr"]
        print(f"\n## {path.name}: train {data['train_tokens']} tokens ({data['batch']}), lr {lr}, "
              f"{data['threads']} threads, eval {data['eval_tokens']} tokens of {data['eval']}")  # fmt: skip
        used = [c for c in columns if any(r.get(c) is not None for r in data["rows"])]
        print("| " + " | ".join(used) + " |")
        print("|" + "---|" * len(used))
        for row in data["rows"]:
            print("| " + " | ".join(fmt(row.get(c)) for c in used) + " |")
            for point in row.get("curve") or []:
                print(f"|   curve: {point['tokens']} tokens | ppl {point['ppl']:.2f} | KL {point['kl']:.4f} | "
                      f"top-1 {point['top1']:.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--tokens", type=int, default=49152, help="training tokens per run")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--qat-start", choices=sorted(QAT_STARTS), default="rtn", help="qat part: quantize with RTN or AWQ+GPTQ first")
    parser.add_argument("--qat-from", help="qat part: start from this saved quantized model instead (e.g. bench/quant.py --keep-dir)")
    parser.add_argument("--qat-alphas", type=float, nargs="+", default=[0.5], help="qat part: one QAT run per KD alpha")
    parser.add_argument("--lora-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--curve-tokens", type=int, default=8192)
    parser.add_argument("--curve-every", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suffix", default="", help="results file heal-<part><suffix>.json (keep several budgets)")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing results file")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.0], help="depth part: which runs (0.5 KD, 0 CE)")
    parser.add_argument("--report", action="store_true", help="print the tables of every part run so far")
    args = parser.parse_args()
    if args.report or not args.part:
        print_tables()
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from kompakt.model.load import load

    teacher = load("smollm2-135m")
    ids = eval_ids(teacher.tokenizer)
    rows = PARTS[args.part](args, teacher, ids)
    emit(args, rows)
    print_tables()


if __name__ == "__main__":
    main()
