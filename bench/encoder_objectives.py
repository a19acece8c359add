"""Encoder distillation objectives at the same step count (issue 17): which loss brings the
3-layer student's neighbourhoods closest to the teacher's?

all-MiniLM-L6-v2 cut to 3 layers as bench/encoders.py does (the block whose removal keeps
training sentences closest), then distill.kd for `--steps` steps with bench/encoders.py's KD
settings plus each variant's loss weights. Scored on 500 held-back WikiText-2 *validation*
sentences (never trained on; the test text is not used: this is a recipe choice).

    .venv/bin/python bench/encoder_objectives.py --steps 800
    .venv/bin/python bench/encoder_objectives.py --steps 800 --only "cosine + last-layer hidden MSE"   # keeps the other rows

Prints one JSON line per variant and writes bench/results/encoder_objectives.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders import BLOCK_SENTENCES, HELD_OUT, KD, SCORED_ON, best_block, distill, validation_split  # noqa: E402

VARIANTS = {
    "cosine": {},
    "cosine + neighbours (tau 0.05)": {"neighbour_weight": 1.0, "neighbour_temperature": 0.05},
    "cosine + neighbours (tau 0.1)": {"neighbour_weight": 1.0, "neighbour_temperature": 0.1},
    # TinyBERT's token-level hidden-state MSE, last layer or every student layer to the teacher
    # layer it replaces (keeping 0, 4, 5: student 1 -> teacher 1, 2 -> 5, 3 -> 6)
    "cosine + last-layer hidden MSE": {"hidden_weight": 1.0, "layer_map": [[3, 6]]},
    "cosine + hidden MSE, every layer": {"hidden_weight": 1.0, "layer_map": [[1, 1], [2, 5], [3, 6]]},
    "cosine + q/k/v relations (MiniLM v2)": {"relation_weight": 1.0},
}


def previous_rows(path: Path, only: list[str] | None, steps: int) -> list[dict]:
    """With --only, the other variants' rows of an earlier run at the same step count are kept."""
    if not only or not path.exists():
        return []
    earlier = json.loads(path.read_text())
    if earlier["kd"]["steps"] != steps:
        return []
    return [row for row in earlier["rows"] if row["variant"] not in only]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="distill.kd steps of 32 sentences per variant")
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_objectives.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kompakt.atomic import atomic_file
    from kompakt.evaluate.embedding_fidelity import embedding_fidelity
    from kompakt.model.encode import embed

    teacher, held, train, teacher_emb = validation_split(HELD_OUT)
    start, removed = best_block(teacher, train[:BLOCK_SENTENCES], 3)
    rows = previous_rows(args.out, args.only, args.steps)
    result = {"bench": "encoder_objectives", "model": "all-minilm-l6-v2", "removed_layers": removed,
              "kd": {**KD, "steps": args.steps}, "training_sentences": len(train),
              "scored_on": SCORED_ON,
              "threads": args.threads, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or VARIANTS:
        student = copy.deepcopy(start)
        started = time.process_time()
        report = distill(teacher, student, train, args.steps, VARIANTS[name])
        fidelity = embedding_fidelity(embed(student, held), teacher_emb)
        rows.append({"variant": name, "loss_weights": VARIANTS[name], "cosine_mean": round(fidelity.cosine_mean, 4),
                     "recall_at_10": round(fidelity.recall_at_k, 4), "spearman": round(fidelity.spearman, 4),
                     "kd_summary": report.summary, "kd_cpu_s": round(time.process_time() - started, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        with atomic_file(args.out) as tmp:  # after every variant: a long run stopped early keeps its rows
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
