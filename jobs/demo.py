"""The built-in demo end to end: `python jobs/demo.py [key=value ...]` (what `make demo` runs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
