"""Where text comes from (the embedded corpus, files, the hub) and the document-level split."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from harness.core.errors import DataError
from harness.data.config import (
    CHUNK_CHARS,
    DOC_SEPARATOR,
    FILE_SUFFIXES,
    KEEP_IN_MEMORY,
    DataConfig,
    short_message,
)

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
        raise DataError(f"cannot read {path} ({short_message(exc)}); check the file") from None
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
        raise DataError(f"cannot read {path} ({short_message(exc)}); check the file") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({short_message(exc, 120)}); check or rewrite "
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
    for s in sorted(FILE_SUFFIXES, key=len, reverse=True):
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
                        f"{type(exc).__name__}: {short_message(exc, 160)}; check the name/config and that the hub is "
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


def _source_named(source: str, text_field: str) -> _Source:
    if source == "embedded":
        return _embedded_source()
    if source.startswith("hf:"):
        return _hf_source(source, text_field)
    return _path_source(source, text_field)


def _resolve_source(cfg: DataConfig) -> _Source:
    """The training source; with a ``val_source``, one whose identity and fingerprint cover both."""
    src = _source_named(cfg.source, cfg.text_field)
    if not cfg.val_source.strip():
        return src
    val = _source_named(cfg.val_source.strip(), cfg.text_field)
    return dataclasses.replace(src, name=f"{src.name} (validation: {val.name})", slug=f"{src.slug}+{val.slug}",
                               identity=f"{src.identity}|val:{val.identity}",
                               fingerprint=f"{src.fingerprint}|val:{val.fingerprint}")


def make_split(cfg: DataConfig, src: _Source) -> _Split:
    if cfg.val_source.strip():
        return _SeparateSplit(src, _source_named(cfg.val_source.strip(), cfg.text_field))
    return _Split(src, cfg.val_fraction)



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
                if chars > KEEP_IN_MEMORY:
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


class _SeparateSplit(_Split):
    """All of one source trains, all of another validates (``DataConfig.val_source``)."""

    def __init__(self, src: _Source, val_src: _Source):
        super().__init__(src, 0.0)
        self.val_src = val_src

    def scan(self) -> None:
        if self.scanned:
            return
        units = chars = 0
        for doc in self.src.read():
            units += len(doc)
            chars += sum(len(unit) for unit in doc)
        if units == 0:
            raise DataError(self.src.empty_message)
        self.chars = chars
        self.n_val = sum(len(doc) for doc in self.val_src.read())
        if self.n_val == 0:
            raise DataError(self.val_src.empty_message)
        self.n_units = units + self.n_val
        self.scanned = True

    def segments(self) -> Iterator[tuple[bool, str]]:
        self.scan()
        for is_val, source in ((False, self.src), (True, self.val_src)):
            for doc in source.read():
                yield is_val, "\n\n".join(doc)


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """The texts of the training and validation segments, in corpus order (for inspection/export)."""
    split = make_split(cfg, _resolve_source(cfg))
    train: list[str] = []
    val: list[str] = []
    for is_val, text in split.segments():
        (val if is_val else train).append(text)
    return train, val


