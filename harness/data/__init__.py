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

from harness.data.batches import batch_at, validation_windows
from harness.data.cache import TokenizedCorpus, default_cache_dir, load_corpus
from harness.data.config import EOS_TOKEN, DataConfig
from harness.data.sources import load_documents
from harness.data.tokenizer import Tokenizer, train_bpe

__all__ = ["DataConfig", "EOS_TOKEN", "TokenizedCorpus", "Tokenizer", "batch_at", "default_cache_dir", "load_corpus",
           "load_documents", "train_bpe", "validation_windows"]
