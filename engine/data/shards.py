"""The synthetic-shard contract shared by synthesis (writer) and classification (reader).

A synthetic set is a folder of Parquet files, one row per image, plus `.manifest.json`.
Files are named by the plan-index range they hold (`part-<start>-<end>.parquet`, end exclusive),
so a retried writer rewrites the same name. Labels are not stored as vectors: the reader derives
them from (ref_label, target_label, strength, gamma), so gamma stays free at training time.

The set's own files are hidden (`.manifest.json`, `.plan.json`, `.huggingface.yaml`): pyarrow, pandas, Ray
Data and Hugging Face `datasets` then open the folder itself as a Parquet dataset, since each of them skips
dot-files (and only pyarrow skips `_` files). Sets written before keep `manifest.json`, `plan.json` and
`README.md` beside their shards; the engine still reads them, and a synthesis run over such a folder moves
them to the hidden names.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.storage import Storage, StorageError, join, redact

SHARD_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image", pa.binary()),
        ("strategy", pa.string()),
        ("ref_id", pa.string()),      # null for *-gen rows
        ("ref_label", pa.int64()),    # null for *-gen rows
        ("target_label", pa.int64()),
        ("strength", pa.float64()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("clip_score", pa.float64()),
    ]
)
METADATA_COLUMNS = [f.name for f in SHARD_SCHEMA if f.name != "image"]
MANIFEST = ".manifest.json"
# Hugging Face datasets' standalone dataset card (YAML): `load_dataset(<folder>)` takes the features from it
CARD = ".huggingface.yaml"
LEGACY_MANIFEST = "manifest.json"   # where sets written before the hidden names keep them
LEGACY_CARD = "README.md"
MIX_STRATEGIES = ("diff-mix", "real-mix")
_PART = re.compile(r"^part-(\d{8,})-(\d{8,})\.parquet$")


class ShardError(ValueError):
    """A synthetic set that cannot be used; the message names the folder or file."""


def part_name(start: int, end: int) -> str:
    """File name for plan rows [start, end): content-addressed, so retries overwrite, never duplicate."""
    return f"part-{start:08d}-{end:08d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    m = _PART.match(name.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def hf_features(class_names: Sequence[str]) -> dict[str, Any]:
    """The shard columns as Hugging Face `datasets` features: `image` an Image, the labels ClassLabels."""
    labels = {"_type": "ClassLabel", "names": list(class_names)}
    value = {"int64": "int64", "string": "string", "double": "float64"}
    return {f.name: ({"_type": "Image"} if f.name == "image" else dict(labels) if f.name.endswith("_label")
                     else {"_type": "Value", "dtype": value[str(f.type)]}) for f in SHARD_SCHEMA}


def dataset_card(class_names: Sequence[str], summary: str) -> str:
    """The set folder's `.huggingface.yaml` (a dataset card's YAML, `summary` as comments above it):
    `datasets.load_dataset(<folder>)` then reads the shards with `image` as an Image and the labels as
    ClassLabels. (`load_dataset("parquet", ...)` takes types from the files, where `image` stays binary:
    datasets applies a file's features only where the Arrow type matches, and Image's is a struct, which would
    change the column for every other reader.)"""
    import yaml

    names = {str(i): n for i, n in enumerate(class_names)}
    dtypes = {"int64": "int64", "string": "string", "double": "float64"}
    features = [{"name": f.name, "dtype": "image" if f.name == "image" else
                 {"class_label": {"names": names}} if f.name.endswith("_label") else dtypes[str(f.type)]}
                for f in SHARD_SCHEMA]
    front = {"dataset_info": {"features": features},
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}]}
    comments = "".join(f"# {line}".rstrip() + "\n" for line in summary.splitlines())
    return f"{comments}{yaml.safe_dump(front, sort_keys=False)}"


# Images per Parquet row group, by bytes: a reader of drawn rows fetches whole row groups (README, "Scaling
# out"), so a group is kept near one ranged GET's worth (~1 MiB: at 512 px, 2 PNGs of ~400 KB) rather than a
# whole file; tiny images still share one group per file (each group costs ~0.7 KB of footer).
ROW_GROUP_BYTES = 1 << 20
# Column statistics only where a reader uses them: `index` min/max locate a row's group from the footer alone
# (binary image statistics would put up to 2 x 4 KB per group into the footer).
STATISTICS_COLUMNS = ["index", "ref_label", "target_label", "strength", "clip_score"]


def rows_per_group(image_bytes: int, rows: int, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per row group so that a group holds about `target_bytes` of images (1 .. rows)."""
    mean = image_bytes / max(rows, 1)
    return int(max(1, min(rows, target_bytes // max(mean, 1))))


def encode_table(table: pa.Table, class_names: Sequence[str] | None = None,
                 row_group_bytes: int = ROW_GROUP_BYTES) -> bytes:
    """A shard file: zstd Parquet in SHARD_SCHEMA, in row groups of about `row_group_bytes` of images; with
    `class_names`, the schema also carries Hugging Face `datasets` features (schema metadata only: pyarrow,
    pandas and Ray read the same columns)."""
    table = table.cast(SHARD_SCHEMA)
    if class_names is not None:
        meta = {"info": {"features": hf_features(class_names)}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    group = rows_per_group(table.column("image").nbytes, table.num_rows, row_group_bytes)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=group, write_statistics=STATISTICS_COLUMNS)
    return buf.getvalue()


def soft_labels(strategy: Iterable[str], ref_label: Iterable[int | None], target_label: Iterable[int],
                strength: Iterable[float], gamma: float, num_classes: int) -> np.ndarray:
    """(n, C) label matrix: mix rows put s**gamma on the target and 1 - s**gamma on the reference.
    gamma = 0 (Table 6's last row) is allowed: s**0 = 1, every mix row labelled wholly as its target."""
    if not gamma >= 0:  # also rejects NaN
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    strategies, refs = list(strategy), list(ref_label)
    targets, strengths = np.asarray(list(target_label), dtype=np.int64), np.asarray(list(strength), dtype=np.float64)
    out = np.zeros((len(targets), num_classes), dtype=np.float32)
    rows = np.arange(len(targets))
    target_weight = np.ones(len(targets), dtype=np.float64)
    is_mix = np.array([s in MIX_STRATEGIES and r is not None for s, r in zip(strategies, refs)], dtype=bool)
    target_weight[is_mix] = strengths[is_mix] ** gamma
    out[rows, targets] = target_weight
    for i in np.flatnonzero(is_mix):
        out[i, int(refs[i])] += 1.0 - target_weight[i]  # ref == target folds back into one-hot
    return out


def complete_sets(root: str, storage: Storage) -> list[str]:
    """The folders under `root` that hold a complete synthetic set (a manifest, or a legacy one), sorted."""
    if not storage.isdir(root):
        return []
    found = storage.glob(root, "*/" + MANIFEST) + storage.glob(root, "*/" + LEGACY_MANIFEST)
    return sorted({join(root, f.rstrip("/").split("/")[-2]) for f in found})


def manifest_uri(uri: str, storage: Storage) -> str | None:
    """Where the set at `uri` keeps its manifest (`.manifest.json`, else a legacy `manifest.json`); None when
    the set is not complete."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        if storage.exists(join(uri, name)):
            return join(uri, name)
    return None


# the columns a reader of drawn rows needs (images and what their labels are computed from)
ROW_COLUMNS = ["index", "image", "strategy", "ref_label", "target_label", "strength"]


_PARQUET_MAGIC = b"PAR1"


def read_footer(fh: Any) -> pq.FileMetaData:
    """A Parquet file's metadata from exactly its footer bytes (two small ranged reads: the 8-byte tail, then
    the footer), where pyarrow's own open reads the last 64 KB of every file."""
    fh.seek(-8, io.SEEK_END)
    tail = fh.read(8)
    if len(tail) != 8 or tail[4:] != _PARQUET_MAGIC:
        raise pa.ArrowInvalid("not a Parquet file (no PAR1 footer)")  # the callers name the file
    length = int.from_bytes(tail[:4], "little")
    fh.seek(-(8 + length), io.SEEK_END)
    footer = fh.read(length)
    return pq.read_metadata(io.BytesIO(_PARQUET_MAGIC + footer + tail))


def groups_holding(meta: pq.FileMetaData, wanted: np.ndarray) -> list[int] | None:
    """Row groups whose `index` range (footer statistics) holds a wanted index (`wanted` sorted); None when a
    group has no statistics. A shard's groups hold consecutive plan indices, so the range is exact."""
    col = meta.schema.to_arrow_schema().get_field_index("index")
    out = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(col).statistics
        if stats is None or not stats.has_min_max:
            return None
        if np.searchsorted(wanted, stats.max, side="right") > np.searchsorted(wanted, stats.min, side="left"):
            out.append(g)
    return out


def read_rows(file: str, storage: Storage, wanted: np.ndarray) -> pa.Table:
    """ROW_COLUMNS of the rows of one shard file whose index is in `wanted` (sorted), fetching only the footer
    and the row groups that hold them (their column chunks, coalesced into few ranged reads)."""
    with storage.open_input(file) as fh:
        try:
            meta = read_footer(fh)
        except StorageError:
            raise  # unreachable or stalled storage: its own error (and exit code), naming the URI
        except (OSError, pa.ArrowInvalid) as exc:
            raise ShardError(f"cannot read shard {redact(file)}: {exc}") from exc
        pf = pq.ParquetFile(fh, metadata=meta, pre_buffer=True)
        groups = groups_holding(meta, wanted)
        if groups is None:  # a file without statistics: its index column says where the rows are
            index = pf.read(columns=["index"]).column("index").to_numpy()
            bounds = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            groups = np.unique(np.searchsorted(bounds, np.flatnonzero(np.isin(index, wanted)), side="right")).tolist()
        table = pf.read_row_groups(groups, columns=ROW_COLUMNS)
    return table.filter(pc.is_in(table.column("index"), value_set=pa.array(wanted, type=pa.int64())))


def read_shards(files: list[str], storage: Storage, wanted: np.ndarray, max_parallel: int = 8) -> pa.Table:
    """The rows of `files` whose plan index is in `wanted`, fetched from storage (no local copy).

    Only the row groups holding wanted rows are fetched (`read_rows`), so the bytes read follow the rows
    wanted, not the files they sit in; files written before row groups were bounded (one group per file) read
    as before. Files are read concurrently: on object storage, latency is what a task waits for.
    """
    from concurrent.futures import ThreadPoolExecutor

    wanted = np.unique(np.asarray(wanted, dtype=np.int64))
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(files)))) as pool:
        parts = list(pool.map(lambda f: read_rows(f, storage, wanted), files))
    return pa.concat_tables(parts) if parts else pa.schema([SHARD_SCHEMA.field(c) for c in ROW_COLUMNS]).empty_table()


@dataclass
class SyntheticSet:
    """A committed synthetic set: its manifest, and readers that select rows without copying the set."""

    uri: str
    storage: Storage
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, uri: str, storage: Storage | None = None) -> "SyntheticSet":
        storage = storage or Storage()
        path = manifest_uri(uri, storage)
        if path is None:
            raise ShardError(f"no synthetic set at {redact(uri)} (missing {MANIFEST}); run `diffmix synthesize` first")
        return cls(uri, storage, json.loads(storage.read_text(path)))

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def threshold(self) -> float | None:
        return self.manifest.get("clip_threshold")

    def files(self) -> list[str]:
        return [join(self.uri, f["name"]) for f in self.manifest.get("files", [])]

    def check_classes(self, class_names: list[str]) -> None:
        if self.class_names != list(class_names):
            raise ShardError(
                f"synthetic set {redact(self.uri)} has classes {self.class_names}, "
                f"but the real dataset has {list(class_names)}"
            )

    def _read(self, uri: str, columns: list[str] | None) -> pa.Table:
        """Whole rows, or just `columns` through ranged reads (the metadata scan never fetches image bytes)."""
        try:
            if columns is None:
                return pq.read_table(io.BytesIO(self.storage.read_bytes(uri)))
            with self.storage.open_input(uri) as fh:
                return pq.ParquetFile(fh, metadata=read_footer(fh), pre_buffer=True).read(columns=columns)
        except StorageError:
            raise  # unreachable or stalled storage: its own error (and exit code), naming the URI
        except (OSError, pa.ArrowInvalid) as exc:  # a missing, truncated or corrupt file
            raise ShardError(f"cannot read shard {redact(uri)}: {exc}") from exc

    def read(self, strengths: Iterable[float] | None = None, multiplier: float | None = None,
             filtered: bool = True, with_images: bool = False, with_file: bool = False) -> pa.Table:
        """Rows kept by the CLIP filter (when `filtered`), of the selected strengths and plan prefix.

        `with_file` adds a `file` column (the URI of the Parquet file holding each row), so a
        reader can later fetch images of chosen rows from just those files.
        """
        columns = None if with_images else METADATA_COLUMNS
        schema = SHARD_SCHEMA if with_images else pa.schema([SHARD_SCHEMA.field(c) for c in METADATA_COLUMNS])
        tables = []
        for f in self.files():
            t = self._read(f, columns).select(schema.names).cast(schema)
            if with_file:
                t = t.append_column("file", pa.array([f] * t.num_rows, type=pa.string()))
            tables.append(t)
        if with_file:
            schema = schema.append(pa.field("file", pa.string()))
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        return table.filter(self.selection(table, strengths, multiplier, filtered))

    def selection(self, table: pa.Table, strengths: Iterable[float] | None = None, multiplier: float | None = None,
                  filtered: bool = True) -> pa.Array:
        """Boolean mask for the rows that a reader with these options keeps."""
        mask = pa.array(np.ones(table.num_rows, dtype=bool))
        if filtered and self.threshold is not None:
            mask = pc.and_(mask, pc.greater_equal(table.column("clip_score"), self.threshold))
        if strengths is not None:
            wanted = pa.array(sorted(float(s) for s in strengths), type=pa.float64())
            mask = pc.and_(mask, pc.is_in(table.column("strength"), value_set=wanted))
        if multiplier is not None:
            limit = int(round(multiplier * int(self.manifest["num_train"])))
            mask = pc.and_(mask, pc.less(table.column("index"), limit))
        return mask
