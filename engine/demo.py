"""`make demo`: the whole pipeline on the built-in default (local Ray, tiny offline models, ./runs/)."""
from __future__ import annotations

import json
import logging
import os
import sys

from engine.cli import resolve_stage, setup_logging
from engine.config import load_config
from engine.storage import Storage, join

log = logging.getLogger(__name__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    overrides = list(argv if argv is not None else sys.argv[1:])
    config = load_config(DEMO_CONFIG, overrides)
    storage = Storage.from_config(config)
    summary = {"check": resolve_stage("check")(config)}
    out = join(config.run.uri, "demo-summary.json")
    storage.write_text(out, json.dumps(summary, indent=2, default=str))
    log.info("demo finished; summary: %s", out)
    print(f"demo summary: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
