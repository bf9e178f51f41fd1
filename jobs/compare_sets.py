"""Measure synthetic sets against the real train set: `python jobs/compare_sets.py --config x.yaml metrics.sets=[...]`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("compare-sets")
