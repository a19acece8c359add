"""Encoder student shapes at the same speed (issue 17): fewer full layers or more narrower ones?

all-MiniLM-L6-v2 cut to each shape (layers kept by bench/encoders.py's block choice; the MLP
narrowed by prune.width's activation importance on 256 training sentences), then distill.kd on the
sentence-embedding cosine for the same `--steps` (bench/encoders.py's KD settings). Scored on 500
held-back WikiText-2 *validation* sentences (never trained on; the test text is not used: this is
a recipe choice), with sentences/s at batch 32 as a ratio to the teacher timed in turns.

    .venv/bin/python bench/encoder_shapes.py --steps 200

Prints one JSON line per shape and writes bench/results/encoder_shapes.json.
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
from encoders import BLOCK_SENTENCES, HELD_OUT, KD, SCORED_ON, best_block, distill, interleaved_speeds, validation_split  # noqa: E402

SHAPES = [(3, 1536), (4, 768), (4, 1024), (5, 512)]  # (layers, MLP width); the teacher is (6, 1536)


def narrowed(teacher, student, train: list[str], width: int):
    """`student` with `width` MLP channels per layer (prune.width, activation importance)."""
    from kompakt.data.sentence_batches import sentence_batch
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass("prune.width")
    calibration = sentence_batch(student, train, BLOCK_SENTENCES, 128)
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: calibration, seed=0)
    return spec.apply(ctx, build_config(spec, {"mlp_channels": width})).loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="distill.kd steps of 32 sentences per shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_shapes.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kompakt.atomic import atomic_file
    from kompakt.evaluate.embedding_fidelity import embedding_fidelity
    from kompakt.model.encode import embed

    teacher, held, train, teacher_emb = validation_split(HELD_OUT)
    rows = []
    for layers, width in SHAPES:
        student, removed = best_block(teacher, train[:BLOCK_SENTENCES], teacher.model.config.num_hidden_layers - layers)
        if width < teacher.model.config.intermediate_size:
            student = narrowed(teacher, student, train, width)
        started = time.process_time()
        distill(teacher, student, train, args.steps)
        fidelity = embedding_fidelity(embed(student, held), teacher_emb)
        speeds = interleaved_speeds({"teacher": teacher, "student": student}, held[:256], rounds=2)
        rows.append({"layers": layers, "mlp_width": width, "removed_layers": removed,
                     "parameters": student.num_parameters(), "cosine_mean": round(fidelity.cosine_mean, 4),
                     "recall_at_10": round(fidelity.recall_at_k, 4), "spearman": round(fidelity.spearman, 4),
                     "speedup_b32": round(speeds["student"] / speeds["teacher"], 2),
                     "kd_cpu_s": round(time.process_time() - started, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "encoder_shapes", "model": "all-minilm-l6-v2", "kd": {**KD, "steps": args.steps},
              "scored_on": SCORED_ON,
              "threads": args.threads, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
