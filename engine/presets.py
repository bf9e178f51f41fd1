"""Named methods: each row of the paper's comparison tables as a set of config values (`preset: <name>`).

A preset only says what makes the method what it is (strategy, strengths, fine-tuning kind, filter,
classifier regularisers); the dataset, backbone and schedule come from the config it is added to
(e.g. `examples/cub.yaml`). Order of precedence: the YAML, then the preset, then `key=value`
overrides. Values marked "engine's choice" are not given by the paper; each preset's `source` names
where its values come from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    source: str
    values: dict[str, Any] = field(default_factory=dict)


_NO_SYNTHETIC = {"classify.p": 0.0}
# Sec. 7.4: CutMix and Mixup run with weight decay 1e-5 and "mixup ratios" 0.1 / 0.3; in the official code
# that ratio is the probability of mixing a sample (alpha fixed at 1.0), which is what it sets here.
_CUTMIX = {"classify.cutmix_prob": 0.1, "classify.cutmix_alpha": 1.0}
# CMO (Park et al. 2022, the code the paper's long-tail results build on): minority images drawn with
# weights 1/n_k pasted by CutMix (beta 1) with probability 0.5, off for the first and last 3 epochs
_CMO = {"classify.cmo_prob": 0.5, "classify.cmo_alpha": 1.0, "classify.cmo_weight_power": 1.0,
        "classify.cmo_start_after": 3, "classify.cmo_end_before": 3}
# DRW (Cao et al. 2019) as in the CMO code: class-balanced weights (1 - b) / (1 - b^n_k), b = 0.9999,
# from epoch 160 of 200 (the last 20% of the epochs)
_DRW = {"classify.drw_from": 0.8, "classify.drw_beta": 0.9999}

PRESETS: dict[str, Preset] = {
    "diff-mix": Preset("Sec. 4.2 / Table 1: TI+DB fine-tune, inter-class translation, s in {0.5, 0.7, 0.9}, "
                       "gamma 0.5, p 0.1, 5x, CLIP filter 10% (Sec. 7.1)",
                       {"finetune.strategy": "ti+db", "synthesis.strategy": "diff-mix",
                        "synthesis.strengths": [0.5, 0.7, 0.9], "synthesis.filter_quantile": 0.1,
                        "classify.filtered": True}),
    "diff-mix+cutmix": Preset("Table 1 'Diff-Mix + Cutmix': Diff-Mix plus CutMix at the CutMix baseline's "
                              "ratio (0.1, Sec. 7.4; engine's choice: the paper gives no separate setting)",
                              {"finetune.strategy": "ti+db", "synthesis.strategy": "diff-mix",
                               "synthesis.strengths": [0.5, 0.7, 0.9], "synthesis.filter_quantile": 0.1,
                               "classify.filtered": True, **_CUTMIX}),
    "real-filtering": Preset("Table 1 'Real-filtering' (RF): Real-Gen (base SD, text only) with the CLIP filter "
                             "(Sec. 7.4)",
                             {"synthesis.strategy": "real-gen", "synthesis.filter_quantile": 0.1,
                              "classify.filtered": True}),
    "real-generation": Preset("Tables 2, 3, 5 'Real-Gen': base SD from text, no filter (Sec. 4.1, 7.4)",
                              {"synthesis.strategy": "real-gen", "classify.filtered": False}),
    "real-guidance": Preset("Table 1 'Real-guidance' (RG): intra-class translation with base SD at s = 0.1 "
                            "(Sec. 4.2, 7.4; Table 11), no filter (He et al.)",
                            {"synthesis.strategy": "real-aug", "synthesis.strengths": [0.1],
                             "classify.filtered": False}),
    "da-fusion": Preset("Table 1 'Da-fusion': TI-only fine-tune, intra-class translation, "
                        "s in {0.25, 0.5, 0.75, 1.0} (Sec. 4.2, 7.4; Table 11), no filter",
                        {"finetune.strategy": "ti", "synthesis.strategy": "diff-aug",
                         "synthesis.strengths": [0.25, 0.5, 0.75, 1.0], "classify.filtered": False}),
    "cutmix": Preset("Table 1 'Cutmix': no synthetic data, CutMix ratio 0.1 (alpha 1), weight decay 1e-5 "
                     "(Sec. 7.4)", {**_NO_SYNTHETIC, **_CUTMIX, "classify.weight_decay": 1e-5}),
    "mixup": Preset("Table 1 'Mixup': no synthetic data, Mixup ratio 0.3 (alpha 1), weight decay 1e-5 (Sec. 7.4)",
                    {**_NO_SYNTHETIC, "classify.mixup_prob": 0.3, "classify.mixup_alpha": 1.0,
                     "classify.weight_decay": 1e-5}),
    "cmo": Preset("Tables 2, 3 'CMO': minority-oversampled CutMix, no synthetic data (CMO code, Sec. 7.4)",
                  {**_NO_SYNTHETIC, **_CMO}),
    "cmo+drw": Preset("Tables 2, 3 'CMO + DRW': CMO with deferred class-balanced re-weighting (CMO code)",
                      {**_NO_SYNTHETIC, **_CMO, **_DRW}),
    "real-only": Preset("The 'baseline' rows: real images only", dict(_NO_SYNTHETIC)),
}


def preset_values(name: str) -> dict[str, Any]:
    """The preset's values by dotted key; an unknown name is a ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name].values)


def run(config: Any = None) -> dict[str, dict[str, Any]]:
    """`diffmix presets`: each name with its source and values (the config is not used)."""
    return {name: {"source": p.source, "values": p.values} for name, p in sorted(PRESETS.items())}
