"""Dataset loaders: image-folder trees, Hugging Face-style Parquet, and the built-in digits.

All of them validate before any stage starts: a missing root, an empty class, an image that
does not decode, or a label outside the class list is an error naming the file or class
(unless `skip_bad_images` is on, in which case bad images are counted and logged).

Image folders (local or any fsspec URI) are listed on the driver and read and decoded by Ray tasks
(engine.data.reads): the dataset then holds ids, labels, URIs, sizes and content hashes, not bytes.
Parquet files embed their images and are still read here (a known limit, README "Scaling out > Driver").
"""
from __future__ import annotations

import io
import json
import logging
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import DatasetConfig, ExperimentConfig
from engine.data import builtin, scenes
from engine.data.dataset import DatasetError, ImageDataset, check_labels, make_index, make_table
from engine.data.images import BadImageError, decode
from engine.data.reads import check_uris, walk_many
from engine.data.splits import few_shot, long_tail, stratified_split
from engine.storage import Storage, join, redact

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class _BadImages:
    """Collects undecodable images over a whole load: one error naming the first few and counting all,
    or (with `skip_bad_images`) a count and a warning."""

    SHOWN = 5

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.errors: list[str] = []

    @property
    def count(self) -> int:
        return len(self.errors)

    def ok(self, data: bytes | None, source: str) -> bool:
        try:
            if data is None:
                raise BadImageError(f"cannot decode image {source}: no bytes")
            decode(data, source)
            return True
        except BadImageError as exc:
            self.errors.append(str(exc))
            if self.skip:
                log.warning("skipping %s", exc)
            return False

    def ok_checked(self, error: str | None) -> bool:
        """Record the outcome of a file checked elsewhere (a worker's error message, or None)."""
        if error is None:
            return True
        self.errors.append(error)
        if self.skip:
            log.warning("skipping %s", error)
        return False

    def check(self, where: str) -> None:
        """After the load: every bad image in one error (unless skipping)."""
        if self.skip or not self.errors:
            return
        shown = "; ".join(self.errors[: self.SHOWN])
        more = f"; and {self.count - self.SHOWN} more" if self.count > self.SHOWN else ""
        raise DatasetError(f"{where}: {self.count} bad image(s): {shown}{more} "
                           "(set dataset.skip_bad_images: true to skip such files)")


# Names that tools leave in image folders (Jupyter, macOS zips, editors): never classes or images,
# as Hugging Face's imagefolder ignores them
def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _relative(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1:]


# --- image folders ---------------------------------------------------------------------------
def _folder_listing(storage: Storage, root: str, class_names: list[str] | None,
                    ) -> tuple[list[str], list[str], list[str], list[int]]:
    """(class names, ids, URIs, labels) of an image-folder tree, from a listing: names only, no reads.

    Class folders are walked in parallel off the driver (engine.data.reads.walk_many: Ray tasks on a
    cluster): an object store's listing builds a metadata dict per object, and only names come back here
    (the driver's peak memory, issue #13). Files at the top level are not images of any class (README, ...)."""
    names_found = [n for n in storage.list_dirs(root) if not _hidden(n)]
    by_class: dict[str, list[str]] = {}
    other = 0
    for name, files in zip(names_found, walk_many(storage, [join(root, n) for n in names_found])):
        images = by_class.setdefault(name, [])  # a class folder with no files still names a class
        for f in files:
            if _hidden(_relative(f, root)):
                continue
            if f.lower().endswith(IMAGE_EXTENSIONS):
                images.append(f)
            else:
                other += 1
    if other:
        log.info("image folder %s: ignored %d file(s) without an image extension %s", redact(root), other,
                 "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    names = class_names or sorted(by_class)
    unknown = sorted(set(by_class) - set(names))
    if unknown:
        raise DatasetError(f"image folder {redact(root)}: folder {unknown[0]!r} is not in the class list {names}")
    for cls in names:
        if not by_class.get(cls):
            raise DatasetError(f"image folder {redact(root)}: class {cls!r} has no images")
    ids, uris, labels = [], [], []
    for label, cls in enumerate(names):
        for f in sorted(by_class[cls]):
            ids.append(_relative(f, root))
            uris.append(f)
            labels.append(label)
    return names, ids, uris, labels


def _checked_index(storage: Storage, splits: list[tuple[list[str], list[str], list[int]]], bad: _BadImages,
                   ) -> list[pa.Table]:
    """Every split's files read and decoded in one parallel job off the driver (engine.data.reads); bad
    files go to `bad`, the rest become INDEX_SCHEMA rows with their sizes and content hashes."""
    checked = check_uris([u for _, uris, _ in splits for u in uris], storage)
    sizes, digests = checked.column("size").to_pylist(), checked.column("sha256").to_pylist()
    errors = checked.column("error").to_pylist()
    out, at = [], 0
    for ids, uris, labels in splits:
        keep = [i for i in range(len(ids)) if bad.ok_checked(errors[at + i])]
        out.append(make_index([ids[i] for i in keep], [uris[i] for i in keep], [labels[i] for i in keep],
                              [sizes[at + i] for i in keep], [digests[at + i] for i in keep]))
        at += len(ids)
    return out


def load_imagefolder(cfg: DatasetConfig, storage: Storage, seed: int) -> ImageDataset:
    root = cfg.uri or ""
    if not storage.isdir(root):
        raise DatasetError(f"dataset root not found: {redact(root)}")
    bad = _BadImages(cfg.skip_bad_images)
    train_root, test_root = join(root, "train"), join(root, "test")
    if storage.isdir(train_root) and storage.isdir(test_root):
        names, ids, uris, labels = _folder_listing(storage, train_root, cfg.class_names)
        _, t_ids, t_uris, t_labels = _folder_listing(storage, test_root, names)
        train, test = _checked_index(storage, [(ids, uris, labels), (t_ids, t_uris, t_labels)], bad)
        bad.check(f"image folder {redact(root)}")
    else:
        names, ids, uris, labels = _folder_listing(storage, root, cfg.class_names)
        (rows,) = _checked_index(storage, [(ids, uris, labels)], bad)
        bad.check(f"image folder {redact(root)}")
        train, test = stratified_split(rows, cfg.test_fraction, len(names))
    return _finish(cfg, names, train, test, bad.count, posixpath.basename(root.rstrip("/")) or "imagefolder",
                   storage)


# --- Hugging Face-style Parquet --------------------------------------------------------------
def _hf_class_names(schema: pa.Schema) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta)["info"]["features"]
        return list(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def _split_of(rel: str) -> str | None:
    parts = rel.lower().replace("-", "/").replace("_", "/").replace(".", "/").split("/")
    if "test" in parts:
        return "test"
    if "train" in parts:
        return "train"
    return None


def _parquet_rows(storage: Storage, uri: str, root: str, bad: _BadImages,
                  ) -> tuple[pa.Schema, list[str], list[bytes], list[int], list[int | None]]:
    data = storage.read_bytes(uri)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"cannot read Parquet file {redact(uri)}: {exc}") from None
    for col in ("image", "label"):
        if col not in table.column_names:
            raise DatasetError(f"Parquet file {redact(uri)} has no {col!r} column (has {table.column_names})")
    rel = _relative(uri, root)
    ids, images, labels, groups = [], [], [], []
    has_group = "group" in table.column_names
    for i, (img, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
        if isinstance(img, dict):
            blob, path = img.get("bytes"), img.get("path")
        else:
            blob, path = img, None
        if blob is None and path:
            blob = storage.read_bytes(path if "://" in path or path.startswith("/") else join(posixpath.dirname(uri), path))
        source = f"{redact(uri)} row {i}" + (f" ({path})" if path else "")
        if label is None:
            raise DatasetError(f"{source}: missing label")
        if not bad.ok(blob, source):
            continue
        ids.append(f"{rel}#{i}")
        images.append(blob)
        labels.append(int(label))
        groups.append(table.column("group")[i].as_py() if has_group else None)
    return table.schema, ids, images, labels, groups


def load_parquet(cfg: DatasetConfig, storage: Storage, seed: int) -> ImageDataset:
    root = cfg.uri or ""
    if root.endswith(".parquet"):
        if not storage.exists(root):
            raise DatasetError(f"dataset file not found: {redact(root)}")
        files, root = [root], posixpath.dirname(root)
    else:
        if not storage.isdir(root):
            raise DatasetError(f"dataset root not found: {redact(root)}")
        files = [f for f in storage.walk_files(root) if f.endswith(".parquet") and not _hidden(_relative(f, root))]
    if not files:
        raise DatasetError(f"no .parquet files under {redact(root)}")
    bad = _BadImages(cfg.skip_bad_images)
    split_rows: dict[str, list] = {"train": [[], [], [], []], "test": [[], [], [], []]}
    names = cfg.class_names
    has_test = any(_split_of(_relative(f, root)) == "test" for f in files)
    for f in files:
        split = _split_of(_relative(f, root)) if has_test else "train"
        if split is None:
            log.info("ignoring %s (neither train nor test)", redact(f))
            continue
        schema, ids, images, labels, groups = _parquet_rows(storage, f, root, bad)
        names = names or _hf_class_names(schema)
        for acc, vals in zip(split_rows[split], (ids, images, labels, groups)):
            acc.extend(vals)
    bad.check(f"Parquet dataset {redact(root)}")
    if not names:
        raise DatasetError(
            f"Parquet dataset {redact(root)} declares no class names: set dataset.class_names "
            "(or store Hugging Face ClassLabel metadata)"
        )
    train = make_table(*split_rows["train"])
    check_labels(train, len(names), f"Parquet dataset {redact(root)}")
    if has_test:
        test = make_table(*split_rows["test"])
    else:
        train, test = stratified_split(train, cfg.test_fraction, len(names))
    return _finish(cfg, list(names), train, test, bad.count, posixpath.basename(root.rstrip("/")) or "parquet")


# --- built-in --------------------------------------------------------------------------------
def load_builtin(cfg: DatasetConfig, storage: Storage, seed: int) -> ImageDataset:
    names = builtin.CLASS_NAMES
    if cfg.class_names is not None and cfg.class_names != names:
        raise DatasetError(f"the built-in dataset has classes {names}; dataset.class_names {cfg.class_names} differs")
    ids, images, labels = builtin.load_digits_rows(cfg.image_size)
    train, test = stratified_split(make_table(ids, images, labels), cfg.test_fraction, len(names))
    metaclass_cfg = cfg.model_copy(update={"metaclass": cfg.metaclass or builtin.METACLASS})
    if cfg.builtin == "digits":
        return _finish(metaclass_cfg, names, train, test, 0, "digits")
    return _finish(metaclass_cfg, names, *scene_splits(cfg, train, test), 0, "scenes")


def scene_splits(cfg: DatasetConfig, train: pa.Table, test: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The digits' own train/test split, composited: train on class-correlated backgrounds, every test digit
    on every background family."""
    sc = cfg.scenes
    train_idx = [builtin.digit_index(i) for i in train.column("id").to_pylist()]
    families = scenes.train_families(train.column("label").to_numpy(), sc.aligned, sc.seed)
    scene_train = make_table(*builtin.scene_rows(train_idx, families.tolist(), cfg.image_size, sc.seed))
    test_idx = [builtin.digit_index(i) for i in test.column("id").to_pylist()]
    every = [(i, f) for i in test_idx for f in range(scenes.FAMILIES)]
    scene_test = make_table(*builtin.scene_rows([i for i, _ in every], [f for _, f in every], cfg.image_size,
                                                sc.seed))
    return scene_train, scene_test


# --- common ----------------------------------------------------------------------------------
def _finish(cfg: DatasetConfig, names: list[str], train: pa.Table, test: pa.Table, skipped: int,
            name: str, storage: Storage | None = None) -> ImageDataset:
    if not cfg.metaclass:
        raise DatasetError(f"dataset.metaclass is required for the {cfg.source} source (e.g. bird, car)")
    if skipped:
        log.warning("dataset %s: skipped %d bad image(s)", name, skipped)
    return ImageDataset(list(names), cfg.metaclass, train, test, name=name, skipped=skipped, storage=storage)


def check_train_classes(ds: ImageDataset) -> None:
    """A dataset to train on needs images of every class in its train split."""
    counts = ds.class_counts("train")
    empty = [ds.class_names[c] for c in range(ds.num_classes) if counts[c] == 0]
    if empty:
        raise DatasetError(f"dataset {ds.name}: class {empty[0]!r} has no train images")


_LOADERS = {"builtin": load_builtin, "imagefolder": load_imagefolder, "parquet": load_parquet}


def load_dataset(config: ExperimentConfig, storage: Storage | None = None, apply_subset: bool = True,
                 for_training: bool = True) -> ImageDataset:
    """The configured dataset with its subset (few-shot / long-tail) applied to the train split.

    `for_training=False` (evaluation on a second dataset) accepts classes with no train images."""
    storage = storage or Storage.from_config(config)
    cfg = config.dataset
    ds = _LOADERS[cfg.source](cfg, storage, config.run.seed)
    if for_training:
        check_train_classes(ds)
    if not apply_subset or cfg.subset.kind == "full":
        return ds
    if cfg.subset.kind == "few_shot":
        assert cfg.subset.shots is not None
        return ds.with_train(few_shot(ds.train_rows, cfg.subset.shots, ds.num_classes, config.run.seed),
                             f"{cfg.subset.shots}shot")
    assert cfg.subset.imbalance_factor is not None
    return ds.with_train(long_tail(ds.train_rows, cfg.subset.imbalance_factor, ds.num_classes, config.run.seed),
                         f"lt{cfg.subset.imbalance_factor:g}")
