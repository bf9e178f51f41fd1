"""The run report: one HTML page with PNG figures beside it, written to any storage URI.

It only reads the stages' outputs (summaries, metrics, synthetic shards through the shard
contract), so it can be regenerated at any time from a finished run.
"""
from __future__ import annotations

import html
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.data.images import decode
from engine.data.shards import SyntheticSet
from engine.storage import Storage, join

log = logging.getLogger(__name__)


@dataclass
class ResultRow:
    """One line of the results table: a method and its accuracy over seeds."""

    method: str
    strategy: str
    p: float
    gamma: float | None
    top1: list[float]
    note: str = ""
    groups: dict[str, list[float]] = field(default_factory=dict)  # e.g. "counterfactual" -> top-1 per seed

    def group_mean(self, name: str) -> float:
        return float(np.mean(self.groups[name])) if self.groups.get(name) else float("nan")

    def group_std(self, name: str) -> float:
        values = self.groups.get(name) or []
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    @property
    def mean(self) -> float:
        return float(np.mean(self.top1)) if self.top1 else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof = 1): a handful of seeds estimates the spread."""
        return float(np.std(self.top1, ddof=1)) if len(self.top1) > 1 else 0.0


@dataclass
class StageTiming:
    stage: str
    items: int
    unit: str
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class ReportInputs:
    title: str
    class_names: list[str]
    real_images: dict[str, bytes]              # ref_id -> encoded image (for the reference column)
    grid_set: SyntheticSet | None              # a diff-mix set to draw the translation grid from
    score_set: SyntheticSet | None             # the set whose CLIP scores are plotted
    results: list[ResultRow] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    set_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> a set's figures
    verdict: str = ""                          # plain-language reading of the results
    notes: list[str] = field(default_factory=list)
    translation: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # set -> per-strength measures
    grid_pairs: int = 4


def group_names(rows: list[ResultRow]) -> list[str]:
    """The test groups the results carry, in first-seen order."""
    return list(dict.fromkeys(name for r in rows for name in r.groups))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def translation_grid(inputs: ReportInputs) -> bytes | None:
    """Rows: class pairs (reference class -> target class); columns: strengths; cell: reference | output."""
    pairs = inputs.grid_pairs
    if inputs.grid_set is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = inputs.grid_set.read(filtered=False, with_images=True)
    mixed = table.filter(np.asarray(table.column("ref_label").is_valid()) &
                         (table.column("ref_label").to_numpy(zero_copy_only=False) != table.column("target_label").to_numpy()))
    if mixed.num_rows == 0:
        return None
    strengths = sorted(set(mixed.column("strength").to_pylist()))
    by_cell: dict[tuple[int, int, float], int] = {}
    for i, (r, t, s) in enumerate(zip(mixed.column("ref_label").to_pylist(), mixed.column("target_label").to_pylist(),
                                      mixed.column("strength").to_pylist())):
        by_cell.setdefault((r, t, s), i)
    complete = sorted({(r, t) for (r, t, _s) in by_cell if all((r, t, s) in by_cell for s in strengths)})
    partial = sorted({(r, t) for (r, t, _s) in by_cell} - set(complete), key=lambda rt: -sum(
        (rt[0], rt[1], s) in by_cell for s in strengths))
    # pairs seen at every strength first, then one pair per reference class before a second one
    ordered = complete + partial
    seen: set[int] = set()
    chosen = [rt for rt in ordered if not (rt[0] in seen or seen.add(rt[0]))][:pairs]
    chosen += [rt for rt in ordered if rt not in chosen][:pairs - len(chosen)]
    fig, axes = plt.subplots(len(chosen), len(strengths), figsize=(2.4 * len(strengths), 1.4 * len(chosen)),
                             squeeze=False)
    for row, (r, t) in enumerate(chosen):
        for col, s in enumerate(strengths):
            ax = axes[row][col]
            ax.axis("off")
            if row == 0:
                ax.set_title(f"s = {s:g}", fontsize=9)
            if col == 0:
                # class names are the dataset's text: "$" must not start matplotlib's math mode
                ax.text(-0.05, 0.5, f"{inputs.class_names[r]} -> {inputs.class_names[t]}", fontsize=8,
                        ha="right", va="center", transform=ax.transAxes, parse_math=False)
            i = by_cell.get((r, t, s))
            if i is None:
                continue
            ref_id = mixed.column("ref_id")[i].as_py()
            out = np.asarray(decode(mixed.column("image")[i].as_py()))
            ref = np.asarray(decode(inputs.real_images[ref_id]).resize(out.shape[1::-1])) \
                if ref_id in inputs.real_images else np.zeros_like(out)
            ax.imshow(np.concatenate([ref, np.full((out.shape[0], 2, 3), 255, np.uint8), out], axis=1))
    fig.suptitle("reference | translated (diff-mix)", fontsize=10, y=1.0 + 0.12 / len(chosen))
    return _png(fig)


def clip_histogram(inputs: ReportInputs) -> bytes | None:
    if inputs.score_set is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = inputs.score_set.read(filtered=False).column("clip_score").to_numpy()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=30, color="#4477aa")
    if inputs.score_set.threshold is not None:
        q = inputs.score_set.manifest.get("filter_quantile", 0.1)
        ax.axvline(inputs.score_set.threshold, color="#cc3311", linestyle="--",
                   label=f"threshold {inputs.score_set.threshold:.3f} (drops lowest {q:.0%})")
        ax.legend(fontsize=8)
    ax.set_xlabel("CLIP score: P(with the metaclass)")
    ax.set_ylabel("images")
    return _png(fig)


def filter_examples(inputs: ReportInputs, per_side: int = 8) -> bytes | None:
    """The images the CLIP filter dropped (lowest scores) above a random sample of the kept ones."""
    sset = inputs.score_set
    if sset is None or sset.threshold is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = sset.read(filtered=False, with_images=True)
    scores = table.column("clip_score").to_numpy()
    order = np.argsort(scores, kind="stable")
    dropped = [int(i) for i in order if scores[i] < sset.threshold][:per_side]
    kept_all = [int(i) for i in order if scores[i] >= sset.threshold]
    kept = sorted(np.random.default_rng(0).choice(kept_all, size=min(per_side, len(kept_all)), replace=False).tolist())
    if not dropped:
        return None
    fig, axes = plt.subplots(2, per_side, figsize=(1.1 * per_side, 2.6), squeeze=False)
    for row, (label, chosen) in enumerate((("dropped", dropped), ("kept", kept))):
        for col in range(per_side):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(chosen):
                continue
            i = chosen[col]
            ax.imshow(np.asarray(decode(table.column("image")[i].as_py())))
            ax.set_title(f"{scores[i]:.2f}", fontsize=7)
        axes[row][0].text(-0.1, 0.5, label, fontsize=8, ha="right", va="center", transform=axes[row][0].transAxes)
    return _png(fig)


def accuracy_axis(rows: list[ResultRow]) -> tuple[float, float]:
    """A y-range that fits every seed and every mean ± std, with a margin: differences of a few points must
    be visible (on 0..1 they are not)."""
    values = [v for r in rows for v in (*r.top1, r.mean - r.std, r.mean + r.std)]
    lo, hi = min(values), max(values)
    pad = max(0.15 * (hi - lo), 0.01)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def results_chart(inputs: ReportInputs) -> bytes | None:
    """Per method: each seed's top-1 (small dots), the mean with a ± std bar; the real-only mean as a line."""
    if not inputs.results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = inputs.results
    fig, ax = plt.subplots(figsize=(5.5, 3))
    x = list(range(len(rows)))
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r.top1), r.top1, s=12, color="#999999", zorder=2)
    ax.errorbar(x, [r.mean for r in rows], yerr=[r.std for r in rows], fmt="o", color="#228833", capsize=4,
                markersize=7, zorder=3)
    baseline = next((r for r in rows if r.p == 0), None)
    if baseline is not None:
        ax.axhline(baseline.mean, color="#aa3377", linestyle="--", linewidth=1, label=f"{baseline.method} mean")
        ax.legend(fontsize=8, loc="best")
    ax.set_xticks(x, [r.method for r in rows])
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(*accuracy_axis(rows))
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _png(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def set_metrics_table(sets: dict[str, dict[str, Any]]) -> str:
    inception = any("inception_fid" in f for f in sets.values())
    headers = ["set", "images", "CLIP Fréchet distance", "diversity (real)"] + (["Inception FID"] if inception else [])
    rows = []
    for method, f in sets.items():
        real = f.get("real_diversity")
        row = [method, str((f.get("images") or {}).get("synthetic", "-")), f"{f['clip_frechet']:.4g}",
               f"{f['diversity']:.3f} ({real:.3f})" if f.get("diversity") is not None and real is not None else "-"]
        if inception:
            row.append(f"{f['inception_fid']:.4g}" if "inception_fid" in f else "-")
        rows.append(row)
    return _table(headers, rows)


def results_table(rows: list[ResultRow]) -> str:
    names = group_names(rows)
    return _table(
        ["method", "strategy", "p", "gamma", "top-1 (mean ± std)"] + [f"{n} (mean ± std)" for n in names]
        + ["seeds", "note"],
        [[r.method, r.strategy, f"{r.p:g}", "-" if r.gamma is None else f"{r.gamma:g}", f"{r.mean:.3f} ± {r.std:.3f}"]
         + [f"{r.group_mean(n):.3f} ± {r.group_std(n):.3f}" for n in names] + [str(len(r.top1)), r.note]
         for r in rows],
    )


def translation_table(measures: dict[str, list[dict[str, Any]]]) -> str:
    rows = [[name, f"{m['strength']:g}", str(m["images"]), f"{m['background_distance']:.3f}",
             f"{m['background_kept']:.0%}", f"{m['background_of_target']:.0%}",
             f"{m['target_recognised']:.0%}", f"{m['reference_recognised']:.0%}"]
            for name, per in measures.items() for m in per]
    return _table(["set", "s", "images", "background distance", "background family kept",
                   "background of the target's own family", "target class drawn", "reference class kept"], rows)


def render_html(inputs: ReportInputs, figures: dict[str, str]) -> str:
    results = results_table(inputs.results)
    timings = _table(["stage", "items", "seconds", "throughput"],
                     [[t.stage, f"{t.items} {t.unit}", f"{t.seconds:.1f}", f"{t.rate:.2f} {t.unit}/s"]
                      for t in inputs.timings])
    sections = [f"<h1>{html.escape(inputs.title)}</h1>"]
    if inputs.verdict:
        sections.append(f"<p class='verdict'>{html.escape(inputs.verdict)}</p>")
    captions = {
        "grid.png": "Reference → translated images at each strength, for a few class pairs",
        "results.png": "Top-1 accuracy by method: each seed (grey), mean ± sample std (green), axis fitted",
        "clip_hist.png": "CLIP scores of the synthetic images and the filter threshold",
    }
    if "grid.png" in figures:
        sections.append(f"<h2>Translations</h2><figure><img src='{figures['grid.png']}' alt='grid'>"
                        f"<figcaption>{captions['grid.png']}</figcaption></figure>")
    sections.append(f"<h2>Results</h2>{results}")
    if "results.png" in figures:
        sections.append(f"<figure><img src='{figures['results.png']}' alt='results'>"
                        f"<figcaption>{captions['results.png']}</figcaption></figure>")
    if inputs.translation:
        sections.append("<h2>What the translations keep and change</h2>" + translation_table(inputs.translation)
                        + "<p>Per strength: the mean absolute RGB difference to the reference over the pixels that "
                        "are background in both (0 = untouched), the share whose background family a classifier of "
                        "real backgrounds names as the reference's, and as the family the target class sits on in "
                        "the correlated train split, and the share a classifier of real digits "
                        "(blind to backgrounds) labels as the target (prompt) class and as the reference's class. "
                        "Images without a reference (diff-gen) are compared with real images drawn at random: "
                        "their figures are the no-survival baseline.</p>")
    if inputs.set_metrics:
        sections.append("<h2>Synthetic sets against the real train set</h2>" + set_metrics_table(inputs.set_metrics)
                        + "<p>Fréchet distance between Gaussians fitted to CLIP image embeddings (lower: closer "
                        "to the real images); diversity: mean pairwise cosine distance of the embeddings within "
                        "a class, averaged over classes (the real train set's beside it).</p>")
    sections.append(f"<h2>Throughput</h2>{timings}")
    if "clip_hist.png" in figures:
        sections.append(f"<h2>CLIP filter</h2><figure><img src='{figures['clip_hist.png']}' alt='clip scores'>"
                        f"<figcaption>{captions['clip_hist.png']}</figcaption></figure>")
    if "filtered.png" in figures:
        sections.append(f"<figure><img src='{figures['filtered.png']}' alt='filtered examples'><figcaption>The "
                        "lowest-scored images (dropped by the filter) above a random sample of the kept ones, "
                        "each with its score</figcaption></figure>")
    if inputs.notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inputs.notes) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "img{max-width:100%}.verdict{background:#f3f3e8;padding:.6em;border-left:4px solid #aa8}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(inputs.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def write_report(inputs: ReportInputs, out_uri: str, storage: Storage) -> str:
    """Write report.html plus its PNG figures under `out_uri`; returns the HTML's URI."""
    figures: dict[str, bytes | None] = {
        "grid.png": translation_grid(inputs),
        "results.png": results_chart(inputs),
        "clip_hist.png": clip_histogram(inputs),
        "filtered.png": filter_examples(inputs),
    }
    written = {}
    for name, data in figures.items():
        if data:
            storage.write_bytes(join(out_uri, name), data)
            written[name] = name
    page = join(out_uri, "report.html")
    storage.write_text(page, render_html(inputs, written))
    log.info("report written: %s", page)
    return page
