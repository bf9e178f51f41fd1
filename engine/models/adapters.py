"""The adapter artifact (output of fine-tuning, input of synthesis): naming, writing, reading, applying.

Layout of an artifact folder (local or any fsspec URI):

    adapter.json                                    what was trained (written last: its presence = complete)
    pytorch_lora_weights.safetensors                UNet LoRA, diffusers format   (strategies db, ti+db)
    embeddings/class-0000/learned_embeds.safetensors  one per class token          (strategies ti, ti+db)

Every weight file loads with stock diffusers (`pipe.load_lora_weights`, `pipe.load_textual_inversion`),
and `load_adapter` applies an artifact with exactly those calls, so the engine and a stock pipeline agree.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from engine.models.errors import ModelError
from engine.storage import Storage, is_local, join, redact

if TYPE_CHECKING:  # torch/diffusers are heavy: imported where weights are touched
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ADAPTER_JSON = "adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
PROMPT_TEMPLATE = "photo of a {identifier} {metaclass}"
STRATEGIES: tuple[str, ...] = ("ti", "db", "ti+db")


class AdapterError(ModelError):
    """An adapter artifact that is missing, malformed or made for another base model."""


# --- naming and prompts ------------------------------------------------------------------------

def trains_embeddings(strategy: str) -> bool:
    return strategy in ("ti", "ti+db")


def trains_lora(strategy: str) -> bool:
    return strategy in ("db", "ti+db")


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown fine-tuning strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    return strategy


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def placeholder_tokens(class_names: Sequence[str]) -> list[str]:
    """One new token per class, `<{slug}-{index}>`: lower case (CLIP lower-cases prompts) and unique by index."""
    return [f"<{_slug(name)}-{i}>" for i, name in enumerate(class_names)]


def readable_name(class_name: str) -> str:
    """A class name as words for a prompt: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    text = re.sub(r"^\d+[.\-_ ]+", "", class_name)
    return re.sub(r"[_\s]+", " ", text).strip() or class_name


def class_prompts(strategy: str, class_names: Sequence[str], metaclass: str) -> list[str]:
    """The prompt per class: its placeholder token when embeddings are learned, else its name (as Diff-Mix's db)."""
    check_strategy(strategy)
    identifiers = (placeholder_tokens(class_names) if trains_embeddings(strategy)
                   else [readable_name(n) for n in class_names])
    return [PROMPT_TEMPLATE.format(identifier=i, metaclass=metaclass) for i in identifiers]


def embedding_relpath(index: int) -> str:
    return f"embeddings/class-{index:04d}/{EMBEDDING_FILE}"


# --- base model fingerprint --------------------------------------------------------------------

_FULL_HASH_LIMIT = 4 << 20
_EDGE_BYTES = 1 << 20


def fingerprint_folder(folder: str) -> str:
    """Content fingerprint of a model folder, independent of where it lives.

    Small files are hashed whole; big weight files by size plus their first and last MiB, so an SD-1.5
    folder fingerprints in well under a second. It detects a different model, not tampering.
    """
    if not os.path.isdir(folder):
        return "id:" + hashlib.sha256(folder.encode()).hexdigest()[:16]  # a hub id: name it, nothing to read
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            size = os.path.getsize(path)
            h.update(f"{rel}\x1f{size}\x1e".encode())
            with open(path, "rb") as fh:
                if size <= _FULL_HASH_LIMIT:
                    h.update(fh.read())
                else:
                    h.update(fh.read(_EDGE_BYTES))
                    fh.seek(size - _EDGE_BYTES)
                    h.update(fh.read(_EDGE_BYTES))
    return h.hexdigest()[:16]


# --- tokens and embeddings ---------------------------------------------------------------------

def metaclass_embedding(tokenizer: Any, text_encoder: Any, metaclass: str) -> "torch.Tensor":
    """The input embedding of the metaclass word (mean of its pieces if the tokenizer splits it)."""
    ids = tokenizer(metaclass, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AdapterError(f"metaclass {metaclass!r} encodes to no tokens")
    if len(ids) > 1:
        log.info("metaclass %r is %d tokens; placeholder tokens start from their mean embedding", metaclass, len(ids))
    weight = text_encoder.get_input_embeddings().weight
    return weight.detach()[ids].float().mean(dim=0)


def add_placeholder_tokens(tokenizer: Any, text_encoder: Any, tokens: Sequence[str], metaclass: str) -> list[int]:
    """Add `tokens` to the tokenizer, grow the embedding matrix, set each new row to the metaclass embedding.

    Ids are assigned as stock `load_textual_inversion` assigns them (appended, in order), so a pipeline
    that loads the saved embeddings ends up with the same vocabulary as the one that trained them.
    """
    import torch

    init = metaclass_embedding(tokenizer, text_encoder, metaclass)
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise AdapterError(f"placeholder token(s) already in the tokenizer: {clash[:5]}")
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if rows != len(tokenizer):
        raise AdapterError(f"text encoder has {rows} embedding rows but the tokenizer {len(tokenizer)} tokens")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise AdapterError(f"tokenizer added {added} of {len(tokens)} placeholder tokens")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = init.to(weight.dtype)
    return list(ids)


# --- writing -----------------------------------------------------------------------------------

def lora_config_dict(rank: int) -> dict[str, Any]:
    """LoraConfig kwargs of the engine's UNet LoRA; alpha == rank (scale 1, as diffusers' loaders assume)."""
    if rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    return {"r": rank, "lora_alpha": rank, "init_lora_weights": "gaussian", "target_modules": list(LORA_TARGETS)}


def save_lora(folder: str, peft_state: Mapping[str, "torch.Tensor"], rank: int) -> str:
    """Write a UNet LoRA given as a peft state dict (get_peft_model_state_dict) in diffusers format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    layers = convert_state_dict_to_diffusers({k: v.detach().float().cpu().contiguous() for k, v in peft_state.items()})
    # peft keeps target_modules as a set: sorted, so the metadata does not depend on the hash seed
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in LoraConfig(**lora_config_dict(rank)).to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True, weight_name=LORA_FILE,
        unet_lora_adapter_metadata=metadata)
    path = os.path.join(folder, LORA_FILE)
    canonical_safetensors(path)
    return path


def canonical_safetensors(path: str) -> None:
    """Rewrite a .safetensors header with sorted keys, so the same tensors and metadata give the same bytes.

    safetensors writes `__metadata__` in hash-map order (it differs between processes); tensor data and
    offsets stay as they are, and any safetensors reader loads the file unchanged.
    """
    with open(path, "rb") as fh:
        blob = fh.read()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + blob[8 + size:])


def save_embeddings(folder: str, tokens: Sequence[str], embeddings: "torch.Tensor") -> list[str]:
    """One `learned_embeds.safetensors` per token ({token: [1, dim]}, the diffusers example's format)."""
    from safetensors.torch import save_file

    if embeddings.ndim != 2 or embeddings.shape[0] != len(tokens):
        raise AdapterError(f"expected {len(tokens)} embeddings, got a tensor of shape {tuple(embeddings.shape)}")
    rels = []
    for i, token in enumerate(tokens):
        rel = embedding_relpath(i)
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({token: embeddings[i:i + 1].detach().float().cpu().contiguous()}, path)
        canonical_safetensors(path)
        rels.append(rel)
    return rels


# --- adapter.json ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterInfo:
    """Contents of adapter.json; `prompts[label]` is the text that asks the adapted model for that class."""

    strategy: str
    base_model: str
    base_model_hash: str
    class_names: list[str]
    metaclass: str
    tokens: list[str]
    prompts: list[str]
    lora_rank: int | None
    lora_file: str | None
    embedding_files: list[str]
    steps: int
    final_loss: float | None
    resolution: int
    config_hash: str
    dataset_fingerprint: str
    loss_history: list[list[float]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    model_settings: dict | None = None  # the base folder's noise schedule, latent scale, prompt length
    format_version: int = FORMAT_VERSION
    uri: str = ""

    def prompt(self, label: int) -> str:
        return self.prompts[label]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("uri")
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, uri: str = "") -> "AdapterInfo":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{redact(uri)}/{ADAPTER_JSON} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise AdapterError(f"{redact(uri)}/{ADAPTER_JSON}: unsupported format (want format_version {FORMAT_VERSION})")
        fields = cls.__dataclass_fields__
        known = set(fields) - {"uri"}
        missing = sorted(k for k, f in fields.items()
                         if k not in data and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise AdapterError(f"{redact(uri)}/{ADAPTER_JSON} lacks {missing}")
        info = cls(**{k: v for k, v in data.items() if k in known}, uri=uri)
        if len(info.prompts) != len(info.class_names) or len(info.embedding_files) != len(info.tokens):
            raise AdapterError(f"{redact(uri)}/{ADAPTER_JSON}: class, prompt, token and file lists disagree")
        bad = [f for f in ([info.lora_file] if info.lora_file else []) + list(info.embedding_files)
               if not inside_artifact(f)]
        if bad:
            raise AdapterError(f"{redact(uri)}/{ADAPTER_JSON}: weight files must be .safetensors files inside the "
                               f"artifact folder, got {bad[:5]}")
        return info


def inside_artifact(rel: object) -> bool:
    """A weight file an adapter.json may name: a relative .safetensors path that stays inside the artifact
    (an adapter from elsewhere must not make the loader read other files, or a pickle)."""
    if not isinstance(rel, str) or not rel.endswith(".safetensors") or "\\" in rel or "\x00" in rel:
        return False
    parts = rel.split("/")
    return not rel.startswith("/") and "://" not in rel and all(p not in ("", ".", "..") for p in parts)


def read_adapter_info(uri: str, storage: Storage | None = None) -> AdapterInfo:
    """Read and check `<uri>/adapter.json` (local path or any fsspec URI)."""
    storage = storage or Storage()
    try:
        text = storage.read_text(join(uri, ADAPTER_JSON))
    except FileNotFoundError:
        raise AdapterError(f"no adapter artifact at {redact(uri)} (missing {ADAPTER_JSON})") from None
    return AdapterInfo.from_json(text, uri)


def write_adapter_info(uri: str, info: AdapterInfo, storage: Storage | None = None) -> None:
    (storage or Storage()).write_text(join(uri, ADAPTER_JSON), info.to_json())


# --- applying ----------------------------------------------------------------------------------

def _check_base(pipe: Any, info: AdapterInfo) -> None:
    """Refuse a pipeline built from another base model (a LoRA would load and silently produce noise)."""
    path = getattr(pipe, "name_or_path", None)
    if not path or not os.path.isdir(str(path)):
        log.info("pipeline base %r is not a local folder: base model hash not checked", path)
        return
    found = fingerprint_folder(str(path))
    if found != info.base_model_hash:
        raise AdapterError(
            f"adapter {redact(info.uri)} was trained on base model {info.base_model!r} (hash {info.base_model_hash}) "
            f"but the pipeline comes from {path} (hash {found})")


def _apply(pipe: Any, folder: str, info: AdapterInfo, fuse: bool) -> None:
    if info.lora_file:
        pipe.load_lora_weights(folder, weight_name=info.lora_file, adapter_name="diffmix")
        if fuse:
            pipe.fuse_lora(lora_scale=1.0, adapter_names=["diffmix"])
            pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    if info.tokens:
        pipe.load_textual_inversion([os.path.join(folder, rel) for rel in info.embedding_files], token=list(info.tokens))


def load_adapter(pipe: Any, artifact_uri: str, storage: Storage | None = None, *, fuse: bool = False,
                 check_base: bool = True) -> AdapterInfo:
    """Apply a fine-tuning artifact (local path or s3://...) to a diffusers SD pipeline, in place.

    Uses only the stock loaders. `fuse` merges the LoRA into the UNet weights (faster sampling, cannot be
    undone). Returns the artifact's AdapterInfo: `info.prompts[label]` is the prompt for class `label`.
    A pipeline must receive at most one artifact (the placeholder tokens would clash).
    """
    storage = storage or Storage()
    info = read_adapter_info(artifact_uri, storage)
    if check_base:
        _check_base(pipe, info)
    if is_local(artifact_uri):
        local = os.path.expanduser(artifact_uri[len("file://"):] if artifact_uri.startswith("file://") else artifact_uri)
        _apply(pipe, local, info, fuse)
    else:
        tmp = tempfile.mkdtemp(prefix="diffmix-adapter-")
        try:
            storage.download_dir(artifact_uri, tmp)
            _apply(pipe, tmp, info, fuse)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("applied adapter %s (%s, %d classes, %d steps) to the pipeline", redact(artifact_uri), info.strategy,
             len(info.class_names), info.steps)
    return info
