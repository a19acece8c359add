"""`kompakt export --imatrix`: what an importance matrix buys at each GGUF type, and that the file
is llama-quantize --imatrix's.

On the embedded SmolLM2-135M, BENCH.md's calibration (128 x 512 tokens of wiki.valid, " <unk>"
removed, seed 0) gives kompakt's importance matrix (kompakt.export.imatrix, as `kompakt imatrix`
writes it). Each --types type is exported twice by kompakt's GGUF writer, without and with that
matrix, and each file is read back (`kompakt.load`) and scored against the original by the same
evaluator as bench/mixed_precision.py: KL, top-1, perplexity on the first --tokens of WikiText-2
test and on 4096 tokens the original samples itself (seed 7).

With llama.cpp's tools built (bench/peers/llamacpp_tools.sh), `llama-quantize --imatrix` also
quantizes the F32 GGUF of the same weights with the same matrix, and every tensor both files give
the same type is compared byte for byte (llama.cpp's Q4_K_M moves some tensors to Q6_K by its own
mix rules; kompakt's q4_k keeps them). Run alone:

    python bench/imatrix_export.py --out bench/results/imatrix_export.json
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from mixed_precision import SELF_TEXT_SEED, score
from quant import calibration_blocks, evaluation_ids
from results_file import ResultsFile

HERE = Path(__file__).resolve().parent
LLAMA_TYPES = {"q4_0": "Q4_0", "iq4_nl": "IQ4_NL", "q4_k": "Q4_K_M", "q3_k": "Q3_K_M"}


def same_bytes(ours: Path, theirs: Path) -> dict:
    """Tensors of both files with the same type, and how many of them are byte-identical."""
    import gguf

    mine = {t.name: (int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(ours).tensors}
    other = {t.name: (int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    shared = [name for name in mine if name in other and mine[name][0] == other[name][0]]
    identical = [name for name in shared if mine[name][1] == other[name][1]]
    return {"tensors": len(mine), "same_type": len(shared), "identical": len(identical),
            "differ": sorted(set(shared) - set(identical))[:5]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "imatrix_export.json")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kompakt" / "bench" / "imatrix")
    parser.add_argument("--types", default="q4_0,iq4_nl,q4_k,q3_k")
    parser.add_argument("--blocks", type=int, default=128, help="calibration blocks of 512 behind the imatrix")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="keep rows of an earlier run")
    args = parser.parse_args()

    import torch

    from kompakt.data import load_tokens
    from kompakt.export.gguf import write_gguf
    from kompakt.export.imatrix import imatrix_from_blocks, write_imatrix
    from kompakt.model.load import load
    from peers.llamacpp_quantize import TOOLS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    original = load(None)
    texts = {"wikitext2_test": evaluation_ids(original.tokenizer),
             "self_generated": load_tokens(None, original, n_tokens=4096, seed=SELF_TEXT_SEED)}  # fmt: skip
    start = time.perf_counter()
    calib = calibration_blocks(original.tokenizer, args.blocks)
    matrix = write_imatrix(imatrix_from_blocks(original, calib, dataset="wiki.valid.tokens"),
                           args.work / "smollm2.imatrix.gguf")  # fmt: skip
    header = {"model": original.name, "tokens": args.tokens, "imatrix": f"{args.blocks} x 512 wiki.valid (BENCH.md)",
              "imatrix_seconds": time.perf_counter() - start, "threads": args.threads,
              "texts": {"wikitext2_test": "WikiText-2 test, first tokens",
                        "self_generated": f"4096 tokens the original samples itself (seed {SELF_TEXT_SEED})"}}  # fmt: skip
    results = ResultsFile(args.out, header, args.merge)
    llama_quantize = TOOLS / "llama-quantize"
    source = None
    if llama_quantize.is_file():
        source = write_gguf(original, args.work / "f32.gguf", type="f32", force=True).path
    for ggml_type in args.types.split(","):
        for imatrix in (None, matrix):
            path = args.work / f"{ggml_type}{'-imatrix' if imatrix else ''}.gguf"
            begin = time.perf_counter()
            written = write_gguf(original, path, type=ggml_type, force=True, imatrix=imatrix)
            row = {"name": f"kompakt {ggml_type}" + (" + imatrix" if imatrix else ""), "type": ggml_type,
                   "imatrix": imatrix is not None, "export_seconds": time.perf_counter() - begin,
                   "types": written.types_summary, **score(original, path, texts, args.tokens)}  # fmt: skip
            if imatrix is not None and source is not None:
                theirs = args.work / f"{ggml_type}-llama-quantize.gguf"
                command = [str(llama_quantize), "--imatrix", str(matrix), str(source), str(theirs),
                           LLAMA_TYPES[ggml_type], str(args.threads)]  # fmt: skip
                begin = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                row["llama_quantize"] = {"type": LLAMA_TYPES[ggml_type], "seconds": time.perf_counter() - begin,
                                         **same_bytes(path, theirs)}  # fmt: skip
            results.add(row)
            print_row(row)


def print_row(row: dict) -> None:
    wiki, own = row["wikitext2_test"], row["self_generated"]
    line = (f"{row['name']:<24} {row['file_bytes'] / 1e6:7.2f} MB  KL {wiki['kl']:.4f} / {own['kl']:.4f}  "
            f"top-1 {100 * wiki['top1']:.1f} %  ppl {wiki['ppl']:.2f}")  # fmt: skip
    if "llama_quantize" in row:
        peer = row["llama_quantize"]
        line += f"  llama-quantize {peer['type']}: {peer['identical']}/{peer['same_type']} same-type tensors identical"
    print(line, flush=True)


if __name__ == "__main__":
    main()
