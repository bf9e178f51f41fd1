"""Evaluate a finished classifier on a second dataset: `python jobs/evaluate.py --config examples/waterbirds.yaml key=value ...`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("evaluate")
