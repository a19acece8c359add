"""report.md and a self-contained report.html (plots embedded as base64) from report.json's dict."""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from kompakt.analyze.html import embed_images, html_table
from kompakt.report.document import comparison_rows

TRAJECTORY_HEADER = ["attempt", "step", "pass", "params", "size", "ppl", "ppl ratio", "KL", "top-1", "time s", "summary"]


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else ""


def trajectory_rows(report: dict) -> list[list[str]]:
    return [
        [str(r["attempt"]), str(r["step"]), r["pass"], _fmt((r["parameters"] or 0) / 1e6, ".2f") + " M",
         _fmt((r["bytes"] or 0) / 1e6, ".1f") + " MB", _fmt(r["ppl"], ".4g"), _fmt(r["ppl_ratio"], ".3f"),
         _fmt(r["kl"], ".4f"), _fmt(r["top1"], ".1%"), _fmt(r["wall_s"], ".0f"), r.get("summary", "")]
        for r in report["trajectory"]
    ]  # fmt: skip


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines + [""]


def _machine_line(report: dict) -> str:
    machine = (report.get("comparison") or {}).get("machine", {})
    return ", ".join(f"{k} {v}" for k, v in machine.items() if v) or "not recorded"


def markdown(report: dict) -> str:
    plan, comparison = report["plan"], report.get("comparison") or {}
    name = report["auto"].get("model", "model")
    lines = [f"# kompakt: {name} — original vs small model", "", report["outcome"], ""]
    if comparison:
        lines += ["## Side by side", ""] + _md_table(["", "original", "result", "change"], comparison_rows(comparison))
        lines += [f"- {note}" for note in comparison.get("notes", [])] + [""]
    lines += ["## Choices", ""] + [f"- {c}" for c in plan["choices"]] + [""]
    lines += ["## Trajectory", ""] + _md_table(TRAJECTORY_HEADER, trajectory_rows(report))
    for sample in (comparison.get("samples") or []):
        lines += [f"**Prompt:** {sample['prompt']}", "", f"- original: {sample['original']!r}",
                  f"- result: {sample['result']!r}", ""]  # fmt: skip
    lines += ["## Recipe", "", "```yaml", report["recipe_yaml"].rstrip(), "```", ""]
    exports = report.get("exports") or {}
    lines += [f"- export {k}: `{v}`" for k, v in exports.items()]
    wall = report.get("wall_s")
    lines += ["", f"Machine: {_machine_line(report)}." + (f" Wall time: {wall / 60:.1f} min." if wall else "")]
    return "\n".join(lines) + "\n"


PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kompakt report: $name</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.muted{color:#666;font-size:90%}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
.sample td{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:480px}
</style></head><body>
<h1>$name: original vs small model</h1>
<p id="outcome">$outcome</p>
<h2>Side by side</h2>
$comparison
<ul class="muted">$notes</ul>
<h2>Why this plan</h2>
<ul>$choices</ul>
<h2>Trajectory</h2>
$trajectory
$images
<h2>Sample generations (greedy, same prompts)</h2>
$samples
<h2>Recipe</h2>
<p class="muted">Rerun or edit: <code>kompakt compress --recipe $recipe_path --out NEW_DIR</code></p>
<pre>$recipe</pre>
<h2>Exports</h2>
<ul>$exports</ul>
<p class="muted">Machine: $machine. Wall time: $wall. Written by kompakt.</p>
</body></html>
""")


def _list(items) -> str:
    return "".join(f"<li>{html.escape(str(item))}</li>" for item in items)


def _samples(samples: list[dict]) -> str:
    if not samples:
        return "<p class='muted'>not generated</p>"
    rows = [[s["prompt"], s["original"], s["result"]] for s in samples]
    return html_table(["prompt", "original", "result"], rows).replace("<table>", "<table class='sample'>", 1)


def page(report: dict, images: dict[str, bytes]) -> str:
    comparison = report.get("comparison") or {}
    wall = report.get("wall_s")
    return PAGE.substitute(
        name=html.escape(report["auto"].get("model", "model")),
        outcome=html.escape(report["outcome"]),
        comparison=html_table(["", "original", "result", "change"], comparison_rows(comparison)) if comparison else "",
        notes=_list(comparison.get("notes", [])),
        choices=_list(report["plan"]["choices"]),
        trajectory=html_table(TRAJECTORY_HEADER, trajectory_rows(report)),
        images=embed_images(images),
        samples=_samples(comparison.get("samples") or []),
        recipe_path=html.escape(str(Path(report["run_dir"]) / "recipe.yaml")),
        recipe=html.escape(report["recipe_yaml"]),
        exports=_list(f"{k}: {v}" for k, v in (report.get("exports") or {}).items()),
        machine=html.escape(_machine_line(report)),
        wall=f"{wall / 60:.1f} min" if wall else "not recorded",
    )
