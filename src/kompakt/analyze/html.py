"""A self-contained analysis.html: tables plus the PNG plots embedded as base64 (no external URLs)."""

from __future__ import annotations

import base64
import html
from string import Template

from kompakt.analyze.experts import experts_html
from kompakt.analyze.result import Analysis

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>kompakt analysis: $name</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.muted{color:#666;font-size:90%}
</style></head><body>
<h1>Analysis of $name</h1>
<p>$shape</p>
<p class="muted">$settings</p>
<h2>Where to cut</h2>
<ul>$summary</ul>
<h2>Parameters and bytes</h2>
$breakdown
<h2>Baseline</h2>
$baseline
<h2>Plots</h2>
$images
<h2>Per layer</h2>
$layers
$notes
<p class="muted">Written by kompakt analyze.</p>
</body></html>
""")


def html_table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _mb(count: float) -> str:
    return f"{count / 1e6:.2f} MB"


def _breakdown(analysis: Analysis) -> str:
    b = analysis.breakdown
    rows = [
        [name, f"{count:,}", f"{b.share(name):.1%}", _mb(b.bytes[name])] for name, count in b.params.items() if count
    ]
    rows.append(["total", f"{b.total_params:,}", "100%", _mb(b.total_bytes)])
    disk = f"; weight files on disk: {_mb(b.disk_bytes)}" if b.disk_bytes else ""
    caption = f"<p class='muted'>bytes at {html.escape(b.storage_dtype)} ({b.bytes_per_param} B/param){html.escape(disk)}</p>"
    return html_table(["component", "parameters", "share", "bytes"], rows) + caption


def _baseline(analysis: Analysis) -> str:
    if analysis.is_encoder:
        ref = analysis.reference
        rows = [["held-out sentences (reference embeddings)", ref["sentences"]], ["embedding size", ref["embedding_dim"]]]
        return html_table(["metric", "value"], rows)
    rows = [["perplexity (held-out, reference run)", f"{analysis.reference['ppl']:.3f}"]]
    base = analysis.baseline or {}
    if base.get("perplexity"):
        ppl = base["perplexity"]
        rows.append([f"perplexity (kompakt.evaluate, {ppl.get('tokens_scored', '?')} tokens)", f"{ppl['ppl']:.3f}"])
    for key, value in (base.get("speed") or {}).items():
        if isinstance(value, (int, float)):
            rows.append([f"speed: {key}", f"{value:.4g}" if isinstance(value, float) else str(value)])
    return html_table(["metric", "value"], rows)


def _encoder_layers(analysis: Analysis) -> str:
    bits = analysis.settings["quant"]["bits"]
    header = ["layer", "params", "block influence", "skip cos", "skip min cos", f"{bits}-bit cos", f"{bits}-bit min cos"]
    rows = [
        [row["index"], f"{row['params']:,}", f"{row['block_influence']:.4f}", f"{row['skip']['cosine']:.4f}",
         f"{row['skip']['min_cosine']:.4f}", f"{row['quant']['cosine']:.5f}", f"{row['quant']['min_cosine']:.5f}"]
        for row in analysis.layers
    ]  # fmt: skip
    table = html_table(header, rows)
    roles = list(analysis.layers[0]["quant"].get("per_linear", {})) if analysis.layers else []
    if roles:  # analyze_encoder(per_linear=True): each Linear quantized alone
        rows = [[row["index"], *(f"{row['quant']['per_linear'][role]:.2e}" for role in roles)] for row in analysis.layers]
        table += f"<p>{bits}-bit RTN of one Linear alone: 1 - cosine</p>" + html_table(["layer", *roles], rows)
    return table


def _layers(analysis: Analysis) -> str:
    if analysis.is_encoder:
        return _encoder_layers(analysis)
    header = ["layer", "params", "block influence", "skip KL", "skip ppl", "skip top-1", "4-bit KL", "4-bit ppl"]
    rows = [
        [
            row["index"],
            f"{row['params']:,}",
            f"{row['block_influence']:.4f}",
            f"{row['skip']['kl']:.4f}",
            f"{row['skip']['ppl']:.2f}",
            f"{row['skip']['top1']:.1%}",
            f"{row['quant']['kl']:.4f}",
            f"{row['quant']['ppl']:.2f}",
        ]
        for row in analysis.layers
    ]
    return html_table(header, rows)


def embed_images(images: dict[str, bytes]) -> str:
    parts = []
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}"></p>')
    return "\n".join(parts)


def _settings(analysis: Analysis) -> str:
    s = analysis.settings
    if analysis.is_encoder:
        quant = s["quant"]
        return (
            f"data: {s['data']}; calibration {s['calibration']['sentences']} sentences (padding left out); "
            f"held-out {s['heldout']['sentences']} sentences ({s['heldout']['tokens']} tokens); "
            f"{s['truncation']}; quantization {quant['bits']}-bit RTN, symmetric, group {quant['group_size']}; "
            f"cost: {s['cost']}"
        )
    cal, held, quant = s["calibration"], s["heldout"], s["quant"]
    return (
        f"calibration {cal['blocks']} x {cal['block_len']} tokens; held-out {held['windows']} windows of "
        f"{held['window']} ({held['scored_tokens']} scored tokens); quantization {quant['bits']}-bit RTN, "
        f"symmetric, group {quant['group_size']}"
    )


def _shape(model: dict) -> str:
    return (
        f"{model['model_type']}: {model['layers']} layers, hidden {model['hidden_size']}, MLP {model['intermediate_size']}, "
        f"{model['heads']} heads / {model['kv_heads']} KV heads, vocabulary {model['vocab_size']:,}; "
        f"stored {model['storage_dtype']}, computed {model['compute_dtype']} on {model['device']}"
    )


def render(analysis: Analysis, images: dict[str, bytes]) -> str:
    """The whole page as a string."""
    notes = analysis.notes + analysis.breakdown.notes
    notes_html = "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else ""
    return PAGE.substitute(
        name=html.escape(analysis.model["name"]),
        shape=html.escape(_shape(analysis.model)),
        settings=html.escape(_settings(analysis)),
        summary="".join(f"<li>{html.escape(line)}</li>" for line in analysis.summary["lines"]),
        breakdown=_breakdown(analysis),
        baseline=_baseline(analysis),
        images=embed_images(images),
        layers=_layers(analysis) + experts_html(analysis.experts, html_table),
        notes=notes_html,
    )
