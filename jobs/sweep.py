"""Ray Tune sweep over gamma, p, multiplier, strength sets and classifier seeds: `python jobs/sweep.py --config examples/demo.yaml key=value ...`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("sweep")
