"""Export a synthetic set as an image folder or WebDataset shards: `python jobs/export.py --config x.yaml export.output=URI ...`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("export")
