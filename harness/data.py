"""Data: corpora, the tokenizer, memory-mapped token shards and training/validation batches.

Sources (``DataConfig.source``)
    ``"embedded"``
        The corpus shipped inside the package (``harness/corpus/*.txt.xz``, see its NOTICE):
        Shakespeare, Milton, the King James Bible and ~100 Wikipedia articles, about 13 M characters.
    a path
        A ``.txt``, ``.jsonl`` or ``.parquet`` file (``.txt.gz`` / ``.jsonl.gz`` too), or a directory
        searched recursively for them (hidden files and other extensions are ignored). A jsonl line or
        a parquet row is one document (its ``text_field``); a ``.txt`` file is one document, or, when
        it is longer than ~8 KB, a sequence of chunks of paragraphs of ~4 KB.
    ``"hf:<name>[:<config>[:<split>]]"``
        A dataset loaded with ``datasets.load_dataset`` (split ``train`` by default); one row is one
        document. Needs a reachable hub or a local ``datasets`` cache.

Split
    The unit of the train/validation split is a document (the embedded corpus and long ``.txt`` files
    are cut into chunks of paragraphs first). A unit goes to validation when a hash of its text falls
    below ``val_fraction``, so the split is deterministic, independent of file order, and a held-out
    text is never part of the training split (identical texts land on the same side). Consecutive
    units of one source document on the same side are joined again (with a blank line); every such
    segment is followed by the end-of-document token.

Cache (``$HARNESS_CACHE`` or ``~/.cache/ponder-harness``, folder ``data/``)
    ``tokenizers/bpe-<key>.json``: byte-level BPE trained on the training split, keyed by the source
    fingerprint, the split and the vocabulary size. ``shards/<source>-<key>/``: ``train.bin`` and
    ``val.bin`` (raw token ids, uint16 below 65536 tokens, else uint32) and ``meta.json`` (fingerprint
    of the source files - path, size and mtime, or a content hash for the embedded corpus -, the
    tokenizer's hash, the split). A shard whose meta does not match the source or tokenizer any more,
    or whose files have the wrong size, is rebuilt in place. Builds are serialised with a lock file
    and written atomically, so parallel workers can share one cache.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
# end-of-document tokens of common tokenizers, tried in order for tokenizers loaded from elsewhere
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")
FORMAT_VERSION = 1          # bump when the chunking, the split or the shard layout changes
CHUNK_CHARS = 4096          # target size of a chunk of paragraphs (the split unit of long texts)
DOC_SEPARATOR = "\n\f\n"    # between documents inside the embedded corpus files
_KEEP_IN_MEMORY = 256 << 20  # sources up to this many characters are read once, larger ones again
_BPE_MAX_CHARS = 1 << 30     # BPE training text cap (an even sample of the training split beyond it)
_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")


class DataError(Exception):
    """One-line, user-facing error naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _short(exc: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


# ============================================================================================ config

@dataclass
class DataConfig:
    source: str = "embedded"      # "embedded" | .txt/.jsonl/.parquet file or directory | "hf:<name>[:<config>[:<split>]]"
    text_field: str = "text"      # field name for jsonl/parquet/hf
    tokenizer: str = "bpe"        # "bpe" (trained on the training split, cached) | tokenizer.json path | hub name
    vocab_size: int = 8192        # for "bpe"
    val_fraction: float = 0.02    # fraction of documents held out

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        if not isinstance(self.source, str) or not self.source.strip():
            raise DataError(f"DataConfig.source={self.source!r} is invalid: give 'embedded', a path to a "
                            ".txt/.jsonl/.parquet file or directory, or 'hf:<dataset>'")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"DataConfig.text_field={self.text_field!r} is invalid: give the name of the "
                            "field/column that holds the text (default 'text')")
        if not isinstance(self.tokenizer, str) or not self.tokenizer.strip():
            raise DataError(f"DataConfig.tokenizer={self.tokenizer!r} is invalid: give 'bpe', a path to a "
                            "tokenizer.json or a hub tokenizer name")
        minimum = 256 + len(SPECIAL_TOKENS)
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, (int, np.integer)):
            raise DataError(f"DataConfig.vocab_size={self.vocab_size!r} is not an integer: give an integer "
                            f">= {minimum}, e.g. 8192")
        self.vocab_size = int(self.vocab_size)
        if self.vocab_size < minimum:
            raise DataError(f"DataConfig.vocab_size={self.vocab_size} is too small: a byte-level BPE needs at "
                            f"least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special token); use e.g. 8192")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float, np.floating)):
            raise DataError(f"DataConfig.val_fraction={self.val_fraction!r} is not a number: give a fraction "
                            "in (0, 0.5], e.g. 0.02")
        self.val_fraction = float(self.val_fraction)
        if not (0.0 < self.val_fraction <= 0.5) or not math.isfinite(self.val_fraction):
            raise DataError(f"DataConfig.val_fraction={self.val_fraction} is out of range: it must be in "
                            "(0, 0.5], e.g. 0.02")


# ========================================================================================= tokenizer

class Tokenizer:
    """Thin wrapper around :class:`tokenizers.Tokenizer` with an end-of-document token."""

    def __init__(self, tk: Any, name: str = ""):
        tk.no_truncation()   # a hub tokenizer.json may enable truncation/padding; we tokenise whole docs
        tk.no_padding()
        eos = next((tk.token_to_id(t) for t in _EOS_CANDIDATES if tk.token_to_id(t) is not None), None)
        if eos is None:
            tk.add_special_tokens([EOS_TOKEN])
            eos = tk.token_to_id(EOS_TOKEN)
        self._tk = tk
        self.name = name
        self.eos_id: int = int(eos)
        self.eos_token: str = tk.id_to_token(self.eos_id)
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(max(vocab.values()) + 1, tk.get_vocab_size(with_added_tokens=True))
        self._sha: str | None = None

    @property
    def backend(self) -> Any:
        """The wrapped :class:`tokenizers.Tokenizer`."""
        return self._tk

    @property
    def sha(self) -> str:
        """Content hash of the tokenizer (its canonical JSON)."""
        if self._sha is None:
            self._sha = hashlib.sha256(self._tk.to_str().encode("utf-8")).hexdigest()
        return self._sha

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use
        enc = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        else:
            ids = [int(i) for i in ids]
        return self._tk.decode(ids, skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a directory to write it into)."""
        p = Path(path)
        if p.is_dir() or (not p.suffix and not p.exists()):
            p = p / "tokenizer.json"
        _write_atomic(p, self._tk.to_str(pretty=True).encode("utf-8"))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p}; give an existing tokenizer.json, a hub "
                            "tokenizer name, or tokenizer='bpe'")
        from tokenizers import Tokenizer as _Tk
        try:
            tk = _Tk.from_file(str(p))
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
            raise DataError(f"tokenizer file {p} is corrupt or not a tokenizers JSON ({_short(exc, 120)}); "
                            "replace it with a valid tokenizer.json or use tokenizer='bpe'") from None
        return cls(tk, name=str(p))

    @classmethod
    def from_pretrained(cls, name: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tk
        try:
            tk = _Tk.from_pretrained(name)
        except Exception as exc:
            raise DataError(f"could not load tokenizer {name!r} from the Hugging Face hub ({_short(exc, 120)}); "
                            "check the name and that the hub is reachable (HF_HUB_OFFLINE unset), or give a "
                            f"local tokenizer.json path (if {name!r} is meant as a path, it does not exist) "
                            "or tokenizer='bpe'") from None
        return cls(tk, name=name)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation, ``<|endoftext|>`` as id 0) on ``texts``."""
    from tokenizers import Tokenizer as _Tk
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = _Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(tk, name=f"bpe-{vocab_size}")


# ============================================================================================ corpus

@dataclass(eq=False)
class TokenizedCorpus:
    train: np.ndarray   # 1-D token ids (uint16 when vocab < 65536 else uint32), may be np.memmap
    val: np.ndarray
    tokenizer: Tokenizer
    name: str           # short description of the source
    meta: dict = field(default_factory=dict)  # shard meta (documents, characters, cache folder, ...)

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


# ------------------------------------------------------------------------------------------ sources

@dataclass
class _Source:
    name: str                                  # short description
    slug: str                                  # file-name-safe label for the cache folder
    identity: str                              # what the source is (stable across content changes)
    fingerprint: str                           # changes when the content changes
    read: Callable[[], Iterator[list[str]]]    # yields source documents as lists of split units
    empty_message: str                         # DataError text when there is no text at all


def _chunk(text: str, target: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text into chunks of whole paragraphs of about ``target`` characters."""
    text = text.strip("\n").rstrip()
    if not text.strip():
        return []
    if len(text) <= 2 * target:
        return [text]
    pieces = re.split(r"(\n[ \t]*\n)", text)
    units = [pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else "") for i in range(0, len(pieces), 2)]
    fine: list[str] = []
    for u in units:                    # paragraphs longer than 2 targets: lines, then words
        if len(u) <= 2 * target:
            fine.append(u)
            continue
        for line in u.splitlines(keepends=True):
            while len(line) > 2 * target:
                cut = line.rfind(" ", target // 2, target)
                cut = target if cut < 0 else cut + 1
                fine.append(line[:cut])
                line = line[cut:]
            fine.append(line)
    chunks, cur, size = [], [], 0
    for u in fine:
        cur.append(u)
        size += len(u)
        if size >= target:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        if chunks and size < target // 4:
            chunks[-1] += "".join(cur)
        else:
            chunks.append("".join(cur))
    out = [c.strip("\n").rstrip() for c in chunks]
    return [c for c in out if c.strip()]


def _decode_utf8(raw: bytes, where: str, base_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not valid UTF-8: invalid byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{base_offset + exc.start}; re-encode the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _read_txt(path: Path) -> Iterator[list[str]]:
    try:
        with _open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({_short(exc)}); check the file") from None
    text = _decode_utf8(raw, str(path))
    if text.startswith("\ufeff"):
        text = text[1:]
    chunks = _chunk(text.replace("\r\n", "\n"))
    if chunks:
        yield chunks


def _read_jsonl(path: Path, text_field: str) -> Iterator[list[str]]:
    offset = 0
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode_utf8(raw, f"{path} (line {lineno})", offset)
                offset += len(raw)
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); each line of a "
                                    ".jsonl file must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path} line {lineno} is a JSON {type(obj).__name__}, not an object; "
                                    f"each line must be an object with a {text_field!r} field")
                if text_field not in obj:
                    keys = ", ".join(map(str, list(obj)[:8])) or "none"
                    raise DataError(f"{path} line {lineno} has no field {text_field!r} (fields: {keys}); set "
                                    "DataConfig.text_field to the field that holds the text")
                value = obj[text_field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{path} line {lineno}: field {text_field!r} is a "
                                    f"{type(value).__name__}, not a string; point text_field at a text field")
                if value.strip():
                    yield [value]
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({_short(exc)}); check the file") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({_short(exc, 120)}); check or rewrite "
                        "the file") from None
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(names[:8]) or 'none'}); "
                        "set DataConfig.text_field to the column that holds the text")
    typ = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{path}: column {text_field!r} has type {typ}, not string; point text_field at a "
                        "text column")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value and value.strip():
                yield [value]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return ""


def _read_file(path: Path, text_field: str) -> Iterator[list[str]]:
    s = _suffix(path)
    if s.startswith(".txt"):
        return _read_txt(path)
    if s.startswith(".jsonl"):
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


def _stat_fingerprint(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.name if f == root else str(f.relative_to(root))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (s or "source")[:40]


def _embedded_source() -> _Source:
    root = resources.files("harness").joinpath("corpus")
    try:
        files = sorted((f for f in root.iterdir() if f.name.endswith(".txt.xz")), key=lambda f: f.name)
    except (FileNotFoundError, NotADirectoryError, OSError):
        files = []
    if not files:
        raise DataError("the embedded corpus (harness/corpus/*.txt.xz) is missing from the installed package; "
                        "reinstall ponder-harness or rebuild it with scripts/build_corpus.py")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    parts = [f.name[:-len(".txt.xz")] for f in files]

    def read() -> Iterator[list[str]]:
        for f in files:
            text = lzma.decompress(f.read_bytes()).decode("utf-8")
            for doc in text.split(DOC_SEPARATOR):
                chunks = _chunk(doc)
                if chunks:
                    yield chunks

    return _Source(name="embedded:" + "+".join(parts), slug="embedded", identity="embedded",
                   fingerprint=h.hexdigest(), read=read,
                   empty_message="the embedded corpus is empty; rebuild it with scripts/build_corpus.py")


def _path_source(source: str, text_field: str) -> _Source:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {path} (DataConfig.source); give an existing .txt/.jsonl/"
                        ".parquet file or directory, 'embedded', or 'hf:<dataset>'")
    path = path.resolve()
    if path.is_dir():
        files, other = [], 0
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if _suffix(f):
                files.append(f)
            else:
                other += 1
        if not files:
            raise DataError(f"directory {path} holds no .txt, .jsonl or .parquet files"
                            f"{f' (ignored {other} other files)' if other else ''}; put the text in such "
                            "files or point DataConfig.source at one")
        kind, name = "dir", f"dir:{path.name}"
        empty = f"directory {path} contains no text (its {len(files)} data files are empty); add text"
    else:
        if not _suffix(path):
            raise DataError(f"unsupported file type {''.join(path.suffixes) or '(no extension)'!r} for {path}; "
                            "use .txt, .jsonl or .parquet (.txt.gz/.jsonl.gz), a directory of them, "
                            "'embedded' or 'hf:<dataset>'")
        files = [path]
        kind, name = "file", f"file:{path.name}"
        empty = f"{path} contains no text (empty file); add text or point DataConfig.source at another file"

    def read() -> Iterator[list[str]]:
        for f in files:
            yield from _read_file(f, text_field)

    return _Source(name=name, slug=_slug(path.name), identity=f"{kind}:{path}",
                   fingerprint=_stat_fingerprint(files, path), read=read, empty_message=empty)


def _hf_source(source: str, text_field: str) -> _Source:
    parts = source[3:].split(":")
    name = parts[0].strip()
    config = parts[1].strip() or None if len(parts) > 1 else None
    split = parts[2].strip() if len(parts) > 2 and parts[2].strip() else "train"
    if not name or len(parts) > 3:
        raise DataError(f"DataConfig.source={source!r} is malformed; use 'hf:<dataset name>[:<config>[:<split>]]'")
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the 'datasets' package; pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise DataError(f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(exc).__name__}: {_short(exc, 160)}; check the name/config and that the hub is "
                        "reachable (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE unset), or download the data and give "
                        "a local path") from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: "
                        f"{', '.join(ds.column_names[:8])}); set DataConfig.text_field")
    fp = getattr(ds, "_fingerprint", None) or hashlib.sha256(repr((name, config, split, len(ds))).encode()).hexdigest()

    def read() -> Iterator[list[str]]:
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            for value in batch[text_field]:
                if isinstance(value, str) and value.strip():
                    yield [value]

    label = f"hf:{name}" + (f":{config}" if config else "") + (f":{split}" if split != "train" else "")
    return _Source(name=label, slug=_slug(label.replace("/", "_")), identity=label, fingerprint=str(fp),
                   read=read, empty_message=f"dataset {label} contains no text in column {text_field!r}")


def _resolve_source(cfg: DataConfig) -> _Source:
    if cfg.source == "embedded":
        return _embedded_source()
    if cfg.source.startswith("hf:"):
        return _hf_source(cfg.source, cfg.text_field)
    return _path_source(cfg.source, cfg.text_field)


# -------------------------------------------------------------------------------------------- split

def _score(text: str) -> float:
    """Uniform hash of a text in [0, 1): below val_fraction means validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


class _Split:
    """Deterministic document-level train/validation split of a source."""

    def __init__(self, src: _Source, val_fraction: float):
        self.src, self.vf = src, val_fraction
        self._docs: list[list[str]] | None = None
        self.scanned = False
        self.n_units = self.n_val = 0
        self.forced_val = self.forced_train = -1

    def scan(self) -> None:
        if self.scanned:
            return
        keep: list[list[str]] | None = []
        chars = n = n_val = 0
        lo, hi = (2.0, -1), (-1.0, -1)
        for doc in self.src.read():
            for unit in doc:
                s = _score(unit)
                n_val += s < self.vf
                lo, hi = min(lo, (s, n)), max(hi, (s, n))
                n += 1
                chars += len(unit)
            if keep is not None:
                keep.append(doc)
                if chars > _KEEP_IN_MEMORY:
                    keep = None
        if n == 0:
            raise DataError(self.src.empty_message)
        if n == 1:
            raise DataError(f"{self.src.name} holds a single document, but a validation split needs at least "
                            "2; add text or files")
        self._docs, self.n_units, self.n_val, self.chars = keep, n, n_val, chars
        if n_val == 0:            # tiny corpora: hold out the unit with the lowest hash
            self.forced_val, self.n_val = lo[1], 1
        elif n_val == n:
            self.forced_train, self.n_val = hi[1], n - 1
        self.scanned = True

    def segments(self) -> Iterator[tuple[bool, str]]:
        """(is_validation, text) for runs of consecutive units of one document on the same side."""
        self.scan()
        i = 0
        for doc in (self._docs if self._docs is not None else self.src.read()):
            side, buf = None, []
            for unit in doc:
                v = (_score(unit) < self.vf or i == self.forced_val) and i != self.forced_train
                i += 1
                if buf and v != side:
                    yield bool(side), "\n\n".join(buf)
                    buf = []
                side = v
                buf.append(unit)
            if buf:
                yield bool(side), "\n\n".join(buf)


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """The texts of the training and validation segments, in corpus order (for inspection/export)."""
    split = _Split(_resolve_source(cfg), cfg.val_fraction)
    train: list[str] = []
    val: list[str] = []
    for is_val, text in split.segments():
        (val if is_val else train).append(text)
    return train, val


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_cache(cache_dir: str | os.PathLike | None) -> Path:
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "data"
    try:
        (root / "shards").mkdir(parents=True, exist_ok=True)
        (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data cache in {root} ({_short(exc)}); set HARNESS_CACHE to a "
                        "writable folder") from None
    return root


def _get_tokenizer(cfg: DataConfig, src: _Source, split: _Split, cache: Path) -> Tokenizer:
    spec = cfg.tokenizer.strip()
    if spec == "bpe":
        key = _key(FORMAT_VERSION, src.fingerprint, cfg.text_field, cfg.val_fraction, cfg.vocab_size)
        path = cache / "tokenizers" / f"bpe-{src.slug}-{cfg.vocab_size}-{key}.json"
        with _lock(path.with_suffix(".lock")):
            if path.is_file():
                try:
                    tok = Tokenizer.load(path)
                    tok.name = path.name
                    return tok
                except DataError:
                    log.warning("cached tokenizer %s is corrupt; retraining it", path)
            started = time.time()
            split.scan()
            # very large sources: train on an even sample of about _BPE_MAX_CHARS characters
            stride = max(1, math.ceil(split.chars / _BPE_MAX_CHARS))
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
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    log.info("tokenised %s: %d train / %d val tokens in %.1fs", split.src.name, stats["train"]["tokens"],
             stats["val"]["tokens"], time.time() - started)
    return meta


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike | None = None) -> TokenizedCorpus:
    """Load (tokenising and caching on first use) the corpus described by ``cfg``."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"load_corpus expects a DataConfig, got {type(cfg).__name__}")
    cache = _prepare_cache(cache_dir)
    src = _resolve_source(cfg)
    split = _Split(src, cfg.val_fraction)
    tok = _get_tokenizer(cfg, src, split, cache)
    tok_spec = f"bpe:{cfg.vocab_size}" if cfg.tokenizer.strip() == "bpe" else cfg.tokenizer.strip()
    folder = cache / "shards" / f"{src.slug}-{_key(src.identity, cfg.text_field, cfg.val_fraction, tok_spec)}"
    expect = {"format": FORMAT_VERSION, "source": src.identity, "fingerprint": src.fingerprint,
              "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "tokenizer_sha": tok.sha}
    meta = _valid_meta(folder, expect)
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(folder / ".lock"):
            meta = _valid_meta(folder, expect)   # another process may have built it meanwhile
            if meta is None:
                meta = _build_shards(folder, split, tok, expect)
    train, val = _open_shards(folder, meta)
    meta = dict(meta, cache_folder=str(folder))
    return TokenizedCorpus(train=train, val=val, tokenizer=tok, name=src.name, meta=meta)


# ========================================================================================== batches

def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: ``batch_size`` random windows of ``seq_len + 1`` tokens.

    The window starts come from a numpy Generator seeded by a hash of ``(seed, step)``, so the batch
    depends only on those two numbers (a resumed run sees exactly the same batches). Returns
    ``(inputs, targets)``, int64 tensors ``[batch_size, seq_len]``; targets are inputs shifted by one.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"the token stream has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a "
                        "smaller seq_len or more data")
    digest = hashlib.blake2b(f"batch_at:{int(seed)}:{int(step)}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    starts = rng.integers(0, n - seq_len, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def validation_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Windows ``[N, seq_len + 1]`` (int64) over the validation split in order.

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows share one
    boundary token, so every token after the first is a prediction target exactly once. Only the
    first ``max_tokens`` tokens are used when given; the tail shorter than a window is dropped
    (``N`` is 0 when there are fewer than ``seq_len + 1`` tokens).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    t = tokens if max_tokens is None else tokens[:max(0, int(max_tokens))]
    n = max(0, (len(t) - 1) // seq_len)
    if n == 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.int64)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(np.asarray(t[idx], dtype=np.int64))
