"""The ``kvstore`` console script: ``kvstore.cli.main``, imported inside the Ctrl-C handling.

Importing the CLI imports torch (about a second): a Ctrl-C then printed a
``KeyboardInterrupt`` traceback from inside torch's import, and a closed
pipe a ``BrokenPipeError``; ``kvstore.cli.main`` handles both only once it
runs.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import and run the CLI; a Ctrl-C while importing exits 130 with one line, as during a command."""
    try:
        from kvstore.cli import main as run
    except KeyboardInterrupt:
        print("kvstore: interrupted", file=sys.stderr)
        return 130
    return run()
