"""The data settings of a job (``--set data.FIELD=...``) and the constants of the data layout."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from harness.core.config import CPU_VOCAB_SIZE
from harness.core.errors import DataError

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
# end-of-document tokens of common tokenizers, tried in order for tokenizers loaded from elsewhere
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")
FORMAT_VERSION = 1          # bump when the chunking, the split or the shard layout changes
CHUNK_CHARS = 4096          # target size of a chunk of paragraphs (the split unit of long texts)
DOC_SEPARATOR = "\n\f\n"    # between documents inside the embedded corpus files
KEEP_IN_MEMORY = 256 << 20  # sources up to this many characters are read once, larger ones again
BPE_MAX_CHARS = 1 << 30     # BPE training text cap (an even sample of the training split beyond it)
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")


def short_message(exc: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


# ============================================================================================ config

@dataclass
class DataConfig:
    # "embedded" | .txt/.jsonl/.parquet file or directory | "hf:<name>[:<config>[:<split>]]"
    source: str = "embedded"
    text_field: str = "text"      # field name for jsonl/parquet/hf
    tokenizer: str = "bpe"        # "bpe" (trained on the training split, cached) | tokenizer.json path | hub name
    vocab_size: int = CPU_VOCAB_SIZE  # for "bpe" (the Pythia plan scale sets its own)
    val_fraction: float = 0.02    # fraction of documents held out (when there is no val_source)
    # a separate validation source (same forms as ``source``); then all of ``source`` trains and all of
    # this validates, as PonderLM-2's code does with the Pile subset and pile-val-backup
    val_source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if isinstance(self.val_source, os.PathLike):
            self.val_source = os.fspath(self.val_source)
        if not isinstance(self.val_source, str):
            raise DataError(f"DataConfig.val_source={self.val_source!r} is invalid: give '' (hold out val_fraction "
                            "of source) or a source in the same forms as DataConfig.source")
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


