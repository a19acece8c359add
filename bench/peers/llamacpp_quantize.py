"""llama.cpp at its best, as a peer: llama-imatrix on the calibration text, then llama-quantize --imatrix.

    python bench/peers/llamacpp_quantize.py --gguf model-f16.gguf \
        --text ../shared/data/wikitext2/wiki.valid.tokens --out peer-llamacpp/

Runs llama.cpp's own tools, built from the sources vendored in the llama-cpp-python sdist
(bench/peers/llamacpp_tools.sh; built first when missing), on an F16 GGUF:

1. llama-imatrix over the calibration text: 128 chunks of 512 tokens, the token count of
   kompakt's calibration (BENCH.md); " <unk>" is removed from the text first, as BENCH.md does.
   llama-imatrix reads consecutive chunks from the start, kompakt samples block starts: same
   text, same number of tokens, not the same tokens. `--imatrix FILE` skips this step and
   quantizes with that file instead (e.g. `kompakt imatrix`'s).
2. llama-quantize --imatrix at Q4_0, IQ4_NL, Q4_K_M, Q3_K_M, and Q4_0 without an imatrix.

Writes the GGUFs and `llamacpp_quantize.json` in --out: per file the type, whether an imatrix
was used, bytes, the exact command and its wall seconds (threads stated). Evaluating them
(KL on two texts beside kompakt's curve) is the caller's job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.3.36"
HERE = Path(__file__).resolve().parent
TOOLS = Path(os.environ.get("KOMPAKT_PEERS", Path.home() / ".cache" / "kompakt" / "peers")) / f"llamacpp-{VERSION}" / "bin"
WITH_IMATRIX = ("Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M")
WITHOUT_IMATRIX = ("Q4_0",)


def tool(name: str) -> Path:
    """The built tool; builds them (once, minutes) when missing."""
    path = TOOLS / name
    if not path.is_file():
        subprocess.run(["bash", str(HERE / "llamacpp_tools.sh")], check=True)
    return path


def run(command: list[str], log: Path) -> float:
    """Run `command` with its output in `log`; wall seconds. Exits with the log's tail on failure."""
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"{Path(command[0]).name} failed (exit {done.returncode}), see {log}:\n" + "\n".join(tail))
    return seconds


def calibration_text(text: Path, out: Path, drop: str) -> Path:
    """The text llama-imatrix reads: `text` with every `drop` removed (BENCH.md removes " <unk>")."""
    target = out / "calibration.txt"
    target.write_text(text.read_text(encoding="utf-8").replace(drop, "") if drop else text.read_text(encoding="utf-8"),
                      encoding="utf-8")  # fmt: skip
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the F16 (or F32) GGUF to quantize")
    parser.add_argument("--text", type=Path, help="calibration text for llama-imatrix")
    parser.add_argument("--imatrix", type=Path, help="use this imatrix instead of running llama-imatrix")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drop", default=" <unk>", help='text removed from the calibration text ("" keeps it)')
    args = parser.parse_args(argv)
    if (args.text is None) == (args.imatrix is None):
        parser.error("give exactly one of --text (run llama-imatrix) and --imatrix FILE")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    result: dict = {"gguf": str(args.gguf), "llama_cpp": f"llama-cpp-python {VERSION} vendored sources",
                    "machine": platform.machine(), "threads": args.threads, "files": []}  # fmt: skip

    imatrix = args.imatrix
    if imatrix is None:
        imatrix = args.out / "imatrix.gguf"
        text = calibration_text(args.text, args.out, args.drop)
        command = [str(tool("llama-imatrix")), "-m", str(args.gguf), "-f", str(text), "-o", str(imatrix),
                   "-c", str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks), "-t", threads,
                   "--no-ppl", "--output-frequency", str(10**6)]  # fmt: skip
        seconds = run(command, args.out / "imatrix.log")
        result["imatrix"] = {"path": str(imatrix), "text": str(args.text), "dropped": args.drop,
                             "chunks": args.chunks, "ctx": args.ctx, "command": command, "seconds": seconds}  # fmt: skip
    else:
        result["imatrix"] = {"path": str(imatrix), "given": True}

    jobs = [(kind, True) for kind in WITH_IMATRIX] + [(kind, False) for kind in WITHOUT_IMATRIX]
    for kind, use_imatrix in jobs:
        target = args.out / f"{args.gguf.stem.removesuffix('-f16')}-{kind}{'-imatrix' if use_imatrix else ''}.gguf"
        command = [str(tool("llama-quantize"))]
        command += ["--imatrix", str(imatrix)] if use_imatrix else []
        command += [str(args.gguf), str(target), kind, threads]
        seconds = run(command, target.with_suffix(".log"))
        result["files"].append({"type": kind, "imatrix": use_imatrix, "path": str(target),
                                "bytes": target.stat().st_size, "command": command, "seconds": seconds})  # fmt: skip
        print(f"{kind:<7} {'imatrix' if use_imatrix else '       '} {target.stat().st_size / 1e6:8.1f} MB {seconds:6.1f} s")
    report = args.out / "llamacpp_quantize.json"
    report.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
