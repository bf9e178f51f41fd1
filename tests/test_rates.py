"""Reported rates come from windows long enough to mean something (engine.rates)."""
import pytest

from engine.rates import MIN_RATE_EVENTS, MIN_RATE_SECONDS, rate, rate_note
from engine.synthesis.stage import StreamTiming


def test_rate_needs_enough_units_and_seconds():
    assert rate(100, 10.0, 5) == 10.0
    assert rate(100, MIN_RATE_SECONDS - 0.01, 10) is None  # too short in time
    assert rate(100, 60.0, MIN_RATE_EVENTS - 1) is None  # too few files/steps/epochs
    assert rate(100, 0.0, 10) is None
    assert rate_note(10.0, 5) is None
    assert "2 unit(s) < 3" in rate_note(60.0, 2, "steady_images_per_s")
    assert "0.50 s < 5 s" in rate_note(0.5, 9)


@pytest.mark.parametrize("files,stream_s,steady_s", [(2, 30.0, 20.0), (9, 1.2, 1.0), (1, 60.0, 0.0)])
def test_synthesis_reports_no_rate_from_a_short_window(files, stream_s, steady_s):
    """A resumed run that wrote two files once reported 1,760 images/s: no more."""
    out = StreamTiming(files=files, rows=files * 4, stream_s=stream_s, steady_rows=(files - 1) * 4,
                       steady_s=steady_s).rates()
    assert out["steady_images_per_s"] is None and "steady_images_per_s not reported" in out["rate_note"]


def test_synthesis_reports_rates_over_a_long_window():
    out = StreamTiming(files=10, rows=40, stream_s=20.0, steady_rows=36, steady_s=12.0).rates()
    assert out == {"images_per_s": 2.0, "steady_images_per_s": 3.0, "rate_note": None}
