"""The synthesis plan: a pure, seeded table of rows (index, strategy, reference, target, strength, seed, prompt).

Same inputs, same plan, same images. How the order is built, and why:

* Targets are drawn **epoch by epoch**: epoch `e` covers plan rows `[e*n, (e+1)*n)` (n = |train|).
  Each epoch holds each target class a fixed number of times (the target distribution apportioned
  to n rows by largest remainder), shuffled with an epoch-seeded RNG. So every prefix of `m' x n`
  rows (integer m') has exactly the target mix of a full plan, and the first `m' x n` rows of a plan
  with multiplier m are the plan with multiplier m' (the prefix property).
* References are drawn from **cycling pools**: the k-th row that needs a reference from pool P takes
  element k of an endless stream of seeded permutations of P. For diff-mix the pool is the whole
  train set, so each train image is used once per epoch (uniform over the train set); for diff-aug it
  is the target class; with a referable-class limit it is the union of the target's referable classes.
  Row i's choice depends only on rows before it, so prefixes stay valid.
* Strengths come in **runs** of `strength_run` rows; consecutive groups of `|S|` runs take each
  strength once, in a group-seeded order. GPU batches taken along the plan are therefore one
  strength, and every prefix of whole groups is balanced over the strength set.
* Each row's diffusion seed is a SplitMix64 hash of (plan seed, index): no shared RNG state.

Targets: diff-/real-mix draw them uniformly over classes; *-aug and *-gen follow the train class
distribution (each train image once per epoch). Long-tail mode replaces either by the *reversed*
class distribution (the class of size rank k gets the size of rank N-1-k), favouring tail classes.
A referable-class limit L gives each target L referable classes drawn from the *other* classes.
*-gen rows have no reference and strength 1. The plan hash covers everything that changes a row.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

PLAN_VERSION = "plan-v1"
STRATEGIES = ("diff-mix", "diff-aug", "diff-gen", "real-mix", "real-aug", "real-gen")
PROMPT_TEMPLATE = "photo of a {name} {metaclass}"

# Column layout of a plan. `ref_pos` (row of the train table) is internal: shards carry `ref_id`.
PLAN_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("strategy", pa.string()),
        ("ref_pos", pa.int64()),
        ("ref_id", pa.string()),
        ("ref_label", pa.int64()),
        ("target_label", pa.int64()),
        ("strength", pa.float64()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
    ]
)

# Sub-stream tags for SeedSequence([seed, tag, ...]): independent randomness per purpose.
_TAG_TARGET, _TAG_REF, _TAG_STRENGTH, _TAG_REFERABLE = 1, 2, 3, 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class PlanError(ValueError):
    """A plan that cannot be built; the message names the config key or the class."""


def is_gen(strategy: str) -> bool:
    return strategy.endswith("-gen")


def is_mix(strategy: str) -> bool:
    return strategy.endswith("-mix")


def uses_adapter(strategy: str) -> bool:
    return strategy.startswith("diff-")


def readable_name(class_name: str) -> str:
    """A class name as prompt words: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    text = re.sub(r"^\d+[.\-_ ]+", "", class_name)
    return re.sub(r"[_\s]+", " ", text).strip() or class_name


def plain_prompts(class_names: Sequence[str], metaclass: str) -> list[str]:
    """real-* prompts: the class's plain name, no learned token."""
    return [PROMPT_TEMPLATE.format(name=readable_name(c), metaclass=metaclass) for c in class_names]


@dataclass(frozen=True)
class PlanSpec:
    """What decides the rows. `identity` holds what else changes an image (models, adapter, dataset, T...)."""

    strategy: str
    strengths: tuple[float, ...]
    multiplier: float
    seed: int
    strength_run: int = 8
    referable_classes: int | None = None
    long_tail: bool = False
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlanError(f"synthesis.strategy: unknown strategy {self.strategy!r} (allowed: {', '.join(STRATEGIES)})")
        if not self.strengths:
            raise PlanError("synthesis.strengths: empty strength set")
        for s in self.strengths:
            if not 0 < s <= 1:
                raise PlanError(f"synthesis.strengths: strength {s} is outside (0, 1]")
        if not self.multiplier > 0 or not math.isfinite(self.multiplier):
            raise PlanError(f"synthesis.multiplier: must be > 0, got {self.multiplier}")
        if self.strength_run < 1:
            raise PlanError(f"synthesis.strength_run: must be >= 1, got {self.strength_run}")
        if self.referable_classes is not None and self.referable_classes < 1:
            raise PlanError(f"synthesis.referable_classes: must be >= 1, got {self.referable_classes}")

    @property
    def effective_strengths(self) -> tuple[float, ...]:
        return (1.0,) if is_gen(self.strategy) else tuple(float(s) for s in self.strengths)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strengths"] = list(self.effective_strengths)
        data["referable_classes"] = self.referable_classes if is_mix(self.strategy) else None
        data["version"] = PLAN_VERSION
        return data

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def num_rows(multiplier: float, num_train: int) -> int:
    """m x |train| rows (rounded); a reader's multiplier prefix uses the same rounding."""
    return int(round(multiplier * num_train))


def row_seeds(seed: int, indices: np.ndarray) -> np.ndarray:
    """SplitMix64(seed, index) masked to 63 bits: one independent diffusion seed per row."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + indices.astype(np.uint64) + np.uint64(1)) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64)


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder, ties by index)."""
    p = weights / weights.sum()
    raw = p * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.lexsort((np.arange(len(p)), -(raw - counts)))
        counts[order[:short]] += 1
    return counts


def reversed_distribution(counts: np.ndarray) -> np.ndarray:
    """The class of size rank k (largest first) gets the size of rank N-1-k: tail classes become heads."""
    order = np.argsort(-counts, kind="stable")
    out = np.zeros(len(counts), dtype=np.float64)
    out[order] = counts[order][::-1]
    return out


def target_weights(spec: PlanSpec, class_counts: np.ndarray) -> np.ndarray:
    counts = class_counts.astype(np.float64)
    if spec.long_tail:
        return reversed_distribution(counts)
    if is_mix(spec.strategy):
        return np.ones(len(counts))
    return counts


def referable_sets(spec: PlanSpec, num_classes: int) -> list[np.ndarray] | None:
    """Per target class, the classes its references may come from (None: no limit)."""
    if spec.referable_classes is None or not is_mix(spec.strategy):
        return None
    rng = np.random.default_rng([spec.seed, _TAG_REFERABLE])
    sets = []
    for t in range(num_classes):
        others = np.array([c for c in range(num_classes) if c != t], dtype=np.int64)
        if len(others) == 0:
            sets.append(np.array([t], dtype=np.int64))
            continue
        k = min(spec.referable_classes, len(others))
        sets.append(np.sort(rng.choice(others, size=k, replace=False)))
    return sets


def _targets(spec: PlanSpec, weights: np.ndarray, n_epoch: int, total: int) -> np.ndarray:
    counts = apportion(n_epoch, weights)
    base = np.repeat(np.arange(len(weights), dtype=np.int64), counts)
    out = np.empty(total, dtype=np.int64)
    for e in range(math.ceil(total / n_epoch)):
        perm = np.random.default_rng([spec.seed, _TAG_TARGET, e]).permutation(base)
        lo, hi = e * n_epoch, min((e + 1) * n_epoch, total)
        out[lo:hi] = perm[: hi - lo]
    return out


def _cycle(spec: PlanSpec, pool_key: int, pool: np.ndarray, count: int) -> np.ndarray:
    """The first `count` elements of pool P's endless stream of seeded permutations (key 0: whole set)."""
    reps = math.ceil(count / len(pool))
    parts = [np.random.default_rng([spec.seed, _TAG_REF, pool_key, k]).permutation(pool) for k in range(reps)]
    return np.concatenate(parts)[:count] if parts else np.empty(0, dtype=np.int64)


def row_strengths(spec: PlanSpec, total: int) -> np.ndarray:
    values = np.array(spec.effective_strengths, dtype=np.float64)
    k = len(values)
    runs = np.arange(total, dtype=np.int64) // spec.strength_run
    groups = runs // k
    order = np.empty((int(groups[-1]) + 1 if total else 0, k), dtype=np.int64)
    for g in range(order.shape[0]):
        order[g] = np.random.default_rng([spec.seed, _TAG_STRENGTH, g]).permutation(k)
    return values[order[groups, runs % k]] if total else np.empty(0, dtype=np.float64)


def build_plan(spec: PlanSpec, ref_ids: Sequence[str], ref_labels: np.ndarray, num_classes: int,
               prompts: Sequence[str], usable: np.ndarray | None = None) -> pa.Table:
    """The plan table (PLAN_SCHEMA): `multiplier x len(ref_ids)` rows.

    `ref_ids` / `ref_labels` are the train rows (their positions become `ref_pos`); `usable` masks
    references that may be drawn (bad images skipped); `prompts[c]` is the prompt of class c.
    """
    labels = np.asarray(ref_labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise PlanError("the train split is empty: nothing to plan")
    if len(prompts) != num_classes:
        raise PlanError(f"{len(prompts)} prompts for {num_classes} classes")
    usable = np.ones(n, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    if not usable.any():
        raise PlanError("no usable reference image in the train split")
    total = num_rows(spec.multiplier, n)
    if total < 1:
        raise PlanError(f"synthesis.multiplier: {spec.multiplier} x {n} train images rounds to 0 rows")
    usable_counts = np.bincount(labels[usable], minlength=num_classes)
    weights = target_weights(spec, usable_counts if not is_gen(spec.strategy) else np.bincount(labels, minlength=num_classes))
    if weights.sum() <= 0:
        raise PlanError("target distribution is empty")
    targets = _targets(spec, weights, n, total)

    ref_pos = np.full(total, -1, dtype=np.int64)
    if not is_gen(spec.strategy):
        positions = np.flatnonzero(usable)
        allowed = referable_sets(spec, num_classes)
        if is_mix(spec.strategy) and allowed is None:
            ref_pos[:] = _cycle(spec, 0, positions, total)
        else:
            for t in np.unique(targets):
                classes = np.array([t]) if not is_mix(spec.strategy) else allowed[t]  # type: ignore[index]
                pool = positions[np.isin(labels[positions], classes)]
                if len(pool) == 0:
                    raise PlanError(f"class {int(t)} has no usable reference image (allowed classes {classes.tolist()})")
                rows = np.flatnonzero(targets == t)
                ref_pos[rows] = _cycle(spec, int(t) + 1, pool, len(rows))

    index = np.arange(total, dtype=np.int64)
    has_ref = ref_pos >= 0
    ids = np.asarray(list(ref_ids), dtype=object)
    return pa.table(
        {
            "index": index,
            "strategy": pa.array([spec.strategy] * total, type=pa.string()),
            "ref_pos": pa.array(ref_pos, mask=~has_ref),
            "ref_id": pa.array(np.where(has_ref, ids[np.where(has_ref, ref_pos, 0)], None), type=pa.string()),
            "ref_label": pa.array(np.where(has_ref, labels[np.where(has_ref, ref_pos, 0)], 0), mask=~has_ref),
            "target_label": targets,
            "strength": row_strengths(spec, total),
            "seed": row_seeds(spec.seed, index),
            "prompt": pa.array([prompts[t] for t in targets], type=pa.string()),
        },
        schema=PLAN_SCHEMA,
    )
