"""The probe measures a process that holds only the model: reading its peak memory must not
import torch (≈ 380 MB of RSS, which once made an F16 and a Q4_0 GGUF look the same size)."""

from __future__ import annotations

import json
import subprocess
import sys

SNIPPET = """
import json, sys
from kompakt.report.probe import _peak_rss_bytes
peak = _peak_rss_bytes()
print(json.dumps({"torch": "torch" in sys.modules, "peak": peak}))
"""


def test_reading_the_peak_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["torch"] is False
    assert 0 < result["peak"] < 150 * 2**20  # an interpreter with kompakt's light modules, no torch
