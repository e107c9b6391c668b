"""The data settings of a job (``--set data.FIELD=...``) and the constants of the data layout."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from harness.core.config import CPU_VOCAB_SIZE, require
from harness.core.errors import DataError
from harness.data import synthetic

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
        for name in ("source", "val_source", "tokenizer"):  # paths may come as os.PathLike
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check = functools.partial(require, self, error=DataError)
        check("source", isinstance(self.source, str) and bool(self.source.strip()),
              "give 'embedded', a path to a .txt/.jsonl/.parquet file or directory, or 'hf:<dataset>'")
        if self.source.strip().startswith("synthetic:"):
            synthetic.parse(self.source)  # a bad synthetic source fails here, with one line
        check("val_source", isinstance(self.val_source, str),
              "give '' (hold out val_fraction of source) or a source in the same forms as DataConfig.source")
        check("text_field", isinstance(self.text_field, str) and bool(self.text_field),
              "give the name of the field/column that holds the text (default 'text')")
        check("tokenizer", isinstance(self.tokenizer, str) and bool(self.tokenizer.strip()),
              "give 'bpe', a path to a tokenizer.json or a hub tokenizer name")
        minimum = 256 + len(SPECIAL_TOKENS)
        check("vocab_size", isinstance(self.vocab_size, (int, np.integer)) and not isinstance(self.vocab_size, bool),
              f"not an integer: give an integer >= {minimum}, e.g. {CPU_VOCAB_SIZE}")
        self.vocab_size = int(self.vocab_size)
        check("vocab_size", self.vocab_size >= minimum, f"too small: a byte-level BPE needs at least {minimum} "
              f"(256 bytes + {len(SPECIAL_TOKENS)} special token); use e.g. {CPU_VOCAB_SIZE}")
        check("val_fraction", isinstance(self.val_fraction, (int, float, np.floating))
              and not isinstance(self.val_fraction, bool), "not a number: give a fraction in (0, 0.5], e.g. 0.02")
        self.val_fraction = float(self.val_fraction)
        check("val_fraction", 0.0 < self.val_fraction <= 0.5 and math.isfinite(self.val_fraction),
              "out of range: it must be in (0, 0.5], e.g. 0.02")


