"""Shared fixtures: the repo's tools/ on sys.path, the real SmolLM2 model, small synthetic models."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
