"""Writing an Analysis out: analysis.json, the PNG plots and analysis.html, each file atomically."""

from __future__ import annotations

import json
from pathlib import Path

from kompakt.analyze import html as html_page
from kompakt.analyze import plots
from kompakt.analyze.output import write_files
from kompakt.analyze.result import Analysis


def write_outputs(analysis: Analysis, out_dir: Path) -> dict[str, str]:
    """Write analysis.json, the plots and analysis.html into out_dir (each file atomically)."""
    images = plots.all_plots(analysis)
    names = ["analysis.json", *images, "analysis.html"]
    analysis.files = {name: str(out_dir / name) for name in names}
    contents: dict[str, bytes] = dict(images)
    contents["analysis.html"] = html_page.render(analysis, images).encode()
    contents["analysis.json"] = json.dumps(analysis.to_dict(), indent=1).encode()
    write_files(out_dir, contents)
    return analysis.files
