"""The demo's reading of its results against the paper's few-shot direction of effect (no Ray)."""
from engine.config import load_config
from engine.demo import DEMO_CONFIG, base_model_note, verdict
from engine.report import ResultRow


def _rows(**top1):
    return [ResultRow(m, m, 0.3, 0.5, v) for m, v in top1.items()]


def test_verdict_says_whether_diff_mix_beats_each_baseline_beyond_the_seed_spread():
    clear = verdict(_rows(**{"real-only": [0.60, 0.61, 0.62], "diff-aug": [0.70, 0.71, 0.72],
                             "diff-mix": [0.80, 0.80, 0.81]}))
    assert "reproduces it" in clear and "NOT" not in clear and "3 classifier seeds" in clear and "overall" in clear
    noisy = verdict(_rows(**{"real-only": [0.60, 0.70], "diff-aug": [0.61, 0.71], "diff-mix": [0.62, 0.72]}))
    assert "same direction" in noisy and "within the seed-to-seed spread" in noisy
    behind = verdict(_rows(**{"real-only": [0.80, 0.81], "diff-aug": [0.70, 0.71], "diff-mix": [0.75, 0.76]}))
    assert "does NOT reproduce" in behind and "not better" in behind
    assert "Too few" in verdict(_rows(**{"real-only": [0.5]}))


def test_verdict_on_a_test_group_reads_that_group():
    rows = [ResultRow("real-only", "-", 0.0, None, [0.9, 0.9], groups={"counterfactual": [0.50, 0.52]}),
            ResultRow("diff-aug", "diff-aug", 0.3, 0.1, [0.9, 0.9], groups={"counterfactual": [0.51, 0.53]}),
            ResultRow("diff-mix", "diff-mix", 0.3, 0.1, [0.8, 0.8], groups={"counterfactual": [0.70, 0.71]})]
    text = verdict(rows, "counterfactual")
    assert "on the counterfactual test group" in text and "reproduces it" in text  # overall it would not
    assert "does NOT" in verdict(rows)


def test_pooled_group_accuracy_weights_groups_by_their_test_size():
    from engine.demo import pooled_accuracy

    metrics = {"acc_group_0": 1.0, "acc_group_1": 0.0}
    assert pooled_accuracy(metrics, [0, 1], {0: 3, 1: 1}) == 0.75


def test_base_model_note_reports_the_shipped_models_generation_check():
    note = base_model_note(load_config(DEMO_CONFIG))
    assert note is not None and "builtin-scenes" in note and "chance 10%" in note
    assert base_model_note(load_config(DEMO_CONFIG, ["model.base=tiny"])) is None


def test_seed_spread_is_the_sample_standard_deviation():
    """Three seeds estimate a spread: ddof = 1 (the population formula would understate it by sqrt(2/3))."""
    import pytest

    row = ResultRow("diff-mix", "diff-mix", 0.3, 0.5, [0.5, 0.6, 0.7])
    assert row.mean == pytest.approx(0.6) and row.std == pytest.approx(0.1)
    assert ResultRow("x", "x", 0.3, 0.5, [0.5]).std == 0.0


def test_runs_at_most_n_at_once_in_call_order_and_stop_at_a_failure():
    import threading
    import time

    import pytest

    from engine.demo import run_at_most

    lock, running, peak, started = threading.Lock(), [0], [0], []

    def call(i, fail=False):
        with lock:
            started.append(i)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 * (3 - i % 3))  # later calls finish first
        with lock:
            running[0] -= 1
        if fail:
            raise ValueError(f"run {i} failed")
        return i * 10

    assert run_at_most([lambda i=i: call(i) for i in range(7)], 2) == [0, 10, 20, 30, 40, 50, 60]
    assert peak[0] == 2
    started.clear()
    with pytest.raises(ValueError, match="run 1 failed"):
        run_at_most([lambda i=i: call(i, fail=i in (1, 2)) for i in range(8)], 2)
    assert len(started) < 8  # no run starts after the failure is seen
