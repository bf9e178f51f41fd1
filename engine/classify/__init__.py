"""Classifier stage (DESIGN.md steps 3 and 5): real + synthetic mixing on Ray Train, sweeps on Ray Tune.

Modules: `labels` (soft targets), `mixing` (per-epoch replacement plan and the Ray Data streams),
`augment` (decode + crops on CPU workers), `models` (backbones), `metrics`, `train` (the
`TorchTrainer` loop and `run(config)`), `tune` (`run_sweep(config, ensure_synthetic)`).
"""
