"""Command line: the one front door. ``efficientllm plan | prune-oneshot | run | eval | export |
serve | worker | demo-model | demo-data | presets`` (``efficientllm --help`` lists them).

Every command is a thin view over the library; a user mistake prints one ``error:`` line that
says what to do, exits with code 2 and writes nothing. ``run``'s flags are generated from the
config's fields and their docs (``cli/flags.py``).
"""

from __future__ import annotations

import logging
import sys

from efficientllm.cli import evaluate, export, prune, services, train
from efficientllm.cli.common import app

__all__ = ["app", "main"]

for _module in (prune, train, evaluate, export, services):
    _module.register(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
