"""A CLIP BPE tokenizer generated offline, so tiny models need no download.

The format is CLIP's: byte-level unicode symbols, a "</w>" end-of-word suffix, merges.txt with a
"#version" header, and `<|startoftext|>` / `<|endoftext|>` as the last two ids. The vocabulary holds
all 256 byte symbols (with and without "</w>") plus one whole-word token per listed word, so prompt
words, class names and metaclasses are single tokens while any other text still encodes, as chars.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import unicodedata
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # transformers is heavy: import it only where a tokenizer is built
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MAX_LENGTH = 77

# Words of the prompts the engine writes ("photo of a [V] bird", "a photo with a bird on it").
PROMPT_WORDS: tuple[str, ...] = (
    "photo", "of", "a", "an", "the", "with", "without", "on", "it", "in", "and", "image",
    "picture", "close", "up", "style", "type", "kind", "species", "digit", "number", "handwritten",
    "bird", "car", "aircraft", "airplane", "flower", "dog", "cat", "animal", "object",
)

# Letter runs: what CLIP's pre-tokenizer keeps together (digits and punctuation are split off).
_LETTERS = re.compile(r"[^\W\d_]+")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (what ByteLevel pre-tokenizing emits)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def split_words(texts: Iterable[str]) -> list[str]:
    """Normalise like the tokenizer (NFC, lower case) and keep the letter runs, in order, once."""
    out: list[str] = []
    seen: set[str] = set()
    for text in texts:
        for word in _LETTERS.findall(unicodedata.normalize("NFC", str(text)).lower()):
            if word not in seen:
                seen.add(word)
                out.append(word)
    return out


def vocabulary_words(extra_words: Iterable[str] = ()) -> list[str]:
    """Prompt words first, then the extra words sorted, so caller order does not change the vocab."""
    base = split_words(PROMPT_WORDS)
    known = set(base)
    return base + sorted(w for w in split_words(extra_words) if w not in known)


def _symbols(word: str) -> list[str]:
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += EOW
    return chars


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge like `tokenizers`' BPE: lowest rank first, leftmost on ties, until nothing applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best: tuple[int, int] | None = None
        for pos in range(len(symbols) - 1):
            rank = ranks.get((symbols[pos], symbols[pos + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, pos)
        if best is None:
            break
        pos = best[1]
        symbols[pos:pos + 2] = [symbols[pos] + symbols[pos + 1]]
    return symbols


def build_vocab_and_merges(extra_words: Iterable[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic CLIP-format vocab and merges in which every listed word is one token.

    Each word gets merges that join, left to right, whatever the earlier merges leave of it. New
    merges rank after all older ones, so they never change how an earlier word is split.
    """
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words(extra_words):
        pieces = _apply_bpe(_symbols(word), ranks)
        acc = pieces[0]
        for piece in pieces[1:]:
            pair = (acc, piece)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            acc += piece

    table = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in list(table.values()) + [symbol + EOW for symbol in table.values()]:
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(extra_words: Iterable[str] = ()) -> "CLIPTokenizer":
    """Build and check the tokenizer from vocab/merges objects (`vocab_file=` is broken in transformers 5)."""
    from transformers import CLIPTokenizer

    words = vocabulary_words(extra_words)
    vocab, merges = build_vocab_and_merges(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    check_tokenizer(tokenizer, words)
    return tokenizer


def check_tokenizer(tokenizer: "CLIPTokenizer", words: Sequence[str]) -> None:
    """Fail loudly if a listed word is not one token or unknown text does not encode into chars."""
    bad = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if bad:
        raise RuntimeError(f"generated tokenizer splits listed words: {bad[:10]}")
    probe = "zqxj"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if len(ids) != len(probe) or tokenizer.unk_token_id in ids:
        raise RuntimeError(f"generated tokenizer cannot encode unknown word {probe!r}: {ids}")
    if tokenizer.bos_token != BOS or tokenizer.eos_token != EOS:
        raise RuntimeError("generated tokenizer has wrong special tokens")


def write_clip_files(folder: str, vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """CLIP's original vocab.json + merges.txt, for tools that read those instead of tokenizer.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.writelines(f"{left} {right}\n" for left, right in merges)


def save_clip_tokenizer(folder: str, extra_words: Iterable[str] = ()) -> "CLIPTokenizer":
    """Write a loadable tokenizer folder (tokenizer.json + config + vocab.json + merges.txt)."""
    words = vocabulary_words(extra_words)
    tokenizer = make_clip_tokenizer(words)
    tokenizer.save_pretrained(folder)
    write_clip_files(folder, *build_vocab_and_merges(words))
    log.debug("wrote CLIP tokenizer with %d tokens (%d words) to %s", len(tokenizer), len(words), folder)
    return tokenizer
