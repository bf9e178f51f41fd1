"""The benchmark runner itself (no benchmark is run: they are measured by `make bench`, not timed in tests)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engine.bench import __main__ as runner
from engine.bench.table import Row, format_table


def test_rows_with_numpy_measurements_are_written_as_json() -> None:
    row = Row("b", "case", np.float64(3.0), "images/s", baseline="x", ratio=np.float64(2.0) / 1.0,
              target=">= 1x", ok=np.float64(2.0) >= 1)
    assert json.loads(json.dumps(row.as_dict())) == {
        "bench": "b", "case": "case", "value": 3.0, "unit": "images/s", "baseline": "x", "ratio": 2.0,
        "target": ">= 1x", "ok": True, "device": "cpu"}
    assert "2.00x" in format_table([row]) and "yes" in format_table([row])


def test_runner_creates_the_output_folder_before_the_benchmarks_use_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh checkout has no runs/bench: a benchmark's scratch folder under --out must not fail."""
    import tempfile

    def run(args: object) -> list[Row]:
        scratch = tempfile.mkdtemp(dir=getattr(args, "out"))
        return [Row("probe", scratch, np.float32(1.5), "x", ok=np.bool_(True))]

    module = types.ModuleType("bench_probe")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench_probe", module)
    monkeypatch.setattr(runner, "BENCHMARKS", {"probe": "bench_probe"})
    out = tmp_path / "fresh" / "bench"
    assert runner.main(["probe", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved[0]["bench"] == "probe" and saved[0]["ok"] is True and saved[0]["value"] == 1.5
    assert "probe" in capsys.readouterr().out


def test_unknown_benchmark_is_named() -> None:
    with pytest.raises(SystemExit):
        runner.main(["nope"])
