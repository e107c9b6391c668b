"""Tokenised, memory-mapped shards in a cache shared by parallel workers, and the corpus they make."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import DataError
from harness.core.io import file_lock, write_bytes_atomic
from harness.data import synthetic
from harness.data.config import (
    BPE_MAX_CHARS,
    CHUNK_CHARS,
    FORMAT_VERSION,
    DataConfig,
    short_message,
)
from harness.data.sources import _resolve_source, _Source, _Split, make_split
from harness.data.tokenizer import Tokenizer, train_bpe

log = logging.getLogger(__name__)

# ============================================================================================ corpus

@dataclass(eq=False)
class TokenizedCorpus:
    train: np.ndarray   # 1-D token ids (uint16 when vocab < 65536 else uint32), may be np.memmap
    val: np.ndarray
    tokenizer: Tokenizer
    name: str           # short description of the source
    meta: dict = field(default_factory=dict)  # shard meta (documents, characters, cache folder, ...)
    # difficulty of each validation token as a target (int8, aligned with ``val``; synthetic sources only:
    # harness.data.synthetic), None for natural text
    val_difficulty: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def unigram_perplexity(self) -> float:
        """Perplexity of the validation split under the training split's add-one unigram model."""
        counts = np.ones(self.tokenizer.vocab_size, dtype=np.float64)
        step = 1 << 24
        for i in range(0, len(self.train), step):
            c = np.bincount(np.asarray(self.train[i:i + step]), minlength=len(counts))
            if len(c) > len(counts):
                counts = np.concatenate([counts, np.ones(len(c) - len(counts))])
            counts[:len(c)] += c
        logp = np.log(counts) - math.log(counts.sum())
        if len(self.val) == 0:
            return float("nan")
        nll = 0.0
        for i in range(0, len(self.val), step):
            ids = np.asarray(self.val[i:i + step]).astype(np.int64)
            nll -= float(logp[np.minimum(ids, len(logp) - 1)].sum())
        return float(math.exp(nll / len(self.val)))

    def __repr__(self) -> str:
        return (f"TokenizedCorpus(name={self.name!r}, train={len(self.train)} tokens, "
                f"val={len(self.val)} tokens, vocab_size={self.tokenizer.vocab_size})")



# -------------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """``$HARNESS_CACHE``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)/ponder-harness."""
    root = os.environ.get("HARNESS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ponder-harness"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_cache(cache_dir: str | os.PathLike | None) -> Path:
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "data"
    try:
        (root / "shards").mkdir(parents=True, exist_ok=True)
        (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data cache in {root} ({short_message(exc)}); set HARNESS_CACHE to a "
                        "writable folder") from None
    return root


def _get_tokenizer(cfg: DataConfig, src: _Source, split: _Split, cache: Path) -> Tokenizer:
    spec = cfg.tokenizer.strip()
    if spec == "bpe":
        key = _key(FORMAT_VERSION, src.fingerprint, cfg.text_field, cfg.val_fraction, cfg.vocab_size)
        path = cache / "tokenizers" / f"bpe-{src.slug}-{cfg.vocab_size}-{key}.json"
        with file_lock(path.with_suffix(".lock")):
            if path.is_file():
                try:
                    tok = Tokenizer.load(path)
                    tok.name = path.name
                    return tok
                except DataError:
                    log.warning("cached tokenizer %s is corrupt; retraining it", path)
            started = time.time()
            split.scan()
            # very large sources: train on an even sample of about BPE_MAX_CHARS characters
            stride = max(1, math.ceil(split.chars / BPE_MAX_CHARS))
            texts = (text for i, (is_val, text) in enumerate(split.segments()) if not is_val and i % stride == 0)
            tok = train_bpe(texts, cfg.vocab_size)
            tok.save(path)
            log.info("trained a %d-token BPE on %s in %.1fs", tok.vocab_size, src.name, time.time() - started)
            tok.name = path.name
            return tok
    p = Path(spec).expanduser()
    if p.exists() or spec.endswith(".json") or spec.startswith((".", "/", "~", "\\")):
        return Tokenizer.load(p)
    return Tokenizer.from_pretrained(spec)


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _open_shards(folder: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype(meta["dtype"])
    out = []
    for part in ("train", "val"):
        n = int(meta[part]["tokens"])
        out.append(np.memmap(folder / f"{part}.bin", dtype=dtype, mode="r", shape=(n,)) if n
                   else np.zeros(0, dtype=dtype))
    return out[0], out[1]


def _valid_meta(folder: Path, expect: dict) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in expect.items()):
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for part in ("train", "val"):
            if (folder / f"{part}.bin").stat().st_size != int(meta[part]["tokens"]) * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_shards(folder: Path, split: _Split, tok: Tokenizer, expect: dict) -> dict:
    started = time.time()
    split.scan()
    dtype = _dtype_for(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    stats = {p: {"tokens": 0, "segments": 0, "chars": 0} for p in ("train", "val")}
    files, tmps = {}, {}
    try:
        for part in ("train", "val"):
            fd, tmps[part] = tempfile.mkstemp(prefix=f".{part}.", suffix=".tmp", dir=folder)
            files[part] = os.fdopen(fd, "wb")

        def flush(batch: list[tuple[bool, str]]) -> None:
            for (is_val, text), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                part = "val" if is_val else "train"
                arr = np.asarray(ids, dtype=dtype)
                files[part].write(arr.tobytes())
                files[part].write(eos.tobytes())
                s = stats[part]
                s["tokens"] += len(arr) + 1
                s["segments"] += 1
                s["chars"] += len(text)

        batch, size = [], 0
        for item in split.segments():
            batch.append(item)
            size += len(item[1])
            if size >= (8 << 20) or len(batch) >= 4096:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
        for part in ("train", "val"):
            files[part].close()
            os.replace(tmps[part], folder / f"{part}.bin")
    except BaseException:
        for part, f in files.items():
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmps[part])
        raise
    meta = dict(expect)
    meta.update({
        "name": split.src.name, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "split": {"unit": f"document (long texts: chunks of ~{CHUNK_CHARS} chars of paragraphs)",
                  "hash": "blake2b-64 of the unit text", "units": split.n_units, "val_units": split.n_val},
        "train": stats["train"], "val": stats["val"],
        "build_seconds": round(time.time() - started, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    write_bytes_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    log.info("tokenised %s: %d train / %d val tokens in %.1fs", split.src.name, stats["train"]["tokens"],
             stats["val"]["tokens"], time.time() - started)
    return meta


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike | None = None) -> TokenizedCorpus:
    """Load (tokenising and caching on first use) the corpus described by ``cfg``."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"load_corpus expects a DataConfig, got {type(cfg).__name__}")
    if synthetic.is_synthetic(cfg.source):  # filler and tokenizer: the embedded corpus
        return synthetic_corpus(cfg, load_corpus(dataclasses.replace(cfg, source="embedded", val_source=""),
                                                 cache_dir))
    cache = _prepare_cache(cache_dir)
    src = _resolve_source(cfg)
    split = make_split(cfg, src)
    tok = _get_tokenizer(cfg, src, split, cache)
    tok_spec = f"bpe:{cfg.vocab_size}" if cfg.tokenizer.strip() == "bpe" else cfg.tokenizer.strip()
    folder = cache / "shards" / f"{src.slug}-{_key(src.identity, cfg.text_field, cfg.val_fraction, tok_spec)}"
    expect = {"format": FORMAT_VERSION, "source": src.identity, "fingerprint": src.fingerprint,
              "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "tokenizer_sha": tok.sha}
    meta = _valid_meta(folder, expect)
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / ".lock"):
            meta = _valid_meta(folder, expect)   # another process may have built it meanwhile
            if meta is None:
                meta = _build_shards(folder, split, tok, expect)
    train, val = _open_shards(folder, meta)
    meta = dict(meta, cache_folder=str(folder))
    return TokenizedCorpus(train=train, val=val, tokenizer=tok, name=src.name, meta=meta)




def synthetic_corpus(cfg: DataConfig, base: TokenizedCorpus) -> TokenizedCorpus:
    """The corpus of a ``synthetic:`` source (harness.data.synthetic) with filler from ``base``, carrying
    ``val_difficulty``; generated in memory on each load (deterministic from the source string)."""
    built = synthetic.build(cfg.source, base.train, base.val, base.tokenizer)
    return TokenizedCorpus(train=built.train, val=built.val, tokenizer=base.tokenizer, name=built.name,
                           meta=dict(built.meta, filler_from=base.name), val_difficulty=built.val_difficulty)
