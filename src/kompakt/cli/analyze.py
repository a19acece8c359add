"""`kompakt analyze`: where a model's parameters are, what matters, what is fragile, where to cut."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kompakt.cli.device import device_option, on_device

HELP = "Analyse a model: parameter breakdown, layer / head / channel importance, quantization sensitivity."


def _breakdown_table(result: dict) -> Table:
    b = result["breakdown"]
    table = Table(title=f"parameters of {result['model']['name']}")
    for name, justify in (("component", "left"), ("parameters", "right"), ("share", "right"), ("bytes", "right")):
        table.add_column(name, justify=justify)
    for name, count in b["params"].items():
        if count:
            note = " (tied, = embeddings)" if name == "embeddings" and b["tied_embeddings"] else ""
            share = count / max(1, b["total_params"])
            table.add_row(name + note, f"{count:,}", f"{share:.1%}", f"{b['bytes'][name] / 1e6:,.1f} MB")
    table.add_row("total", f"{b['total_params']:,}", "100%", f"{b['total_bytes'] / 1e6:,.1f} MB ({b['storage_dtype']})")
    return table


def _layer_table(result: dict) -> Table:
    summary = result["summary"]
    cheap, sensitive = set(summary["cheapest_to_skip"]), set(summary["most_quant_sensitive"])
    quant = result["settings"]["quant"]
    table = Table(title="layers (skip = layer replaced by identity; 4-bit = only its Linears quantized)")
    headers = ["layer", "block infl.", "skip KL", "skip ppl", f"{quant['bits']}-bit KL", "note"]
    for header in headers:
        table.add_column(header, justify="left" if header == "note" else "right")
    for row in result["layers"]:
        notes = []
        if row["index"] in cheap:
            notes.append("cheap to drop")
        if row["index"] in sensitive:
            notes.append("keep precision")
        table.add_row(
            str(row["index"]),
            f"{row['block_influence']:.4f}",
            f"{row['skip']['kl']:.4f}",
            f"{row['skip']['ppl']:.2f}",
            f"{row['quant']['kl']:.4f}",
            ", ".join(notes),
        )
    return table


def _encoder_layer_table(result: dict) -> Table:
    summary, bits = result["summary"], result["settings"]["quant"]["bits"]
    cheap, sensitive = set(summary["cheapest_to_skip"]), set(summary["most_quant_sensitive"])
    table = Table(title=f"layers (cosine of sentence embeddings to the unedited model; {bits}-bit = only its Linears)")
    for header in ("layer", "block infl.", "skip cos", "skip min cos", f"{bits}-bit cos", "note"):
        table.add_column(header, justify="left" if header == "note" else "right")
    for row in result["layers"]:
        notes = ["cheap to drop"] * (row["index"] in cheap) + ["keep precision"] * (row["index"] in sensitive)
        table.add_row(
            str(row["index"]), f"{row['block_influence']:.4f}", f"{row['skip']['cosine']:.4f}",
            f"{row['skip']['min_cosine']:.4f}", f"{row['quant']['cosine']:.5f}", ", ".join(notes),
        )  # fmt: skip
    return table


def _print_encoder_report(result: dict) -> None:
    console, settings = Console(), result["settings"]
    console.print(_breakdown_table(result))
    console.print(_encoder_layer_table(result))
    console.print("[bold]Where to cut[/]")
    for line in result["summary"]["lines"]:
        console.print(f"  • {line}", highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", style="dim", highlight=False)
    console.print(
        f"data: {settings['data']}; calibration {settings['calibration']['sentences']} sentences, held-out "
        f"{settings['heldout']['sentences']} sentences; analysis {result['timings']['total_s']:.0f} s "
        f"({result['timings']['cpu_s']:.0f} s CPU)",
        style="dim",
        highlight=False,
    )
    for path in result["files"].values():
        console.print(f"wrote {path}", highlight=False)


def _print_report(result: dict, data_name: str) -> None:
    if result["settings"].get("task") == "embed":
        _print_encoder_report(result)
        return
    console = Console()
    settings, held = result["settings"], result["settings"]["heldout"]
    console.print(_breakdown_table(result))
    console.print(_layer_table(result))
    console.print("[bold]Where to cut[/]")
    for line in result["summary"]["lines"]:
        console.print(f"  • {line}", highlight=False)
    baseline = result.get("baseline") or {}
    line = f"perplexity {result['reference']['ppl']:.3f} on {held['scored_tokens']} held-out tokens"
    if baseline.get("speed"):
        speed = baseline["speed"]
        line += f"; prefill {speed['prefill_tokens_per_s']:,.0f} tok/s, generate {speed['generate_tokens_per_s']:,.1f} tok/s"
    console.print(f"[bold]Baseline[/] {line}", highlight=False)
    cal = settings["calibration"]
    console.print(
        f"data: {data_name}, {settings['data_tokens']:,} tokens; calibration {cal['blocks']} x {cal['block_len']} tokens; "
        f"held-out {held['windows']} x {held['window']} tokens; analysis {result['timings']['total_s']:.0f} s "
        f"({result['timings']['cpu_s']:.0f} s CPU)",
        style="dim",
        highlight=False,
    )
    for name, path in result["files"].items():
        console.print(f"wrote {path}", highlight=False)


def _default_out(name: str) -> Path:
    return Path(f"analysis-{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}")


@on_device
def analyze_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file, embedded name or hub id (default: smollm2-135m)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Text (txt, jsonl, parquet, HF dataset dir); default: self-generated."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for analysis.json/.html and plots (default: ./analysis-<model>)."),
    tokens: int = typer.Option(4096, "--tokens", help="Tokens of data to use (held-out + calibration)."),
    blocks: int = typer.Option(8, "--blocks", help="Calibration blocks (block influence, channel importance)."),
    block_len: int = typer.Option(256, "--block-len", help="Tokens per calibration block."),
    eval_tokens: int = typer.Option(1024, "--eval-tokens", help="Held-out tokens for skip cost / sensitivity (the last N)."),
    window: int = typer.Option(256, "--window", help="Tokens per held-out window."),
    bits: int = typer.Option(4, "--bits", help="Bits of the per-layer RTN sensitivity test."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size (0 = per channel)."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement."),
    calib_sentences: int = typer.Option(64, "--calib-sentences", help="Encoders: calibration sentences."),
    eval_sentences: int = typer.Option(64, "--eval-sentences", help="Encoders: held-out sentences (the last N)."),
    per_linear: bool = typer.Option(False, "--per-linear", help="Encoders: also quantize each Linear alone (slower)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (without per-channel arrays), to stdout."),
    device: str = device_option(),
) -> None:
    """Analyse a model: parameter breakdown, layer / head / channel importance, quantization sensitivity."""
    from kompakt.analyze import analyze
    from kompakt.analyze.output import check_out
    from kompakt.data import load_tokens
    from kompakt.model.load import load

    check_out(out)  # a bad --out fails before the model loads
    loaded = load(model)
    if loaded.is_encoder:
        options = dict(calib_sentences=calib_sentences, bits=bits, group_size=group_size or None, per_linear=per_linear)
        _analyze_encoder(loaded, data, out or _default_out(loaded.name), eval_sentences, options, as_json)
        return
    ids = load_tokens(data, loaded, n_tokens=tokens)
    analysis = analyze(
        loaded,
        ids,
        out=out or _default_out(loaded.name),
        n_blocks=blocks,
        block_len=block_len,
        eval_tokens=eval_tokens,
        eval_window=window,
        bits=bits,
        group_size=group_size or None,
        speed=not no_speed,
    )
    _show(analysis.to_dict(), as_json, data or "self-generated (text written by the model itself; pass --data for your own)")


def _analyze_encoder(loaded, data, out: Path, eval_sentences: int, options: dict, as_json: bool) -> None:
    """Encoders are analysed on sentences (kompakt.evaluate.sentences: --data split by the one
    sentence rule, or the shipped held-out set, which needs no generation); a file with fewer
    sentences than asked shrinks the held-out set to half of them."""
    from kompakt.analyze.encoder import analyze_encoder
    from kompakt.evaluate.sentences import load_sentences

    found = load_sentences(data, max_sentences=options["calib_sentences"] + eval_sentences)
    analysis = analyze_encoder(
        loaded, found.sentences, out=out, eval_sentences=max(1, min(eval_sentences, len(found.sentences) // 2)),
        source=found.describe(), **options,
    )  # fmt: skip
    _show(analysis.to_dict(), as_json, found.describe())


def _show(result: dict, as_json: bool, data_name: str) -> None:
    if as_json:
        channels = result.get("channels")
        if channels:  # thousands of numbers: they are in analysis.json
            result["channels"] = {"aggregation": channels["aggregation"], "in_file": result["files"].get("analysis.json")}
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_report(result, data_name)


def register(app: typer.Typer) -> None:
    app.command(name="analyze", help=HELP)(analyze_command)
