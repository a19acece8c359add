"""lowrank.compensate benchmark (issue 15): EoRA adapters on the GPTQ q4_0 model, KL against bytes.

`--awq`: the base is the issue's AWQ+GPTQ q4_0 model (quant.gptq with awq: true, one run), whose
Linears read and write AWQ-rescaled coordinates (see kompakt.ops.error_compensation).

Protocol (../shared/BENCH.md): SmolLM2-135M in fp32; calibration = 128 blocks of 512 tokens of
WikiText-2 validation (" <unk>" removed, seed 0), used by quant.gptq (format q4_0, as bench/quant.py's
"GPTQ q4_0" row) and lowrank.compensate alike; evaluation = the first 32768
tokens of WikiText-2 test, windows of 512, stride 512; KL(original ‖ candidate), top-1, ppl.
Bytes: the adapter as llama.cpp loads it (`kompakt export --format gguf-lora --type
--lora-type`, f16 or q8_0) against the q4_0 base GGUF kompakt exports from the same model; the
factors are rounded as that file stores them (B to f16, A to f16 or q8_0) before they are scored,
so the KL is the file's. Goal: KL -30 % for <= 5 % bytes.

    .venv/bin/python bench/lowrank_compensate.py                                   # full protocol
    .venv/bin/python bench/lowrank_compensate.py --blocks 16 --eval-tokens 4096    # reduced
    .venv/bin/python bench/lowrank_compensate.py --quantized ~/.cache/kompakt/bench/awq-gptq-q4_0
    .venv/bin/python bench/lowrank_compensate.py --allocation global --ranks 16
    .venv/bin/python bench/lowrank_compensate.py --awq --ranks 8 --tune-tokens 0,32768   # closed form, then tuned

`--quantized DIR` starts from a saved GPTQ q4_0 model instead of quantizing; `--quantized FILE.gguf`
from any quantized GGUF (any tool's, any types: it is the base file itself, its bytes are the
file's); `--llamacpp` also runs the base GGUF + adapter GGUF of every row in llama.cpp and
reports its agreement with kompakt's own forward of the same model (top-1, mean KL).

Prints a table and writes bench/results/lowrank_compensate.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import quant
from quant import calibration_blocks, evaluation_ids, machine
import heal
from results_file import ResultsFile

REPO = Path(__file__).resolve().parents[1]
Q40 = {"format": "q4_0"}


def quantize(original, calib: torch.Tensor, source: Path | None, awq: bool = False):
    """The (AWQ+)GPTQ q4_0 model: loaded from `source`, or made here on `calib`."""
    from kompakt.model.load import load
    from kompakt.passes.base import PassContext, build_config, get_pass

    if source is not None:
        return load(source, device="cpu", dtype="float32"), 0.0
    model = copy.deepcopy(original)
    start = time.perf_counter()
    for name in ("quant.gptq",):
        spec = get_pass(name)
        ctx = PassContext(loaded=model, original=lambda: original, calibration=lambda: calib, seed=0)
        model = spec.apply(ctx, build_config(spec, {**Q40, "awq": awq})).loaded
    return model, time.perf_counter() - start


def compensate(quantized, original, calib: torch.Tensor, rank: int, allocation: str, tune: int = 0, tune_lr: float = 1e-3):
    from kompakt.passes.base import PassContext, build_config, get_pass

    spec = get_pass("lowrank.compensate")
    ctx = PassContext(loaded=quantized, original=lambda: original, calibration=lambda: calib, seed=0,
                      teacher=lambda path: original)  # fmt: skip
    start = time.perf_counter()
    values = {"rank": rank, "allocation": allocation}
    if tune:  # the factors distilled on WikiText-2 validation (the calibration's text), as bench/heal.py trains
        values.update(tune_tokens=tune, tune_lr=tune_lr, tune_data=str(heal.clean_valid_text()))
    report = spec.apply(ctx, build_config(spec, values))
    return report, time.perf_counter() - start


def gguf_bytes(model, workdir: Path, lora_type: str | None = None) -> int:
    """Bytes of the q4_0 base GGUF, or of the adapter GGUF in `lora_type`, exactly as exported."""
    from kompakt.export.api import export

    out = workdir / ("lora.gguf" if lora_type else "base.gguf")
    result = export(model, format="gguf-lora" if lora_type else "gguf", type=lora_type or "q4_0", out=out,
                    force=True, verify=False)  # fmt: skip
    return result.size_bytes


def round_as_stored(model, lora_type: str) -> None:
    """Round the attached factors as the adapter GGUF stores them, so kompakt scores the file's adapter."""
    from kompakt.export.gguf_lora import stored_type
    from kompakt.model.lora_adapter import attached
    from kompakt.ops.ggml_types import fake_quantize

    with torch.no_grad():
        for factor in (f for pair in attached(model.model).values() for f in pair):
            array = factor.detach().float().numpy()
            factor.copy_(torch.from_numpy(fake_quantize(array, stored_type(array, lora_type))))


def llamacpp_agreement(model, workdir: Path, ids: torch.Tensor, tokens: int) -> dict:
    """llama.cpp (base q4_0 GGUF + adapter GGUF) against kompakt's own forward of base + adapter."""
    import llama_cpp
    import numpy as np
    import torch.nn.functional as F

    windows = ids[: tokens // 512 * 512].reshape(-1, 512)
    llm = llama_cpp.Llama(model_path=str(workdir / "base.gguf"), lora_path=str(workdir / "lora.gguf"),
                          logits_all=True, n_ctx=512, verbose=False, n_threads=torch.get_num_threads())  # fmt: skip
    agree, kl, n = 0, 0.0, 0
    try:
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            theirs = torch.from_numpy(np.array(llm.scores[:512], dtype=np.float32))
            with torch.no_grad():
                ours = model.model(window[None]).logits[0].float()
            agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            kl += float(F.kl_div(F.log_softmax(theirs, -1), F.log_softmax(ours, -1), log_target=True, reduction="sum"))
            n += window.numel()
    finally:
        llm.close()
    return {"llamacpp_top1_agreement": agree / n, "llamacpp_kl_mean": kl / n, "llamacpp_tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=128, help="calibration blocks of 512 tokens")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="evaluation tokens of WikiText-2 test")
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    parser.add_argument("--tune-tokens", default="0", help="comma list: 0 = closed form; N = then tune_tokens N")
    parser.add_argument("--tune-lr", type=float, default=1e-3)
    parser.add_argument("--quantized", type=Path, help="a saved GPTQ q4_0 model to start from")
    parser.add_argument("--awq", action="store_true", help="the base is AWQ+GPTQ q4_0 (one run)")
    parser.add_argument("--llamacpp", action="store_true", help="check llama.cpp + adapter against kompakt")
    parser.add_argument("--lora-type", default="f16", choices=("f16", "q8_0"), help="the adapter GGUF's type")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=quant.DATA, help="the WikiText-2 directory (../shared/data/wikitext2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lowrank_compensate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quant.DATA = heal.DATA = args.data  # read by calibration_blocks / evaluation_ids / clean_valid_text

    from kompakt.evaluate import fidelity
    from kompakt.model.lora_adapter import detach
    from kompakt.model.load import load

    original = load(args.model, device="cpu", dtype="float32")
    calib = calibration_blocks(original.tokenizer, args.blocks)
    ids = evaluation_ids(original.tokenizer)
    from_gguf = args.quantized is not None and args.quantized.suffix.lower() == ".gguf"
    label = f"GGUF {args.quantized.name}" if from_gguf else "AWQ+GPTQ q4_0" if args.awq else "GPTQ q4_0"
    header = {"protocol": {"model": args.model, "calibration": f"{args.blocks}x512 wiki.valid (seed 0)",
                           "evaluation": f"first {args.eval_tokens} tokens of wiki.test.raw, window 512, stride 512",
                           "allocation": args.allocation, "base": label}, "machine": machine()}  # fmt: skip
    results = ResultsFile(args.out, header, merge=False)
    quantized, quant_s = quantize(original, calib, args.quantized, args.awq)
    workdir = Path(tempfile.mkdtemp(prefix="kompakt-bench-eora-"))
    if from_gguf:  # the file is the base llama.cpp runs the adapter on
        (workdir / "base.gguf").symlink_to(args.quantized.resolve())
        base_bytes = args.quantized.stat().st_size
    else:
        base_bytes = gguf_bytes(quantized, workdir)
    fid = fidelity(original, quantized, ids, window=512, stride=512, max_tokens=args.eval_tokens)
    base = {"name": label, "rank": 0, "kl": fid.kl_mean, "kl_p99": fid.kl_p99, "top1": fid.top1,
            "ppl": fid.ppl_candidate, "ppl_original": fid.ppl_reference, "gguf_bytes": base_bytes, "added_bytes": 0,
            "seconds": quant_s}  # fmt: skip
    results.add(base)
    print(f"{'candidate':28} {'KL':>7} {'dKL':>7} {'top-1':>7} {'ppl':>7} {'+bytes':>8} {'s':>6}")
    print(f"{base['name']:28} {base['kl']:7.4f} {'':>7} {base['top1']:7.1%} {base['ppl']:7.2f} {'':>8} {quant_s:6.0f}",
          flush=True)  # fmt: skip
    runs = [(int(r), int(t)) for r in args.ranks.split(",") for t in args.tune_tokens.split(",")]
    for rank, tune in runs:
        detach(quantized.model)
        report, seconds = compensate(quantized, original, calib, rank, args.allocation, tune, args.tune_lr)
        round_as_stored(quantized, args.lora_type)
        added = gguf_bytes(quantized, workdir, args.lora_type)
        fid = fidelity(original, quantized, ids, window=512, stride=512, max_tokens=args.eval_tokens)
        name = f"+ EoRA {args.allocation} r{rank}" + (f", tuned {tune // 1024}k" if tune else "") + f" ({args.lora_type})"
        row = {"name": name, "rank": rank, "tune_tokens": tune, "kl": fid.kl_mean, "kl_p99": fid.kl_p99,
               "top1": fid.top1, "ppl": fid.ppl_candidate, "added_bytes": added, "added_share": added / base_bytes,
               "kl_reduction": 1 - fid.kl_mean / base["kl"], "seconds": seconds, "summary": report.summary,
               "lora_type": args.lora_type}  # fmt: skip
        if args.llamacpp:
            row.update(llamacpp_agreement(quantized, workdir, ids, min(args.eval_tokens, 16384)))
        results.add(row)
        print(f"{row['name']:28} {row['kl']:7.4f} {-row['kl_reduction']:+7.1%} {row['top1']:7.1%} {row['ppl']:7.2f} "
              f"{row['added_share']:+8.2%} {seconds:6.0f}", flush=True)  # fmt: skip
        if "llamacpp_top1_agreement" in row:
            print(f"  llama.cpp base+adapter vs kompakt: top-1 {row['llamacpp_top1_agreement']:.1%}, "
                  f"KL {row['llamacpp_kl_mean']:.4f} on {row['llamacpp_tokens']} tokens", flush=True)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
