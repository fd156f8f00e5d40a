"""Alias of ``python -m benchmarks``: ``python -m benchmarks.run [--full | --tiny] [...]``.

Also runs as a path, ``python benchmarks/run.py``, from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a path: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
