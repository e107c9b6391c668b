"""harness.data: embedded corpus, user data, tokenizer, shard cache, errors, batches."""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.config import CPU_VOCAB_SIZE
from harness.core.errors import DataError
from harness.data import (
    DataConfig,
    TokenizedCorpus,
    Tokenizer,
    batch_at,
    load_corpus,
    load_documents,
    validation_windows,
)

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there one all we their has been if more when will would who "
         "so no king queen lord river city light night water stone house garden summer winter music "
         "number table window letter mountain island morning evening question answer reason season "
         "people country history language science machine ancient modern gentle bright quiet").split()


def _para(rng: random.Random, n_words: int = 60) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def _text(seed: int, n_paras: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(_para(rng) for _ in range(n_paras)) + "\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(folder))
    return folder


def _shard_folder(corpus: TokenizedCorpus) -> Path:
    return Path(corpus.meta["cache_folder"])


# ------------------------------------------------------------------------------- embedded corpus

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedded_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE", str(folder))
        started = time.time()
        corpus = load_corpus(DataConfig())
        first = time.time() - started
        yield corpus, folder, first


def test_embedded_corpus_loads(embedded):
    corpus, _, _ = embedded
    assert corpus.name.startswith("embedded")
    assert corpus.tokenizer.vocab_size == DataConfig().vocab_size == CPU_VOCAB_SIZE
    assert corpus.train.dtype == np.uint16 and corpus.val.dtype == np.uint16
    assert corpus.train.ndim == 1 and len(corpus.train) > 2_000_000
    assert len(corpus.val) > 20_000
    assert int(corpus.train.max()) < corpus.tokenizer.vocab_size
    eos = corpus.tokenizer.eos_id
    assert corpus.train[-1] == eos and corpus.val[-1] == eos
    ppl = corpus.unigram_perplexity()
    assert math.isfinite(ppl) and 1.0 < ppl < corpus.tokenizer.vocab_size


def test_tokenizer_round_trips(embedded):
    tok = embedded[0].tokenizer
    for text in ["To be, or not to be: that is the question.\n\n  Indented\tline",
                 "Naïve café — “quotes” 😀 中文 ١٢٣", "", "  ", "<|endoftext|> inside"]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, dtype=np.int64)) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_embedded_split_is_disjoint_by_document(embedded):
    corpus, _, _ = embedded
    train_docs, val_docs = load_documents(DataConfig())
    assert len(val_docs) >= 20
    assert sum(map(len, train_docs)) > 20 * sum(map(len, val_docs))
    train_text = "\n".join(train_docs)
    train_paras = {p for doc in train_docs for p in doc.split("\n\n")}
    for doc in val_docs:
        assert doc not in train_text
        for para in doc.split("\n\n"):          # not even a long paragraph of it
            assert len(para) < 200 or para not in train_paras
    # the shards are exactly the tokenised segments, each followed by the end-of-document token
    tok = corpus.tokenizer
    expected_val = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(val_docs)])
    assert np.array_equal(np.asarray(corpus.val), expected_val)
    head = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(train_docs[:5])])
    assert np.array_equal(np.asarray(corpus.train[:len(head)]), head)


def test_embedded_second_load_uses_cache(embedded):
    corpus, folder, _ = embedded
    shards = _shard_folder(corpus)
    assert shards.is_relative_to(folder)
    before = {f.name: f.stat().st_mtime_ns for f in shards.iterdir() if f.suffix in (".bin", ".json")}
    tok_files = sorted((folder / "data" / "tokenizers").glob("*.json"))
    assert len(tok_files) == 1
    tok_mtime = tok_files[0].stat().st_mtime_ns
    started = time.time()
    again = load_corpus(DataConfig(), cache_dir=folder)
    assert time.time() - started < 5.0
    assert isinstance(again.train, np.memmap)
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    assert again.tokenizer.sha == corpus.tokenizer.sha
    after = {f.name: f.stat().st_mtime_ns for f in shards.iterdir() if f.suffix in (".bin", ".json")}
    assert after == before and set(before) == {"train.bin", "val.bin", "meta.json"}
    assert tok_files[0].stat().st_mtime_ns == tok_mtime


# ------------------------------------------------------------------------------------- user data

def _expected_tokens(corpus: TokenizedCorpus, texts: list[str]) -> int:
    return sum(len(ids) + 1 for ids in corpus.tokenizer.encode_batch(texts))


def test_txt_file_loads(cache, tmp_path):
    path = tmp_path / "book.txt"
    text = _text(1, 120)                   # ~45 KB: cut into chunks of paragraphs
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(source=str(path), vocab_size=512))
    assert corpus.name == "file:book.txt"
    assert corpus.tokenizer.vocab_size <= 512
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    assert corpus.meta["split"]["units"] > 5 and corpus.meta["split"]["val_units"] >= 1
    assert _shard_folder(corpus).is_relative_to(cache)
    train_docs, val_docs = load_documents(DataConfig(source=str(path)))
    assert corpus.tokenizer.decode(corpus.val).replace("<|endoftext|>", "") == "".join(val_docs)
    for doc in val_docs:
        assert doc in text and doc not in "\n".join(train_docs)
    ppl = corpus.unigram_perplexity()
    assert math.isfinite(ppl) and ppl > 1


def test_jsonl_file_loads(cache, tmp_path):
    path = tmp_path / "docs.jsonl"
    rng = random.Random(2)
    texts = [_para(rng, rng.randint(5, 80)) for _ in range(80)]
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
        f.write("\n")                                  # blank lines are skipped
    corpus = load_corpus(DataConfig(source=str(path), vocab_size=512, val_fraction=0.1))
    assert corpus.meta["split"]["units"] == 80
    assert len(corpus.train) + len(corpus.val) == _expected_tokens(corpus, texts)
    assert (corpus.val == corpus.tokenizer.eos_id).sum() == corpus.meta["split"]["val_units"]


def test_parquet_file_loads_with_text_field(cache, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    texts = [_para(rng, 40) for _ in range(60)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(60))}), path, row_group_size=16)
    corpus = load_corpus(DataConfig(source=str(path), text_field="body", vocab_size=600))
    assert corpus.meta["split"]["units"] == 60
    assert len(corpus.train) + len(corpus.val) == _expected_tokens(corpus, texts)


def test_directory_of_files_loads(cache, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(_text(4, 3), encoding="utf-8")           # small: one document
    (root / "sub" / "b.txt").write_text(_text(5, 4), encoding="utf-8")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": _text(6 + i, 1)}) + "\n" for i in range(5)),
                                  encoding="utf-8")
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": _text(20, 2)}) + "\n")
    pq.write_table(pa.table({"text": [_text(30 + i, 1) for i in range(4)]}), root / "e.parquet")
    (root / "README.md").write_text("not data", encoding="utf-8")          # other extensions: ignored
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")          # hidden files: ignored
    corpus = load_corpus(DataConfig(source=str(root), vocab_size=512))
    assert corpus.name == "dir:corpus"
    assert corpus.meta["split"]["units"] == 1 + 1 + 5 + 1 + 4
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    text = corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]))
    assert "hidden" not in text and "not data" not in text


def test_tokenizer_path_and_save_load(cache, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(_text(7, 60), encoding="utf-8")
    bpe = load_corpus(DataConfig(source=str(path), vocab_size=400))
    saved = bpe.tokenizer.save(tmp_path / "tok")                 # a directory -> tok/tokenizer.json
    assert saved == tmp_path / "tok" / "tokenizer.json"
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.sha == bpe.tokenizer.sha and loaded.eos_id == bpe.tokenizer.eos_id
    again = load_corpus(DataConfig(source=str(path), tokenizer=str(saved)))
    assert np.array_equal(again.train, bpe.train) and np.array_equal(again.val, bpe.val)
    assert _shard_folder(again) != _shard_folder(bpe)


def test_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    raw = RawTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(raw)
    assert tok.eos_id == 3 and tok.vocab_size == 4 and tok.encode("hello world") == [1, 2]


def test_stale_or_corrupt_cache_is_rebuilt(cache, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(_text(8, 60), encoding="utf-8")
    cfg = DataConfig(source=str(path), vocab_size=400)
    first = load_corpus(cfg)
    train, val = np.array(first.train), np.array(first.val)
    folder = _shard_folder(first)
    del first
    # truncated shard -> rebuilt, same tokens
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(10)
    again = load_corpus(cfg)
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    # garbage meta -> rebuilt
    (folder / "meta.json").write_text("{oops", encoding="utf-8")
    assert np.array_equal(load_corpus(cfg).train, train)
    # corrupt cached BPE -> retrained silently, same tokenizer (training is deterministic)
    for f in (cache / "data" / "tokenizers").glob("*.json"):
        f.write_text("garbage", encoding="utf-8")
    assert np.array_equal(load_corpus(cfg).train, train)
    # changed source (fingerprint mismatch) -> rebuilt with the new text, no error
    path.write_text(_text(9, 70), encoding="utf-8")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_corpus(cfg)
    assert _shard_folder(changed) == folder
    assert len(changed.train) + len(changed.val) != len(train) + len(val)
    assert json.loads((folder / "meta.json").read_text())["fingerprint"] == changed.meta["fingerprint"]


def test_hf_source_reads_rows(cache, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rng = random.Random(10)
    texts = [_para(rng, 30) for _ in range(40)]
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"content": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus(DataConfig(source="hf:someone/corpus:en", text_field="content", vocab_size=400))
    assert calls[0] == ("someone/corpus", "en", "train")
    assert corpus.name == "hf:someone/corpus:en"
    assert len(corpus.train) + len(corpus.val) == _expected_tokens(corpus, texts)


# ---------------------------------------------------------------------------------------- errors

def _error(cfg_kwargs: dict, tmp_path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(**cfg_kwargs), cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_path(tmp_path):
    msg = _error({"source": str(tmp_path / "nope.txt")}, tmp_path)
    assert "not found" in msg and "nope.txt" in msg


def test_error_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    msg = _error({"source": str(tmp_path / "empty.txt")}, tmp_path)
    assert "empty.txt" in msg and "no text" in msg and "empty file" in msg


def test_error_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x", encoding="utf-8")
    msg = _error({"source": str(tmp_path / "d")}, tmp_path)
    assert "no .txt, .jsonl or .parquet files" in msg
    (tmp_path / "d" / "a.txt").write_text("", encoding="utf-8")
    assert "contains no text" in _error({"source": str(tmp_path / "d")}, tmp_path)


def test_error_single_document(tmp_path):
    (tmp_path / "one.txt").write_text("Just one short document.", encoding="utf-8")
    assert "single document" in _error({"source": str(tmp_path / "one.txt")}, tmp_path)


def test_error_non_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"Hello world\n\ncaf\xe9 au lait\n")
    msg = _error({"source": str(tmp_path / "latin.txt")}, tmp_path)
    assert "latin.txt" in msg and "UTF-8" in msg and "byte offset 16" in msg
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    msg = _error({"source": str(tmp_path / "bad.jsonl")}, tmp_path)
    assert "bad.jsonl" in msg and "byte offset 30" in msg and "line 2" in msg


def test_error_bad_extension(tmp_path):
    (tmp_path / "table.csv").write_text("text\nhello\n", encoding="utf-8")
    msg = _error({"source": str(tmp_path / "table.csv")}, tmp_path)
    assert "unsupported file type '.csv'" in msg and ".jsonl" in msg


def test_error_missing_jsonl_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "some text", "id": 1}\n', encoding="utf-8")
    msg = _error({"source": str(tmp_path / "d.jsonl")}, tmp_path)
    assert "no field 'text'" in msg and "body" in msg and "text_field" in msg and "line 1" in msg
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    assert "line 2 is not valid JSON" in _error({"source": str(tmp_path / "e.jsonl")}, tmp_path)


def test_error_missing_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    msg = _error({"source": str(tmp_path / "p.parquet")}, tmp_path)
    assert "no column 'text'" in msg and "body" in msg
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    assert "not a readable parquet file" in _error({"source": str(tmp_path / "broken.parquet")}, tmp_path)


def test_error_tokenizer_files(tmp_path):
    (tmp_path / "book.txt").write_text(_text(11, 10), encoding="utf-8")
    (tmp_path / "tok.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    msg = _error({"source": str(tmp_path / "book.txt"), "tokenizer": str(tmp_path / "tok.json")}, tmp_path)
    assert "tok.json" in msg and "corrupt" in msg
    msg = _error({"source": str(tmp_path / "book.txt"), "tokenizer": str(tmp_path / "none.json")}, tmp_path)
    assert "tokenizer file not found" in msg
    with pytest.raises(DataError, match="corrupt"):
        Tokenizer.load(tmp_path / "tok.json")


def test_error_hf_unreachable(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _error({"source": "hf:no-such-user/no-such-dataset"}, tmp_path)
    assert "could not load Hugging Face dataset 'no-such-user/no-such-dataset'" in msg and "hub" in msg


def test_error_hub_tokenizer_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "book.txt").write_text(_text(12, 30), encoding="utf-8")
    msg = _error({"source": str(tmp_path / "book.txt"), "tokenizer": "no-such-org/no-such-tokenizer"}, tmp_path)
    assert "could not load tokenizer 'no-such-org/no-such-tokenizer'" in msg and "tokenizer='bpe'" in msg


@pytest.mark.parametrize("kwargs, field", [
    ({"vocab_size": 100}, "vocab_size"), ({"vocab_size": 256}, "vocab_size"), ({"vocab_size": "big"}, "vocab_size"),
    ({"val_fraction": 0.0}, "val_fraction"), ({"val_fraction": 0.9}, "val_fraction"),
    ({"val_fraction": float("nan")}, "val_fraction"), ({"source": ""}, "source"),
    ({"text_field": ""}, "text_field"), ({"tokenizer": " "}, "tokenizer"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(DataError, match=f"DataConfig.{field}"):
        DataConfig(**kwargs)


def test_config_accepts_edges_and_paths(tmp_path):
    cfg = DataConfig(source=tmp_path, vocab_size=257, val_fraction=0.5)
    assert cfg.source == str(tmp_path) and cfg.vocab_size == 257


# --------------------------------------------------------------------------------------- batches

def test_batch_at_is_deterministic_and_shifted():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = batch_at(tokens, step=5, batch_size=4, seq_len=16, seed=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)           # consecutive ids: windows are contiguous
    x2, y2 = batch_at(tokens, step=5, batch_size=4, seq_len=16, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(batch_at(tokens, 6, 4, 16, 1)[0], x)
    assert not torch.equal(batch_at(tokens, 5, 4, 16, 2)[0], x)
    # a batch depends on (seed, step) only, not on what was drawn before (resume)
    for step in range(3):
        batch_at(tokens, step, 4, 16, 1)
    assert torch.equal(batch_at(tokens, 5, 4, 16, 1)[0], x)
    # edges: the last window fits exactly
    short = np.arange(17, dtype=np.uint16)
    xs, ys = batch_at(short, 0, 3, 16, 0)
    assert torch.equal(xs[0], torch.arange(16)) and torch.equal(ys[0], torch.arange(1, 17))
    with pytest.raises(DataError, match="fewer than seq_len"):
        batch_at(short, 0, 3, 17, 0)


def test_batch_at_on_memmap(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = batch_at(mm, 3, 2, 32, 7)
    assert torch.equal(x, batch_at(np.arange(5000, dtype=np.uint16), 3, 2, 32, 7)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_cover_in_order():
    val = np.arange(1, 1001, dtype=np.uint16)
    w = validation_windows(val, seq_len=64)
    n = (len(val) - 1) // 64
    assert w.shape == (n, 65) and w.dtype == torch.int64
    assert torch.equal(w[:, :-1].reshape(-1), torch.arange(1, n * 64 + 1))   # inputs: val in order
    assert torch.equal(w[:, 1:].reshape(-1), torch.arange(2, n * 64 + 2))    # targets: each once
    assert torch.equal(w[:-1, -1], w[1:, 0])
    capped = validation_windows(val, seq_len=64, max_tokens=200)
    assert capped.shape == (3, 65) and int(capped.max()) <= 200
    assert validation_windows(val[:64], seq_len=64).shape == (0, 65)


def test_data_error_is_one_line():
    assert str(DataError("a\nb   c")) == "a b c"
    assert issubclass(DataError, Exception)
