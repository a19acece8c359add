"""How many layers does each encoder goal need (issue 17)? all-MiniLM-L6-v2 cut to 3, 4 and 5
layers, each healed by the same distill.kd steps, scored against the goals.

Every student is made as bench/encoders.py makes the 3-layer one (the contiguous block of layers
whose removal keeps 256 training sentences closest, then distill.kd on the cosine with its KD
settings) for `--steps` steps. Scored on 500 held-back WikiText-2 *validation* sentences (never
trained on; the test text is not used: this sizes a recipe), sentences/s at batch 32 timed in
turns with the teacher on the same sentences. It says what the issue's cosine >= 0.95 and
recall@10 >= 0.85 cost in speed, beside its >= 1.8x.

    .venv/bin/python bench/encoder_depth.py --steps 800

Prints one JSON line per depth and writes bench/results/encoder_depth.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders import BLOCK_SENTENCES, GOALS, HELD_OUT, KD, SCORED_ON, best_block, distill, interleaved_speeds, validation_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5], help="layers each student keeps")
    parser.add_argument("--steps", type=int, default=800, help="distill.kd steps of 32 sentences per student")
    parser.add_argument("--lr", type=float, default=KD["lr"], help="distill.kd's peak learning rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_depth.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kompakt.atomic import atomic_file
    from kompakt.evaluate.embedding_fidelity import embedding_fidelity
    from kompakt.model.encode import embed

    teacher, held, train, teacher_emb = validation_split(HELD_OUT)
    n = teacher.model.config.num_hidden_layers
    rows = []
    result = {"bench": "encoder_depth", "model": "all-minilm-l6-v2", "kd": {**KD, "lr": args.lr, "steps": args.steps},
              "training_sentences": len(train), "goals": GOALS, "threads": args.threads,
              "scored_on": SCORED_ON, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for keep in args.layers:
        student, removed = best_block(teacher, train[:BLOCK_SENTENCES], n - keep)
        started = time.process_time()
        report = distill(teacher, student, train, args.steps, {"lr": args.lr})
        kd_cpu_s = time.process_time() - started
        fidelity = embedding_fidelity(embed(student, held), teacher_emb)
        speeds = interleaved_speeds({"teacher": teacher, "student": student}, held)
        rows.append({"layers": keep, "removed": removed, "parameters": student.num_parameters(),
                     "cosine_mean": round(fidelity.cosine_mean, 4), "recall_at_10": round(fidelity.recall_at_k, 4),
                     "spearman": round(fidelity.spearman, 4), "speedup_b32": round(speeds["student"] / speeds["teacher"], 3),
                     "kd_summary": report.summary, "kd_cpu_s": round(kd_cpu_s, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        with atomic_file(args.out) as tmp:  # after every depth: a run stopped early keeps its rows
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
