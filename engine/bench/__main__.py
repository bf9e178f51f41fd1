"""`python -m engine.bench [name ...]`: run the benchmarks, print one table, save results JSON."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from engine.bench.table import Row, format_table

# name -> module exposing run(args) -> list[Row]; stages add theirs here
BENCHMARKS: dict[str, str] = {
    "classify": "engine.bench.classify",
    "dataset": "engine.bench.dataset",
    "finetune": "engine.bench.finetune",
    "synthesis": "engine.bench.synthesis",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench")
    parser.add_argument("names", nargs="*", help=f"subset of {sorted(BENCHMARKS)}")
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA-sized cases (needs a GPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="--gpu cases on this device (default: cuda when available; cpu implies --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="--gpu cases on the tiny offline model (the GPU path tested on a CPU)")
    parser.add_argument("--out", default="runs/bench", help="folder for results.json")
    parser.add_argument("--dataset-sizes", default=None,
                        help="dataset bench: image counts to compare, e.g. 200,2000 (default 1000,50000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.names or sorted(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    os.makedirs(args.out, exist_ok=True)  # the benchmarks keep their scratch folders under it
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        rows.extend(module.run(args))
        print(format_table(rows), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump([r.as_dict() for r in rows], fh, indent=2)
    print(f"\nresults: {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
