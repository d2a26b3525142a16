"""The serve tests import their servers from servers.py; the `tiny_server` and `tiny_pipeline` fixtures are in
tests/conftest.py, shared with tests/research (its LLM steps talk to the same real `omni serve`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
