"""Ray Tune sweeps over the method's knobs: gamma, p, multiplier prefix and strength set (and classifier seeds).

gamma, p and the multiplier prefix cost no synthesis (labels are computed when read, prefixes are
row selections); each strength set needs its own synthetic set, which the caller-supplied
`ensure_synthetic(config) -> uri` makes or reuses before any trial starts (the orchestration in
`engine.pipeline` passes the synthesis stage; this module never imports another stage).
Each trial builds and fits a `TorchTrainer` with `TuneReportCallback` (Tune over Train V2).
Output: `results.csv` and `results.md`, sorted by the chosen metric, with the p = 0 baseline; with
`sweep.seeds`, also `summary.csv` and `summary.md`: each grid point's mean and sample std over its seeds.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import statistics
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from engine.classify.train import Inputs, absolute, fit, prepare_inputs, resource_needs
from engine.ray_local import Needs, ensure_ray
from engine.config import ExperimentConfig, validate
from engine.storage import Storage, is_local, join, redact

log = logging.getLogger(__name__)

EnsureSynthetic = Callable[[ExperimentConfig], str]
BASELINE = "baseline"
_POINT_COLUMNS = ["trial", "strengths", "multiplier", "gamma", "p"]


def _fmt(value: float) -> str:
    return f"{value:g}"


def point_key(strengths: list[float] | None, multiplier: float | None, gamma: float, p: float) -> str:
    parts = []
    if strengths is not None:
        parts.append("s=" + "+".join(_fmt(s) for s in strengths))
    if multiplier is not None:
        parts.append(f"m={_fmt(multiplier)}")
    parts += [f"g={_fmt(gamma)}", f"p={_fmt(p)}"]
    return "_".join(parts)


def sweep_needs(config: ExperimentConfig, trials: int = 1) -> Needs:
    """What `trials` concurrent trials hold: each its Tune driver (sweep.trial_cpus) plus a classifier's
    Train workers and decode task. One trial is the least a sweep needs (Tune runs fewer at once when
    the cluster is short); a local instance is sized for sweep.max_concurrent_trials."""
    one = resource_needs(config)
    trial = Needs(cpu=config.sweep.trial_cpus + one.cpu, gpu=one.gpu, what="sweep",
                  keys=f"sweep.trial_cpus + {one.keys}", custom=dict(one.custom))
    return trial.times(trials, "sweep.max_concurrent_trials")


def grid_points(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Every trial: strengths x multiplier x gamma x p x sweep.seeds; all p = 0 points collapse into one
    baseline (one per seed). A seed becomes the trial's classify.seed and ends its name (`..._seed=1`);
    `grid_point` names the point without it (the seed summary's groups)."""
    sweep, cls = config.sweep, config.classify
    strength_sets: list[list[float] | None] = [sorted(s) for s in sweep.strengths] if sweep.strengths else [None]
    multipliers: list[float | None] = list(sweep.multiplier) if sweep.multiplier else [cls.multiplier]
    points: list[dict[str, Any]] = []
    if sweep.include_baseline or 0 in sweep.p:
        points.append({"trial": BASELINE, "strengths": None, "multiplier": None, "gamma": cls.gamma, "p": 0.0})
    for strengths in strength_sets:
        for multiplier in multipliers:
            for gamma in sweep.gamma:
                for p in sweep.p:
                    if p == 0:
                        continue
                    points.append({"trial": point_key(strengths, multiplier, gamma, p), "strengths": strengths,
                                   "multiplier": multiplier, "gamma": float(gamma), "p": float(p)})
    seeds: list[int | None] = list(sweep.seeds) if sweep.seeds else [None]
    return [{**point, "trial": point["trial"] if seed is None else f"{point['trial']}_seed={seed}",
             "grid_point": point["trial"], "seed": seed} for point in points for seed in seeds]


def sweep_output(config: ExperimentConfig) -> str:
    if config.sweep.output:
        return absolute(config.sweep.output)
    return absolute(join(config.run.uri, "sweep", config.hash("dataset", "classify", "sweep")))


def _strength_key(strengths: list[float] | None) -> str:
    return "default" if strengths is None else "+".join(_fmt(s) for s in strengths)


def synthetic_sets(config: ExperimentConfig, points: list[dict[str, Any]],
                   ensure_synthetic: EnsureSynthetic | None) -> dict[str, str | None]:
    """Strength-set key -> synthetic set URI, made or reused (once per set) before any trial starts."""
    needed = {_strength_key(p["strengths"]): p["strengths"] for p in points if p["p"] > 0}
    out: dict[str, str | None] = {}
    for key, strengths in needed.items():
        if strengths is None:
            if config.classify.synthetic or ensure_synthetic is None:
                out[key] = config.classify.synthetic  # None: the classifier finds the run's own set
            else:
                out[key] = ensure_synthetic(config)
            continue
        if ensure_synthetic is None:
            raise ValueError(
                "sweep.strengths needs a synthetic set per strength set: run the sweep through "
                "`diffmix sweep` (engine.pipeline.sweep), which supplies synthesis"
            )
        data = config.model_dump(mode="json")
        data["synthesis"]["strengths"] = list(strengths)
        data["synthesis"]["output"] = None
        log.info("sweep: synthetic set for strengths %s", strengths)
        out[key] = ensure_synthetic(validate(data))
    return out


def trial_config(point: dict[str, Any], base: dict[str, Any]) -> ExperimentConfig:
    """The classify settings of one grid point over the sweep's config (a seed, when the point has one,
    becomes classify.seed)."""
    data = dict(base)
    data["classify"] = dict(base["classify"], p=point["p"], gamma=point["gamma"], multiplier=point["multiplier"],
                            synthetic=point["synthetic"], output=None)
    if point["strengths"] is not None:
        data["classify"]["strengths"] = point["strengths"]
    if point.get("seed") is not None:
        data["classify"]["seed"] = point["seed"]
    return validate(data)


def _trial(params: dict[str, Any], base: dict[str, Any], inputs: Inputs, root: str) -> None:
    """One Tune trial: this point's config, one `TorchTrainer`, metrics forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    point = params["point"]
    config = trial_config(point, base)
    fit(config, inputs, output=join(root, "trials", point["trial"]), callbacks=[TuneReportCallback()])


def _eval_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The chosen metric first, then every evaluation metric any trial reported."""
    keys = {k for r in rows for k in r["metrics"]}
    evals = sorted(k for k in keys if k == "top1" or k.startswith("acc_") or k == "worst_group_acc")
    return [metric] + [k for k in evals if k != metric]


def _metric_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    keys = {k for r in rows for k in r["metrics"]}
    ordered = _eval_columns(rows, metric)
    extra = ("epoch", "train_samples_per_s_mean", "trained_gamma", "trained_p", "trained_seed")
    return ordered + [k for k in extra if k in keys and k not in ordered]


def _sort(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row["metrics"].get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0)
        return (0, -value if mode == "max" else value)
    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, list):
        return "+".join(_fmt(v) for v in value)
    return str(value)


def results_table(rows: list[dict[str, Any]], metric: str) -> tuple[list[str], list[list[str]]]:
    """One line per trial; a `seed` column when the sweep has seeds."""
    point_columns = _POINT_COLUMNS + (["seed"] if any(r["point"].get("seed") is not None for r in rows) else [])
    columns = point_columns + _metric_columns(rows, metric) + ["status"]
    body = []
    for row in rows:
        values = {**{c: row["point"].get(c) for c in point_columns}, **row["metrics"], "status": row["status"]}
        body.append([_cell(values.get(c)) for c in columns])
    return columns, body


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_summary(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Each grid point's mean and sample std (n - 1) of every evaluation metric over its seeds' finished
    trials, as the paper reports its few-shot results (means over three trials); std is None below two
    values. Sorted by the chosen metric's mean."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["point"].get("grid_point", row["point"]["trial"]), []).append(row)
    names = _eval_columns(rows, metric)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "ok"]
        entry: dict[str, Any] = {"grid_point": key, **{c: members[0]["point"].get(c) for c in _POINT_COLUMNS[1:]},
                                 "seeds": [r["point"].get("seed") for r in done], "trials": len(members)}
        for name in names:
            values = [r["metrics"][name] for r in done if _finite(r["metrics"].get(name))]
            entry[f"{name}_mean"] = statistics.fmean(values) if values else None
            entry[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    ranked = _sort([{"metrics": {metric: e[f"{metric}_mean"]}, "entry": e} for e in out], metric, mode)
    return [r["entry"] for r in ranked]


def summary_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The seed summary as table columns and cells (the same cell format as the results table)."""
    columns = list(summary[0]) if summary else ["grid_point"]
    return columns, [[_cell(entry.get(c)) for c in columns] for entry in summary]


def write_seed_summary(storage: Storage, output: str, rows: list[dict[str, Any]], metric: str,
                       mode: str) -> dict[str, Any]:
    """`summary.csv` / `summary.md` next to the results: the seeds' mean and spread per grid point."""
    summary = seed_summary(rows, metric, mode)
    columns, body = summary_table(summary)
    csv_uri, md_uri = join(output, "summary.csv"), join(output, "summary.md")
    storage.write_text(csv_uri, to_csv(columns, body))
    storage.write_text(md_uri, to_markdown(columns, body))
    log.info("sweep summary over seeds (%s):\n%s", redact(md_uri), to_markdown(columns, body))
    return {"summary": summary, "summary_csv": csv_uri, "summary_md": md_uri}


def to_csv(columns: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(body)
    return buf.getvalue()


def to_markdown(columns: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


TUNE_CONTROLLER_LOG = "ray.tune.execution.tune_controller"  # logs each failed trial with its whole traceback


def engine_error(error: BaseException) -> BaseException | None:
    """The engine's own error in a failed trial's chain (its line names the URI, key or file), else None."""
    from engine.cli import expected_error

    found = expected_error(error)
    return None if found is None else found[0]


class OneLineTrialErrors(logging.Filter):
    """Tune's record of a failed trial carries its traceback (and the trial's remote one inside it): when the
    error is the engine's, the record keeps Tune's words and that error's one line instead; a bug keeps all."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        found = engine_error(error) if error is not None else None
        if found is not None:
            record.msg, record.args = f"{record.getMessage()}: {str(found).splitlines()[0]}", None
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def quiet_tune() -> Iterator[None]:
    """Around a Tuner's fit: its console reporter off (Tune's new output prints every failed trial with its
    error file whatever `verbose` says; the engine logs the grid and the results) and its failed-trial records
    cut to one line (`OneLineTrialErrors`)."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter, which `verbose=0` silences
    one_line = OneLineTrialErrors()
    logging.getLogger(TUNE_CONTROLLER_LOG).addFilter(one_line)
    try:
        yield
    finally:
        logging.getLogger(TUNE_CONTROLLER_LOG).removeFilter(one_line)
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def sweep_failure(failed: list[tuple[str, BaseException]], total: int, md_uri: str) -> BaseException:
    """One error for a sweep's failed trials: when each is an engine error, the first one's class (so its exit
    code) with every trial's one line, in one line; when one is a bug, a RuntimeError with the whole texts."""
    errors = [(trial, engine_error(error), error) for trial, error in failed]
    head = f"sweep: {len(failed)} of {total} trial(s) failed (table at {redact(md_uri)})"
    if all(found is not None for _, found, _ in errors):
        first = errors[0][1]
        lines = "; ".join(f"{trial}: {str(found).splitlines()[0]}" for trial, found, _ in errors)
        try:
            return type(first)(f"{head}: {lines}")
        except TypeError:  # an engine error whose constructor takes more than a message: its own line
            return first
    return RuntimeError(f"{head}:\n" + "\n".join(f"{trial}: {error}" for trial, _, error in errors))


def run_sweep(config: ExperimentConfig, ensure_synthetic: EnsureSynthetic | None = None) -> dict[str, Any]:
    """Make sure each strength set has a synthetic set, run the grid on Tune, write the results table."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    from engine.data import load_dataset

    ensure_ray(sweep_needs(config), config=config,
               size_for=sweep_needs(config, config.sweep.max_concurrent_trials))
    sweep = config.sweep
    storage = Storage.from_config(config)
    output = sweep_output(config)
    points = grid_points(config)
    sets = synthetic_sets(config, points, ensure_synthetic)
    for point in points:
        point["synthetic"] = sets.get(_strength_key(point["strengths"])) if point["p"] > 0 else None
    log.info("sweep: %d trials (%s) -> %s", len(points), ", ".join(p["trial"] for p in points), redact(output))
    inputs = prepare_inputs(config, load_dataset(config, storage))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config.model_dump(mode="json"), inputs=inputs, root=output),
        {"cpu": sweep.trial_cpus},
    )
    scheduler = None
    if sweep.asha:
        scheduler = ASHAScheduler(time_attr="epoch", metric=sweep.metric, mode=sweep.mode,
                                  max_t=config.classify.epochs, grace_period=min(sweep.grace_period,
                                                                                 config.classify.epochs))
    storage_path, filesystem = absolute(join(output, "tune")), None
    if not is_local(output):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, storage_path = storage.fs(join(output, "tune"))
        filesystem = PyFileSystem(FSSpecHandler(fs))
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler),
        run_config=tune.RunConfig(name="grid", storage_path=storage_path, storage_filesystem=filesystem, verbose=0),
    )
    with quiet_tune():
        grid = tuner.fit()
    rows = []
    failed: list[tuple[str, BaseException]] = []
    for result in grid:
        point = result.config["point"]
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if k in {"top1", "epoch", "train_samples_per_s_mean", "worst_group_acc", "trained_gamma",
                            "trained_p", "trained_seed"} or k.startswith("acc_")}
        status = "ok" if result.error is None else f"error: {type(engine_error(result.error) or result.error).__name__}"
        if result.error is not None:
            failed.append((point["trial"], result.error))
        rows.append({"point": point, "metrics": metrics, "status": status})
    rows = _sort(rows, sweep.metric, sweep.mode)
    columns, body = results_table(rows, sweep.metric)
    csv_uri, md_uri = join(output, "results.csv"), join(output, "results.md")
    storage.write_text(csv_uri, to_csv(columns, body))
    storage.write_text(md_uri, to_markdown(columns, body))
    log.info("sweep results (%s, %s):\n%s", redact(csv_uri), redact(md_uri), to_markdown(columns, body))
    over_seeds = write_seed_summary(storage, output, rows, sweep.metric, sweep.mode) if sweep.seeds else {}
    if failed:
        raise sweep_failure(failed, len(rows), md_uri)
    return {"output": output, "results_csv": csv_uri, "results_md": md_uri, "metric": sweep.metric,
            "synthetic_sets": sets, **over_seeds,
            "rows": [{**r["point"], **r["metrics"], "status": r["status"]} for r in rows]}
