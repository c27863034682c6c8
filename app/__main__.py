"""``python -m app [--host 127.0.0.1] [--port 7860]``: serve the web app (and, without
``REDIS_URL``, the embedded local worker)."""

from __future__ import annotations

import argparse
import logging

from app.main import run


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
