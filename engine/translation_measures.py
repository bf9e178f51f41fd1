"""What a translation kept and what it changed, on the scene miniature (engine.data.scenes).

Diff-Mix's claim rests on two properties of an inter-class translation at strength s: the reference's
background survives, and the foreground becomes the target class. Both are measured here with
classifiers that see only one of the two:

- the *background* classifier (an SVM on the background's colour statistics and an 8x8 thumbnail with the
  near-white digit painted over in the background's mean) names an image's background family; with the
  pixel distance to the reference outside both digits, it says how much of the reference's context is kept;
- the *foreground* classifier (engine.models.quality: an SVM on the digit cropped to its box) names the
  digit, blind to the background.

Both are fitted on a dataset's full real train split (an oracle the demo's few-shot classifiers never see)
and score ~100% / ~99% on the real test split. A `diff-gen` set (no reference) measured against references
drawn at random gives the no-survival baseline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.data import to_array
from engine.data.scenes import FAMILIES, family_of_class, foreground_mask
from engine.models.quality import fit_real_classifier, thumbnails

# a lower threshold than the digit mask's: the digit's soft edges count as foreground, not background
EDGE_THRESHOLD = 0.45


def pixels(data: bytes) -> np.ndarray:
    """An encoded image as float RGB in [0, 1]."""
    return to_array(bytes(data)).astype(np.float32) / 255.0


def background_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """[N, 198]: mean and spread of the background's colour, and its 8x8 thumbnail with the digit filled in."""
    out = []
    for a in images:
        digit = foreground_mask(a, EDGE_THRESHOLD)
        back = a[~digit] if (~digit).any() else a.reshape(-1, 3)
        mean = back.mean(axis=0)
        filled = a.copy()
        filled[digit] = mean
        thumb = Image.fromarray((filled * 255).astype(np.uint8)).resize((8, 8), Image.BOX)
        out.append(np.concatenate([4 * mean, 4 * back.std(axis=0), np.asarray(thumb, np.float32).ravel() / 255.0]))
    return np.stack(out)


def fit_background_classifier(train: pa.Table) -> Any:
    """An SVM naming the background family (`group % FAMILIES`) of a real split's images."""
    from sklearn.svm import SVC

    images = [pixels(b) for b in train.column("image").to_pylist()]
    families = np.asarray(train.column("group").to_pylist()) % FAMILIES
    return SVC(gamma="scale", C=10.0).fit(background_features(images), families)


@dataclass(frozen=True)
class Judges:
    """The two classifiers, fitted once per dataset."""

    foreground: Any
    background: Any

    @classmethod
    def fit(cls, train: pa.Table) -> "Judges":
        return cls(fit_real_classifier(train), fit_background_classifier(train))


def background_distance(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute RGB difference over the pixels that are background in both images (the reference's digit
    grown by one pixel), in [0, 1]."""
    from scipy.ndimage import binary_dilation

    grown = binary_dilation(foreground_mask(reference, EDGE_THRESHOLD))  # the 4-neighbour cross
    keep = ~grown & ~foreground_mask(output, EDGE_THRESHOLD)
    if not keep.any():
        return float("nan")
    return float(np.abs(output[keep] - reference[keep]).mean())


@dataclass(frozen=True)
class TranslationMeasure:
    """One strength's translations: how much background survived, which class the foreground shows."""

    strength: float
    images: int
    background_distance: float   # mean over images; 0 = the reference's background untouched
    background_kept: float       # share whose background family is the reference's
    background_of_target: float  # share whose background family is the target class's own (train-split habitat)
    target_recognised: float     # share the foreground classifier labels as the target (prompt) class
    reference_recognised: float  # share it labels as the reference's class

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray], ref_labels: Sequence[int],
            target_labels: Sequence[int], ref_families: Sequence[int], strengths: Sequence[float],
            judges: Judges) -> list[TranslationMeasure]:
    """Per strength, over pairs (output i was translated from reference i, or is compared with it)."""
    fg = judges.foreground.predict(thumbnails([Image.fromarray((o * 255).astype(np.uint8)) for o in outputs]))
    bg = judges.background.predict(background_features(outputs))
    dist = np.asarray([background_distance(o, r) for o, r in zip(outputs, references)])
    s, ref_y, tar_y, fam = (np.asarray(v) for v in (strengths, ref_labels, target_labels, ref_families))
    target_fam = np.asarray([family_of_class(int(t)) for t in tar_y])
    out = []
    for strength in sorted(set(s.tolist())):
        at = s == strength
        out.append(TranslationMeasure(float(strength), int(at.sum()), float(np.nanmean(dist[at])),
                                      float(np.mean(bg[at] == fam[at])), float(np.mean(bg[at] == target_fam[at])),
                                      float(np.mean(fg[at] == tar_y[at])),
                                      float(np.mean(fg[at] == ref_y[at]))))
    return out


def measure_set(rows: pa.Table, real: pa.Table, judges: Judges, seed: int = 0,
                max_per_strength: int = 200) -> list[TranslationMeasure]:
    """A synthetic set's rows (image, ref_id, ref_label, target_label, strength) against the real rows they
    came from. Rows without a reference (diff-gen) are compared with real rows drawn from `seed`, and their
    `reference_recognised` is then the share labelled as that random row's class (chance)."""
    real_ids = real.column("id").to_pylist()
    position = {rid: i for i, rid in enumerate(real_ids)}
    real_images = real.column("image").to_pylist()
    real_labels = real.column("label").to_pylist()
    real_families = [g % FAMILIES for g in real.column("group").to_pylist()]
    rng = np.random.default_rng(seed)
    strengths = np.asarray(rows.column("strength").to_pylist(), np.float64)
    chosen = []
    for strength in sorted(set(strengths.tolist())):
        members = np.flatnonzero(strengths == strength)
        chosen += members[:max_per_strength].tolist()  # plan order is already a random permutation
    ref_ids = rows.column("ref_id").to_pylist()
    refs = [position[ref_ids[i]] if ref_ids[i] is not None else int(rng.integers(len(real_ids))) for i in chosen]
    images = rows.column("image").to_pylist()
    targets = rows.column("target_label").to_pylist()
    return measure([pixels(images[i]) for i in chosen], [pixels(real_images[r]) for r in refs],
                   [real_labels[r] for r in refs], [targets[i] for i in chosen], [real_families[r] for r in refs],
                   strengths[chosen].tolist(), judges)


__all__ = ["Judges", "TranslationMeasure", "background_distance", "background_features",
           "fit_background_classifier", "measure", "measure_set", "pixels"]
