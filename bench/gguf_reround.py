"""What re-exporting a model loaded from a GGUF costs its unchanged tensors.

kompakt loads a .gguf as its dequantized values (fp32); a later export that writes a tensor at
the type it had in the file rounds it again from those values. This bench rounds every quantized
tensor of a GGUF file on its own type with kompakt's encoders (kompakt.ops.ggml_types) and
reports, per type: how many come back byte-identical, the relative squared error of the values
against the file's (sum (new - old)^2 / sum old^2), and for scale what rounding on that type
costs a tensor that is off its grid (the same tensor plus Gaussian noise of 5 % of its standard
deviation, rounded). Default file: the embedded Gemma 3 270M Q4_K_M.

    .venv/bin/python bench/gguf_reround.py [FILE.gguf]
Writes bench/results/gguf_reround.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT_TYPES = ("f32", "f16", "bf16")


def relative_error(new: np.ndarray, old: np.ndarray) -> float:
    return float(((new - old) ** 2).sum() / (old**2).sum())


def measure(path: Path) -> dict[str, dict]:
    import gguf

    from kompakt.ops.ggml_types import quantize

    per_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "byte_identical": 0, "errors": [], "off_grid": []})
    rng = np.random.default_rng(0)
    for tensor in gguf.GGUFReader(path).tensors:
        name = tensor.tensor_type.name.lower()
        if name in FLOAT_TYPES:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        again = quantize(values, name)
        row = per_type[name]
        row["tensors"] += 1
        row["byte_identical"] += int(np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1),
                                                    np.asarray(again).view(np.uint8).reshape(-1)))  # fmt: skip
        row["errors"].append(relative_error(gguf.quants.dequantize(again, tensor.tensor_type).reshape(shape), values))
        noisy = values + rng.standard_normal(shape).astype(np.float32) * 0.05 * values.std()
        rounded = gguf.quants.dequantize(quantize(noisy, name), tensor.tensor_type).reshape(shape)
        row["off_grid"].append(relative_error(rounded, noisy))
    return {name: {"tensors": r["tensors"], "byte_identical": r["byte_identical"],
                   "reround_error_mean": float(np.mean(r["errors"])), "reround_error_max": max(r["errors"]),
                   "off_grid_error_mean": float(np.mean(r["off_grid"]))} for name, r in per_type.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", help="a quantized .gguf (default: the embedded Gemma 3 270M Q4_K_M)")
    args = parser.parse_args()
    if args.file:
        path = Path(args.file)
    else:
        from kompakt.model.embedded import embedded_gguf

        path = embedded_gguf("gemma3-270m")
    rows = measure(path)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_reround.json").write_text(json.dumps({"bench": "gguf_reround", "file": path.name, "types": rows}, indent=1))
    print(f"{path.name}\n| type | tensors | byte-identical | re-rounding error mean / max | off-grid rounding error |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tensors']} | {r['byte_identical']} | {r['reround_error_mean']:.1e} / "
              f"{r['reround_error_max']:.1e} | {r['off_grid_error_mean']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
