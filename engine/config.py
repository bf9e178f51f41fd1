"""One typed experiment config, loaded from YAML with `a.b=value` overrides.

Every stage reads its own section; unknown keys, wrong types and impossible values fail here,
at load, with the dotted key named, before any expensive work starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunConfig(Section):
    name: str = Field(default="run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output: str = Field(default="runs", min_length=1, description="Output root URI; the run writes under <output>/<name>.")
    seed: int = Field(default=0, ge=0)

    @property
    def uri(self) -> str:
        return self.output.rstrip("/") + "/" + self.name


class StorageConfig(Section):
    """fsspec `storage_options` (e.g. endpoint_url for S3); credentials belong in the environment."""

    storage_options: dict[str, Any] = Field(default_factory=dict)
    retries: int = Field(default=3, ge=0, le=20)
    retry_wait_s: float = Field(default=0.5, ge=0)


class SubsetConfig(Section):
    """Which part of the train split to use: all of it, k per class, or a long-tail profile."""

    kind: Literal["full", "few_shot", "long_tail"] = "full"
    shots: int | None = Field(default=None, ge=1, description="k images per class (few_shot)")
    imbalance_factor: float | None = Field(default=None, ge=1, description="IF = n_max / n_min (long_tail)")

    @model_validator(mode="after")
    def _needs_parameter(self) -> "SubsetConfig":
        if self.kind == "few_shot" and self.shots is None:
            raise ValueError("dataset.subset.shots is required when kind is 'few_shot'")
        if self.kind == "long_tail" and self.imbalance_factor is None:
            raise ValueError("dataset.subset.imbalance_factor is required when kind is 'long_tail'")
        return self


class DatasetConfig(Section):
    source: Literal["builtin", "imagefolder", "parquet"] = "builtin"
    uri: str | None = Field(default=None, description="Root URI for imagefolder/parquet sources")
    metaclass: str | None = Field(default=None, min_length=1, description="e.g. bird, car; builtin: digit")
    class_names: list[str] | None = Field(default=None, description="Override/declare class names (parquet)")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="Used when the source has no test split")
    subset: SubsetConfig = Field(default_factory=SubsetConfig)
    skip_bad_images: bool = False
    image_size: int = Field(default=32, ge=8, le=1024, description="Builtin only: side of the stored images")

    @field_validator("class_names")
    @classmethod
    def _non_empty_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("class list is empty")
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _uri_when_needed(self) -> "DatasetConfig":
        if self.source != "builtin" and not self.uri:
            raise ValueError(f"dataset.uri is required when dataset.source is {self.source!r}")
        return self


class ModelConfig(Section):
    """Where base models come from: `tiny` (built offline), a local folder, an s3:// folder or a hub id."""

    base: str = Field(default="tiny", min_length=1)
    clip: str = Field(default="tiny", min_length=1)
    cache_dir: str = Field(default="~/.cache/diffmix", min_length=1)
    tiny_seed: int = Field(default=0, ge=0)
    resolution: int = Field(default=512, ge=8, le=2048, description="Pixel size images are generated/trained at")


class ExperimentConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    def hash(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none): names outputs that depend on them."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), with the value parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {err.get('input')!r})" if err["type"] != "missing" else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load YAML (or defaults when no path), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
        data = loaded or {}
    data = apply_overrides(data, list(overrides or []))
    return validate(data)
