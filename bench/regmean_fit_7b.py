"""share.layers' regmean fit (kompakt.ops.activation_merge.merge_group) at Llama-2-7B widths: time per group.

A 7B model does not fit this machine's tests, and the fit's cost depends only on the shapes, so
this times one group of `--depths` depths on random weights of Llama-2-7B's three Linear shapes
(q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008) and Gram matrices of random inputs
whose channels differ 100x in scale (as LLM activations do; as many tokens as channels, so every
Gram is full rank). A group of a 32-layer model shares 7 Linears: the total counts the 4096-square
time four times and gate/up twice. The relative error is the share of the depths' output energy
the fit misses (GroupFit.relative_error, mean over depths): the same inputs on every run, so two
versions of the fit compare on it.

    OMP_NUM_THREADS=2 .venv/bin/python bench/regmean_fit_7b.py --threads 2
    OMP_NUM_THREADS=2 .venv/bin/python bench/regmean_fit_7b.py --threads 2 --rounds 1 --out /tmp/r1.json
    .venv/bin/python bench/regmean_fit_7b.py --device cuda --out bench/results/regmean_fit_7b-cuda.json

Prints a table and writes bench/results/regmean_fit_7b.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kompakt.atomic import atomic_file
from kompakt.ops.activation_merge import merge_group

SHAPES = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}


def _inputs(shape: tuple[int, int], depths: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out_features, in_features, generator=generator) / in_features**0.5 for _ in range(depths)]
    grams = []
    for _ in range(depths):
        scales = torch.logspace(-1, 1, in_features)[torch.randperm(in_features, generator=generator)]
        x = torch.randn(in_features, in_features, generator=generator) * scales
        grams.append(x.T @ x)
    return weights, grams


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the fit runs (the inputs are drawn on the CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "regmean_fit_7b.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, total = [], 0.0
    for seed, (role, (shape, count)) in enumerate(SHAPES.items()):
        weights, grams = ([t.to(args.device) for t in ts] for ts in _inputs(shape, args.depths, seed))
        _synchronize(args.device)
        start = time.perf_counter()
        fit = merge_group(weights, grams, args.rank, rounds=args.rounds)
        _synchronize(args.device)
        seconds = time.perf_counter() - start
        error = sum(fit.relative_error) / len(fit.relative_error)
        rows.append({"role": role, "shape": list(shape), "per_group": count, "seconds": seconds, "relative_error": error})
        total += count * seconds
        print(f"{role:8s} {shape[0]:5d}x{shape[1]:<5d} x{count}  {seconds:7.1f} s  relative error {error:.5f}", flush=True)
    print(f"one group of {args.depths} depths, rank {args.rank}, rounds {args.rounds}: {total:.0f} s "
          f"({args.device}, {torch.get_num_threads()} threads)")  # fmt: skip
    result = {"depths": args.depths, "rank": args.rank, "rounds": args.rounds, "device": args.device,
              "threads": torch.get_num_threads(), "group_seconds": total, "rows": rows}  # fmt: skip
    with atomic_file(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
