"""report.md and a self-contained report.html (plots embedded as base64) from report.json's dict.

One renderer for every run: a recipe run and a `--target` run give the same keys
(kompakt.report.document), and the sections a run has no data for (the side-by-side table and
samples of a recipe run) are left out, so both formats of both kinds come from the code below.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from kompakt.analyze.html import embed_images, html_table
from kompakt.report import attempts, trajectory
from kompakt.report.document import NO_RECIPE, comparison_rows
from kompakt.units import duration

COMPARISON_HEADER = ["", "original", "result", "change"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines + [""]


def _machine_line(report: dict) -> str:
    machine = (report.get("comparison") or {}).get("machine", {})
    return ", ".join(f"{k} {v}" for k, v in machine.items() if v)


def _footer(report: dict) -> str:
    machine, wall = _machine_line(report), report.get("wall_s")
    parts = ([f"Machine: {machine}."] if machine else []) + ([f"Wall time: {duration(wall)}."] if wall else [])
    return " ".join(parts)


def _choices(report: dict) -> list[str]:
    return list((report.get("plan") or {}).get("choices", []))


def markdown(report: dict) -> str:
    comparison = report.get("comparison") or {}
    lines = [f"# {report['title']}", "", report["outcome"], ""]
    if comparison:
        lines += ["## Side by side", ""] + _md_table(COMPARISON_HEADER, comparison_rows(comparison))
        lines += [f"- {note}" for note in comparison.get("notes", [])] + [""]
    if _choices(report):
        lines += ["## Choices", ""] + [f"- {c}" for c in _choices(report)] + [""]
    if attempts.rows(report):
        lines += ["## Attempts: predicted vs measured KL and bytes", ""] + _md_table(attempts.HEADER, attempts.rows(report))
        lines += [f"- {note}" for note in attempts.notes(report)] + [""]
    if report["trajectory"]:
        lines += ["## Trajectory", ""] + _md_table(*trajectory.table(report["trajectory"]))
    for sample in comparison.get("samples") or []:
        lines += [f"**Prompt:** {sample['prompt']}", "", f"- original: {sample['original']!r}",
                  f"- result: {sample['result']!r}", ""]  # fmt: skip
    lines += ["## Recipe", "", "```yaml", report["recipe_shown"].rstrip(), "```", ""]
    lines += [f"- export {k}: `{v}`" for k, v in (report.get("exports") or {}).items()]
    if _footer(report):
        lines += ["", _footer(report)]
    return "\n".join(lines) + "\n"


PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.muted{color:#666;font-size:90%}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
.sample td{text-align:left;vertical-align:top;white-space:pre-wrap;max-width:480px}
</style></head><body>
<h1>$title</h1>
<div id="outcome">$outcome</div>
$sections
<p class="muted">$footer Written by kompakt.</p>
</body></html>
""")


def _list(items) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in items) + "</ul>"


def _samples(samples: list[dict]) -> str:
    rows = [[s["prompt"], s["original"], s["result"]] for s in samples]
    return html_table(["prompt", "original", "result"], rows).replace("<table>", "<table class='sample'>", 1)


def _sections(report: dict, images: dict[str, bytes]) -> list[tuple[str, str]]:
    """(heading, HTML body) of every section this run has data for, in the Markdown's order."""
    comparison = report.get("comparison") or {}
    sections = []
    if comparison:
        notes = f"<div class='muted'>{_list(comparison.get('notes', []))}</div>"
        sections.append(("Side by side", html_table(COMPARISON_HEADER, comparison_rows(comparison)) + notes))
    if _choices(report):
        sections.append(("Why this plan", _list(_choices(report))))
    if attempts.rows(report):
        table = html_table(attempts.HEADER, attempts.rows(report))
        sections.append(("Attempts: predicted vs measured KL and bytes",
                         table + f"<div class='muted'>{_list(attempts.notes(report))}</div>"))  # fmt: skip
    if report["trajectory"]:
        sections.append(("Trajectory", html_table(*trajectory.table(report["trajectory"])) + embed_images(images)))
    if comparison.get("samples"):
        sections.append(("Sample generations (greedy, same prompts)", _samples(comparison["samples"])))
    path = html.escape(str(Path(report["run_dir"]) / "recipe.yaml"))
    rerun = f"<p class='muted'>Rerun or edit: <code>kompakt compress --recipe {path} --out NEW_DIR</code></p>"
    rerun = "" if report.get("recipe_yaml") == NO_RECIPE else rerun  # nothing to rerun: the original as int8 ONNX
    sections.append(("Recipe", rerun + f"<pre>{html.escape(report['recipe_shown'])}</pre>"))
    if report.get("exports"):
        sections.append(("Exports", _list(f"{k}: {v}" for k, v in report["exports"].items())))
    return sections


def page(report: dict, images: dict[str, bytes]) -> str:
    paragraphs = "".join(f"<p>{html.escape(part)}</p>" for part in report["outcome"].split("\n\n"))
    sections = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in _sections(report, images))
    return PAGE.substitute(title=html.escape(report["title"]), outcome=paragraphs, sections=sections,
                           footer=html.escape(_footer(report)))  # fmt: skip
