"""Tests import with --import-mode=importlib (no sys.path changes): make the helpers beside them importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
