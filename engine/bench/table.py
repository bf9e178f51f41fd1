"""Result rows and the table `make bench` prints."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Row:
    bench: str          # e.g. "synthesis"
    case: str           # what was measured
    value: float        # the measurement
    unit: str           # e.g. "images/s"
    baseline: str = ""  # what it is compared against (same run)
    ratio: float | None = None   # value / baseline value
    target: str = ""    # e.g. ">= 4x"
    ok: bool | None = None       # whether the target holds
    device: str = "cpu"

    def __post_init__(self) -> None:
        # measurements often arrive as numpy scalars (np.float64, np.bool_), which json cannot write
        self.value = float(self.value)
        self.ratio = None if self.ratio is None else float(self.ratio)
        self.ok = None if self.ok is None else bool(self.ok)

    def as_dict(self) -> dict:
        return asdict(self)


def format_table(rows: list[Row]) -> str:
    headers = ["bench", "case", "value", "unit", "baseline", "ratio", "target", "ok", "device"]
    cells = [[r.bench, r.case, f"{r.value:.3g}", r.unit, r.baseline,
              "" if r.ratio is None else f"{r.ratio:.2f}x", r.target,
              "" if r.ok is None else ("yes" if r.ok else "NO"), r.device] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "-+-".join("-" * w for w in widths)
    body = [" | ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join([line, sep, *body])
