"""`diffmix plan`: the dry run's step rule, FLOP figures and printout (no Ray, no GPU, no images)."""
import json
import os
import subprocess
import sys

import pytest

from engine.cli import main
from engine.config import load_config
from engine.synthesis import cost
from engine.synthesis.dryrun import estimate, rows_per_strength
from engine.synthesis.model_flops import SD15_FLOPS, SD15_SHAPES, ComponentFlops, count_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = ComponentFlops(unet=1e12, vae_encode=2e12, vae_decode=3e12, text_encode=0.5e12, how="unit figures")


def diffmix(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def test_unet_evaluations_follow_the_step_rule_by_hand():
    """T = 10, s in {0.3, 0.55, 1.0}, guidance 7.5: int(10 s) = 3, 5, 10 steps, two UNet samples a step."""
    w = cost.work({0.3: 4, 0.55: 2, 1.0: 1}, 10, 7.5, False, "dpmsolver++", UNIT)
    assert [(x.strength, x.steps, x.evaluations) for x in w.lines] == [(0.3, 3, 24), (0.55, 5, 20), (1.0, 10, 20)]
    assert w.evaluations == 4 * 3 * 2 + 2 * 5 * 2 + 1 * 10 * 2 == 64 and w.unet_tflop == 64
    assert (w.vae_encode_tflop, w.vae_decode_tflop, w.text_encode_tflop) == (7 * 2, 7 * 3, 7 * 2 * 0.5)
    # no guidance: one sample a step; PNDM: one step more; text-to-image (*-gen): T steps and no encode
    assert cost.work({0.3: 4}, 10, 1.0, False, "ddim", UNIT).evaluations == 12
    assert cost.work({0.3: 4}, 10, 7.5, False, "pndm", UNIT).evaluations == 4 * 4 * 2
    gen = cost.work({1.0: 5}, 25, 7.5, True, "dpmsolver++", UNIT)
    assert gen.evaluations == 5 * 25 * 2 and gen.vae_encode_tflop == 0
    # the paper's mix: int(25 s) = 12, 17, 22 (diffusers' img2img rule, float products included)
    assert [cost.denoise_steps(25, s, False) for s in (0.5, 0.7, 0.9)] == [12, 17, 22]


def test_plan_rows_per_strength_are_the_plans():
    config = load_config(None, ["synthesis.multiplier=2", "synthesis.strengths=[0.5, 0.9]", "cost.train_images=50"])
    counts = rows_per_strength(config, 50)
    assert sum(counts.values()) == 100 and set(counts) == {0.5, 0.9} and abs(counts[0.5] - counts[0.9]) <= 8


def test_known_sd15_figures_are_what_the_counter_counts():
    """DESIGN.md's per-pass figures (UNet 803 GFLOP, VAE 1.1 / 2.5 TFLOP at 512 px) are torch's FlopCounterMode
    on the SD-1.5 shapes, counted without weights (meta device)."""
    counted = count_flops(SD15_SHAPES, 512)
    for name, known in SD15_FLOPS.items():
        assert getattr(counted, name) == pytest.approx(known, rel=1e-3), name


def test_sd15_diff_mix_image_is_about_31_tflop():
    """DESIGN.md: int(25 s) x 2 UNet evaluations for s in {0.5, 0.7, 0.9}, plus VAE: ~31 TFLOP an image."""
    w = cost.work({0.5: 1, 0.7: 1, 0.9: 1}, 25, 7.5, False, "dpmsolver++", ComponentFlops(**SD15_FLOPS, how=""))
    assert w.tflop_per_image == pytest.approx(31.0, abs=0.2)


def test_deadline_and_node_sizing():
    assert cost.gpus_for_deadline(10.0, 2.5) == 4 and cost.gpus_for_deadline(10.0, 3.0) == 4
    assert cost.gpus_for_deadline(0.1, 24) == 1
    nodes = cost.node_costs(16.0, 12, [{"name": "big", "instance": "x8", "max_workers": 1}],
                            {"x8": {"usd_per_hour": 10.0, "gpus": 8, "gpu": "H"}})
    assert (nodes[0].node_hours, nodes[0].usd, nodes[0].nodes_for_deadline) == (2.0, 20.0, 2)
    assert "max_workers 1: raise it" in "\n".join(cost.format_estimate(cost.PlanEstimate(
        "diff-mix", 1, 1.0, 512, 8, 25, 7.5, "dpmsolver++", cost.work({0.5: 1}, 25, 7.5, False, "x", UNIT), UNIT,
        1.0, "test", 16.0, 1, 8.0, 12, nodes)))


def test_estimate_for_the_tiny_model_counts_its_shapes(tmp_path):
    config = load_config(None, [f"model.cache_dir={tmp_path}", "cost.train_images=40", "synthesis.resolution=32",
                                "cost.rate=1000", "cost.deadline_h=0.05"])
    est = estimate(config)
    assert est.work.rows == 200 and "counted from" in est.flops.how and est.flops.unet < 1e9
    assert est.gpu_hours == pytest.approx(0.2) and est.gpus_for_deadline == 4


def test_diffmix_plan_on_the_cub_config_prints_the_numbers():
    out = diffmix("plan", "--config", "examples/cub.yaml", "--train-images", "5994", "--deadline", "0.5")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # rows: 5 x 5,994; UNet evaluations: (12 + 17 + 22) x 2 per third of the rows
    assert "29,970 rows" in text and "1,019,040" in text
    for expected in ("UNet TFLOP", "818,564", "31.0 TFLOP per image", "GPU-hours: 0.94", "bytes written: 11.80 GB",
                     "deadline 0.5 h: 2 GPUs", "g5.2xlarge", "p4d.24xlarge", "H200 2026-11-26"):
        assert expected in text, (expected, text)
    js = diffmix("plan", "--config", "examples/cub.yaml", "--train-images", "5994", "--rate", "10000", "--json")
    data = json.loads(js.stdout)
    assert data["work"]["evaluations"] == 1_019_040 and data["gpu_hours"] == pytest.approx(2.997)


@pytest.mark.parametrize("flag,value", [("--rate", "0"), ("--rate", "fast"), ("--deadline", "-2"),
                                        ("--deadline", "inf"), ("--train-images", "1.5")])
def test_bad_plan_flags_are_one_line_errors(flag, value, capsys):
    assert main(["plan", "--config", "examples/cub.yaml", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith(f"diffmix plan: {flag} must be") and repr(value) in err


def test_plan_flags_belong_to_plan_only(capsys):
    assert main(["check", "--rate", "100"]) == 2
    assert "--rate is an option of `diffmix plan` only" in capsys.readouterr().err


def test_pipeline_start_log_prices_sd15_and_only_counts_rows_for_other_models(tmp_path, tiny_cache, caplog,
                                                                                 monkeypatch):
    """`diffmix pipeline` logs the plan's lines at start; it never pays the meta-device FLOP count (a
    diffusers import and trace) for a model that is not SD-1.5-shaped at 512 px."""
    import logging

    from engine.synthesis import dryrun

    original = dryrun.component_flops

    def known_only(shapes, resolution):
        assert shapes.is_sd15() and resolution == 512, "the pipeline's start log counted a model's FLOPs"
        return original(shapes, resolution)

    monkeypatch.setattr(dryrun, "component_flops", known_only)
    caplog.set_level(logging.INFO, logger="engine.synthesis.dryrun")
    dryrun.log_estimate(load_config(None, [f"model.cache_dir={tiny_cache}", "cost.train_images=40",
                                           "synthesis.resolution=32"]))
    assert "200 rows" in caplog.text and "UNet evaluations" in caplog.text and "`diffmix plan` counts" in caplog.text
    caplog.clear()
    dryrun.log_estimate(load_config("examples/cub.yaml", ["cost.train_images=5994"]))
    assert "29,970 rows" in caplog.text and "GPU-hours: " in caplog.text
