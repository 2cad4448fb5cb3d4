"""`bench/` is a folder of scripts at the repository root, not an installed package: make it importable here too
(`python -m pytest` from the root already does; a bare `pytest` does not)."""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[3])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
