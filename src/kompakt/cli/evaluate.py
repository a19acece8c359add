"""`kompakt eval`: perplexity, fidelity to a reference, size, memory and speed of a model (for a
sentence encoder: embedding cosine, neighbour recall@k, Spearman, sentences/s)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kompakt.cli.device import device_option, on_device
from kompakt.errors import ConfigError

HELP = (
    "Measure a model: perplexity, KL / top-1 vs a reference, size, peak memory, speed "
    "(encoders: embedding cosine, recall@10, Spearman, sentences/s)."
)


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f} MB"


def _table(result: dict) -> Table:
    table = Table(title=f"kompakt eval: {result['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    data = result["data"]
    if data == "self-generated":
        data = "self-generated (text written by the model itself; pass --data for your own)"
    rows = [
        ("text", data),
        ("tokens used / scored", f"{result['tokens_used']:,} / {result['tokens_scored']:,}"),
        ("window / stride", f"{result['window']} / {result['stride']}"),
        ("perplexity", f"{result['ppl']:.4f}"),
    ]
    if result.get("reference"):
        rows += [
            ("reference", result["reference"]),
            ("reference perplexity", f"{result['ppl_reference']:.4f}"),
            ("KL mean (nats)", f"{result['kl_mean']:.5f}"),
            ("KL p99 (nats)", f"{result['kl_p99']:.5f}"),
            ("top-1 agreement", f"{100 * result['top1']:.2f} %"),
        ]
        extra = result.get("extra") or {}
        if "positions_removed" in extra:  # a trimmed vocabulary (prune.vocab): KL over the kept tokens
            rows += [
                ("next tokens it lacks (not compared)", f"{extra['positions_removed']:,}"),
                ("reference mass on removed tokens", f"{100 * extra['removed_mass']:.3f} %"),
            ]
    rows += _size_rows(result)
    speed = result.get("speed")
    if speed:
        rows += [
            (f"prefill tok/s ({speed['prompt_batch']}x{speed['prompt_len']})", f"{speed['prefill_tokens_per_s']:,.1f}"),
            (f"generate tok/s (batch 1, {speed['gen_tokens']} new)", f"{speed['generate_tokens_per_s']:,.1f}"),
            ("backend / threads", f"{speed['backend']} {speed['dtype']} / {speed['threads']}"),
        ]
    rows.append(("wall time", f"{result['wall_s']:.1f} s"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _size_rows(result: dict) -> list[tuple[str, str]]:
    return [
        ("parameters", f"{result['parameters']:,}"),
        ("parameters in memory", _mb(result["parameter_bytes"])),
        ("weights on disk", _mb(result["disk_bytes"])),
        ("peak RSS (process)", _mb(result["peak_rss_bytes"])),
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _encoder_rows(result: dict) -> list[tuple[str, str]]:
    rows = [("sentences", result["data"]), ("sentence rule", result["sentence_rule"])]
    seen = set()
    for cut in result["truncation"]:  # the stated truncation rule, per model (once when both are one)
        if cut["model"] not in seen:
            seen.add(cut["model"])
            longer = f"{cut['truncated']:,} longer, kept their first {cut['limit']}" if cut["truncated"] else "none longer"
            rows.append((f"input limit ({cut['model']})", f"{cut['limit']} tokens; {longer}"))
    if result.get("reference"):
        rows += [("reference", result["reference"])]
        if result["cosine_mean"] is None:
            rows.append(("cosine to the reference", (result.get("extra") or {}).get("cosine", "-")))
        else:
            rows += [
                ("cosine to the reference: mean", f"{result['cosine_mean']:.4f}"),
                ("cosine: 5th percentile / min", f"{result['cosine_p05']:.4f} / {result['cosine_min']:.4f}"),
            ]
        rows += [
            (f"neighbour recall@{result['k']} ({result['queries']:,} queries)", _pct(result["recall_at_k"])),
            (f"Spearman of pair similarities ({result['pairs']:,} pairs)", f"{result['spearman']:.4f}"),
        ]
    return rows


def _encoder_table(result: dict) -> Table:
    table = Table(title=f"kompakt eval: {result['model']} (sentence encoder)", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = _encoder_rows(result) + _size_rows(result)
    speed = result.get("speed")
    if speed:
        rows += [
            ("sentences/s, batch 1", f"{speed['batch1_per_s']:,.1f}"),
            (f"sentences/s, batch {speed['batch_size']}", f"{speed['batched_per_s']:,.1f}"),
            ("backend / threads", f"{speed['backend']} {speed['dtype']} / {speed['threads']}"),
        ]
    rows.append(("wall time", f"{result['wall_s']:.1f} s"))
    for name, value in rows:
        table.add_row(name, value)
    return table


@on_device
def eval_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file, embedded name or hub id (default: smollm2-135m)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Original model to compare against (KL, top-1)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Text to evaluate on (txt, jsonl, parquet, HF dataset dir); default: self-generated (encoders: kompakt's held-out sentences)."),
    window: int = typer.Option(512, "--window", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window starts (default: = window)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the text."),
    max_sentences: Optional[int] = typer.Option(None, "--max-sentences", help="Encoders: use only the first N sentences (default 4096)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's choice)."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only, to stdout."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RAM the evaluation may use, e.g. 6GB: a model whose fp32 weights do not fit is run layer by layer over all windows (same numbers; needs --data; no speed)."),
    device: str = device_option("A model evaluated layer by layer (--max-memory) computes on the CPU."),
) -> None:
    """Measure a model: perplexity, KL / top-1 vs a reference, size, peak memory, speed.

    A sentence encoder is measured on sentences instead: cosine to the reference's embeddings,
    neighbour recall@10, Spearman of pair similarities, sentences/s at batch 1 and 32 (--window,
    --stride and --max-tokens do not apply; --max-sentences does)."""
    from kompakt.evaluate import evaluate
    from kompakt.evaluate.windows import check_window

    # Fail on impossible options before loading anything big.
    check_window(window, stride, None, max_tokens)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1 (got {threads})")
    if max_sentences is not None and max_sentences < 2:
        raise ConfigError(f"--max-sentences must be at least 2 (got {max_sentences})")
    from kompakt.evaluate.api import open_within

    candidate = open_within(model, max_memory)
    original = open_within(reference, max_memory) if reference is not None else None
    result = evaluate(
        candidate,
        original,
        data=data,
        window=window,
        stride=stride,
        max_tokens=max_tokens,
        speed=not no_speed,
        threads=threads,
        max_sentences=max_sentences,
    ).to_dict()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        Console().print(_encoder_table(result) if result.get("kind") == "encoder" else _table(result))


def register(app: typer.Typer) -> None:
    app.command(name="eval", help=HELP)(eval_command)
