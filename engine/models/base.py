"""Turn a base-model spec into something `from_pretrained` accepts, and load it on the right device.

Specs: "tiny" (built offline, cached per node), "builtin-digits" (a small SD pre-trained on the built-in
digits, shipped in the package), a local folder, any fsspec URI with a scheme
(`s3://...`, copied once per node into the cache) or a hub id (returned as is; needs a model hub).
Loading happens in Ray actors' constructors, so device and dtype are picked there: fp16 on CUDA,
fp32 on CPU.
"""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

from engine.locations import has_scheme, looks_like_path  # noqa: F401  (looks_like_path: re-exported)
from engine.models.cache import build_once
from engine.models.errors import ModelError
from engine.models.tiny import build_tiny_clip, build_tiny_sd, builder_hash
from engine.storage import Storage, redact

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Kind = Literal["sd", "clip"]
# The file whose presence says "this folder is a model of that kind".
_INDEX_FILE: dict[str, str] = {"sd": "model_index.json", "clip": "config.json"}


@dataclass(frozen=True)
class ModelRef:
    """How any process (driver, Train worker, Ray actor) resolves the configured model on its own node.

    Every stage builds it with `from_config`, so the tiny model's tokenizer words (class names and
    metaclass) are the same everywhere and an adapter trained on one matches the base of another.
    """

    spec: str
    cache_dir: str
    kind: str = "sd"
    tiny_seed: int = 0
    resolution: int = 32
    extra_words: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any, kind: Kind, class_names: Iterable[str], metaclass: str) -> "ModelRef":
        model = config.model
        return cls(model.base if kind == "sd" else model.clip, model.cache_dir, kind, model.tiny_seed,
                   model.resolution, (*class_names, metaclass))

    def resolve(self, storage: Storage | None = None) -> str:
        return resolve_model(self.spec, self.cache_dir, storage, kind=self.kind,  # type: ignore[arg-type]
                             tiny_seed=self.tiny_seed, resolution=self.resolution, extra_words=self.extra_words)


# Models shipped inside the package (spec -> folder): trained by a repo config, small enough for git.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    # spec: (folder, the command that reproduces it)
    "builtin-digits": (os.path.join(PRETRAINED_DIR, "digits-ldm"),
                       "diffmix pretrain --config examples/pretrain_digits.yaml"),
    "builtin-scenes": (os.path.join(PRETRAINED_DIR, "scenes-ldm"),
                       "diffmix pretrain --config examples/pretrain_scenes.yaml"),
    "builtin-scenes-clip": (os.path.join(PRETRAINED_DIR, "scenes-clip"),
                            "python -m engine.models.scene_clip --output engine/models/pretrained/scenes-clip"),
}


def shipped_model(spec: str, kind: "Kind" = "sd") -> str:
    """The folder of a model that ships with the engine (e.g. the demo's `builtin-scenes` SD)."""
    folder, recipe = SHIPPED_MODELS[spec]
    if not os.path.isfile(os.path.join(folder, _INDEX_FILE[kind])):
        raise ModelError(f"shipped model {spec!r} is missing from {folder} (or is not a {kind} model); rebuild it "
                         f"with `{recipe}`")
    return folder


def _check_kind(kind: str) -> None:
    if kind not in _INDEX_FILE:
        raise ModelError(f"unknown model kind {kind!r}: expected one of {sorted(_INDEX_FILE)}")


def _check_folder(path: str, kind: str, what: str = "base model folder") -> str:
    if not os.path.isdir(path):
        raise ModelError(f"{what} not found: {path}")
    index = _INDEX_FILE[kind]
    if not os.path.isfile(os.path.join(path, index)):
        raise ModelError(f"{what} {path} has no {index}: not a {kind} model in diffusers/transformers format")
    return path


def tiny_cache_name(kind: str, seed: int, resolution: int, extra_words: Iterable[str] = ()) -> str:
    return f"tiny-{kind}-s{seed}-r{resolution}-{builder_hash(extra_words)}"


def remote_cache_name(uri: str) -> str:
    return f"remote-{hashlib.sha256(uri.rstrip('/').encode('utf-8')).hexdigest()[:16]}"


def _copy_remote(uri: str, cache_dir: str, storage: Storage, kind: str) -> str:
    local = os.path.join(cache_dir, remote_cache_name(uri))

    def download(tmp: str) -> None:
        storage.download_dir(uri, tmp)
        if not os.listdir(tmp):
            raise ModelError(f"remote model folder is empty or missing: {redact(uri)}")
        _check_folder(tmp, kind, what=f"remote model {redact(uri)}")

    if build_once(local, download):
        log.info("copied model %s to %s", redact(uri), local)
    return local


def resolve_model(spec: str, cache_dir: str, storage: Storage | None = None, kind: Kind = "sd",
                  tiny_seed: int = 0, resolution: int = 32, extra_words: Iterable[str] = ()) -> str:
    """Return a local folder (or a hub id) for `spec`, building or copying it into `cache_dir` once.

    `resolution` is the tiny SD image size or the tiny CLIP image size; `extra_words` become whole
    tokens of a tiny model's tokenizer (class and metaclass names). Both are ignored for real models.
    """
    _check_kind(kind)
    spec = str(spec).strip()
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    if spec == "tiny":
        words = list(extra_words)
        folder = os.path.join(cache_dir, tiny_cache_name(kind, tiny_seed, resolution, words))
        build = build_tiny_sd if kind == "sd" else build_tiny_clip
        return build(folder, tiny_seed, resolution, words)
    if spec in SHIPPED_MODELS:
        return shipped_model(spec, kind)
    if has_scheme(spec):
        return _copy_remote(spec, cache_dir, storage or Storage(), kind)
    local = os.path.abspath(os.path.expanduser(spec[len("file://"):] if spec.startswith("file://") else spec))
    if os.path.exists(local):
        return _check_folder(local, kind)
    if looks_like_path(spec):
        raise ModelError(f"base model folder not found: {local}")
    log.info("base model %r is a hub id: loading it needs a model hub or a filled HF cache", spec)
    return spec


# --- loading ---------------------------------------------------------------------------------------

def pick_device_dtype(device: "str | torch.device | None" = None) -> "tuple[torch.device, torch.dtype]":
    """CUDA when present (fp16, as the paper runs), else CPU with fp32 (fp16 on CPU is slow or missing)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    return dev, (torch.float16 if dev.type == "cuda" else torch.float32)


def _resolve_device_dtype(device: Any, dtype: Any) -> "tuple[torch.device, torch.dtype]":
    dev, default_dtype = pick_device_dtype(device)
    return dev, (dtype if dtype is not None else default_dtype)


def _precheck(path: str) -> str:
    """What `from_pretrained` gets; fails before any import or loading work on a missing local folder."""
    path = str(path)
    if has_scheme(path):
        raise ModelError(f"resolve {redact(path)} with resolve_model() before loading it")
    if not looks_like_path(path):
        return path  # a hub id, or a relative folder that from_pretrained resolves itself
    local = os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))
    if not os.path.isdir(local):
        raise ModelError(f"base model folder not found: {local}")
    return local


def _diffusers_dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (0.42 warns on the old name); older ones lack `dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_failed(path: str, exc: BaseException) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = " (HF_HUB_OFFLINE is set: only local folders and cached hub models load)" if offline else ""
    first = (str(exc).strip().splitlines() or [""])[0]  # diffusers' and the hub's messages run to paragraphs
    return ModelError(f"could not load base model {path!r}{hint}: {type(exc).__name__}: {first}")


@contextmanager
def loading(path: str) -> Iterator[None]:
    """Around `from_pretrained` calls: a folder or hub id that does not load is a one-line ModelError naming it.

    diffusers, transformers and huggingface_hub report a missing, unreachable, gated or broken model as an
    OSError (the hub's HTTP errors, offline mode, a missing entry) or a ValueError (a bad config or repo id)."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise _load_failed(path, exc) from exc


def load_img2img_pipeline(path: str, device: "str | torch.device | None" = None,
                          dtype: "torch.dtype | None" = None) -> Any:
    """A `StableDiffusionImg2ImgPipeline` on `device`, without safety checker or progress bars."""
    path = _precheck(path)
    from diffusers import StableDiffusionImg2ImgPipeline

    dev, dt = _resolve_device_dtype(device, dtype)
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **{_diffusers_dtype_kwarg(): dt})
    except (OSError, ValueError) as exc:  # diffusers/hub report missing or unreachable files as these
        raise _load_failed(path, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def load_clip(path: str, device: "str | torch.device | None" = None,
              dtype: "torch.dtype | None" = None) -> tuple[Any, Any]:
    """(CLIPModel in eval mode on `device`, CLIPProcessor) from a folder or hub id."""
    path = _precheck(path)
    from transformers import CLIPModel, CLIPProcessor

    dev, dt = _resolve_device_dtype(device, dtype)
    try:
        model = CLIPModel.from_pretrained(path, dtype=dt)
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise _load_failed(path, exc) from exc
    model.eval()
    return model.to(dev), processor
