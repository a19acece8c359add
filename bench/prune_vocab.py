"""Vocabulary trimming benchmark (issue 15, `prune.vocab`): Gemma 3 270M and SmolLM2-135M on English.

Corpus (the tokens kept): WikiText-2 validation with " <unk>" removed (../shared/BENCH.md's
calibration text), all of it, `min_count` 1. Held-out: the first `--tokens` tokens of
WikiText-2 test (BENCH.md: raw text, the original's tokenizer, no special tokens, windows of
512) and `--gen-tokens` tokens of text the original generates itself (kompakt's cached
self-generated evaluation text, seed 1), neither seen by the trimming.

Per model: parameters and GGUF bytes (f16, q8_0) before / after; KL(original restricted to
the kept tokens || trimmed) and top-1 on held-out text under kompakt.evaluate.vocab_map's
rule; the share of held-out tokens that tokenize differently (tokens the corpus never used,
which the trimmed tokenizer splits into kept pieces) and the reference's mean probability on
removed tokens; whether llama.cpp tokenizes a held-out sample exactly as transformers does
with the trimmed GGUF, and generates from it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_vocab.py --threads 1
    .venv/bin/python bench/prune_vocab.py --models smollm2-135m --tokens 4096 --gen-tokens 0   # quick
    .venv/bin/python bench/prune_vocab.py --models gemma3-270m --expected 16384 65536 --merge

Prints a table and writes bench/results/prune_vocab.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
MB = 1e6


def corpus_file(data: Path, directory: Path) -> Path:
    path = directory / "wiki.valid.txt"
    path.write_text((data / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", ""), encoding="utf-8")
    return path


def trim(original, corpus: Path, work: Path, expected: int, positions: int):
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass("prune.vocab")
    ctx = PassContext(loaded=copy.deepcopy(original), original=lambda: original, calibration=lambda: None,
                      work_dir=work)  # fmt: skip
    start = time.perf_counter()
    report = spec.apply(ctx, build_config(spec, {"data": str(corpus), "expected": expected, "expected_positions": positions}))
    return report, time.perf_counter() - start


def gguf_bytes(loaded, directory: Path, label: str) -> dict[str, float]:
    from kompakt.export.gguf import write_gguf

    sizes = {}
    for kind in ("f16", "q8_0"):
        path = write_gguf(loaded, directory / f"{label}-{kind}.gguf", type=kind, force=True).path
        sizes[kind] = path.stat().st_size / MB
        if kind == "q8_0":
            path.unlink()
    return sizes


def llamacpp_check(gguf: Path, tokenizer, sample: str) -> dict:
    """Tokenization of `sample` by llama.cpp vs transformers (trimmed model), and a generation."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False, n_threads=1)
    try:
        ours = llm.tokenize(sample.encode(), add_bos=False, special=True)
        theirs = tokenizer(sample, add_special_tokens=False)["input_ids"]
        text = llm("The history of the city", max_tokens=16, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()
    return {"llamacpp_same_tokens": ours == theirs, "llamacpp_sample_tokens": len(theirs), "llamacpp_generated": text}


def heldout(original, trimmed, ids: torch.Tensor, label: str) -> dict:
    import kompakt

    result = kompakt.evaluate(trimmed, reference=original, ids=ids, window=512, speed=False)
    removed = result.extra.get("positions_removed", 0)
    positions = result.tokens_scored + removed
    return {f"{label}_kl": result.kl_mean, f"{label}_kl_p99": result.kl_p99, f"{label}_top1": result.top1,
            f"{label}_ppl_ref": result.ppl_reference, f"{label}_ppl": result.ppl,
            f"{label}_tokens_differ": removed / positions, f"{label}_removed_mass": result.extra.get("removed_mass", 0.0),
            f"{label}_positions": positions}  # fmt: skip


def run_model(name: str, expected: int, args, results: ResultsFile) -> None:
    import kompakt
    from kompakt.data import load_tokens, tokenize_texts
    from kompakt.rundir.stepsave import save_step_model

    original = kompakt.load(name)
    row: dict = {"name": name if expected == 0 else f"{name} expected={expected}", "expected": expected,
                 "parameters_before": original.num_parameters()}  # fmt: skip
    test_text = (args.data / "wiki.test.raw").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="kompakt-bench-vocab-") as tmp:
        tmp = Path(tmp)
        (tmp / "work").mkdir()
        report, wall = trim(original, corpus_file(args.data, tmp), tmp / "work", expected, args.expected_positions)
        save_step_model(report.loaded, tmp / "trimmed", original.storage_dtype, {})
        trimmed = kompakt.load(tmp / "trimmed")  # what a run's next step and `kompakt eval` read
        row.update(parameters_after=trimmed.num_parameters(), vocab=report.details["vocab_size"],
                   used=report.details["used"], expected_added=report.details["expected_added"],
                   closure_added=report.details["closure_added"], trim_s=wall)  # fmt: skip
        before, after = gguf_bytes(original, tmp, "original"), gguf_bytes(trimmed, tmp, "trimmed")
        row.update({f"gguf_{k}_mb_before": v for k, v in before.items()})
        row.update({f"gguf_{k}_mb_after": v for k, v in after.items()})
        row.update(llamacpp_check(tmp / "trimmed-f16.gguf", trimmed.tokenizer, test_text[:4000]))
        ids = tokenize_texts([test_text], original.tokenizer, max_tokens=args.tokens)
        row.update(heldout(original, trimmed, ids, "wiki"))
        row["wiki_token_growth"] = len(trimmed.tokenizer(test_text[:200000])["input_ids"]) / len(
            original.tokenizer(test_text[:200000])["input_ids"])
        if args.gen_tokens:
            generated = load_tokens(None, original, n_tokens=args.gen_tokens, seed=1)
            row.update(heldout(original, trimmed, generated, "self"))
    results.add(row)
    print_row(row)


def print_row(row: dict) -> None:
    print(f"\n{row['name']}: vocabulary {row['vocab'][0]} -> {row['vocab'][1]} ({row['used']} used, "
          f"+{row.get('expected_added', 0)} expected, +{row['closure_added']} merge closure), trim {row['trim_s']:.1f} s")  # fmt: skip
    print(f"  parameters {row['parameters_before'] / 1e6:.1f} M -> {row['parameters_after'] / 1e6:.1f} M; GGUF f16 "
          f"{row['gguf_f16_mb_before']:.1f} -> {row['gguf_f16_mb_after']:.1f} MB, q8_0 {row['gguf_q8_0_mb_before']:.1f} "
          f"-> {row['gguf_q8_0_mb_after']:.1f} MB")  # fmt: skip
    for label in ("wiki", "self"):
        if f"{label}_kl" in row:
            print(f"  {label}: KL {row[f'{label}_kl']:.5f} (p99 {row[f'{label}_kl_p99']:.4f}), top-1 "
                  f"{row[f'{label}_top1']:.2%}, tokens tokenized differently {row[f'{label}_tokens_differ']:.2%} "
                  f"of {row[f'{label}_positions']}, removed mass {row[f'{label}_removed_mass']:.4%}")  # fmt: skip
    print(f"  llama.cpp tokenizes as transformers: {row['llamacpp_same_tokens']} ({row['llamacpp_sample_tokens']} tokens);"
          f" generates {row['llamacpp_generated']!r}; wiki.test grows {row['wiki_token_growth'] - 1:.2%} in tokens")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--tokens", type=int, default=16384, help="held-out wiki.test tokens")
    parser.add_argument("--gen-tokens", type=int, default=4096, help="self-generated held-out tokens (0: none)")
    parser.add_argument("--expected", type=int, nargs="+", default=[0],
                        help="prune.vocab's expected: one row per value (0 = the corpus's tokens only)")
    parser.add_argument("--expected-positions", type=int, default=16384, help="prune.vocab's expected_positions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prune_vocab.json")
    parser.add_argument("--merge", action="store_true", help="keep other runs' rows in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = {"protocol": "corpus wiki.valid (no <unk>), held-out wiki.test first tokens + self-generated, window 512",
              "tokens": args.tokens, "gen_tokens": args.gen_tokens, "threads": args.threads}  # fmt: skip
    results = ResultsFile(args.out, header, args.merge)
    for name in args.models:
        for expected in args.expected:
            run_model(name, expected, args, results)


if __name__ == "__main__":
    main()
