"""The tokenizer: a byte-level BPE trained on the training split, or a tokenizer.json / hub name."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.errors import DataError
from harness.core.io import write_bytes_atomic
from harness.data.config import EOS_CANDIDATES, EOS_TOKEN, SPECIAL_TOKENS, short_message

# ========================================================================================= tokenizer

class Tokenizer:
    """Thin wrapper around :class:`tokenizers.Tokenizer` with an end-of-document token."""

    def __init__(self, tk: Any, name: str = ""):
        tk.no_truncation()   # a hub tokenizer.json may enable truncation/padding; we tokenise whole docs
        tk.no_padding()
        eos = next((tk.token_to_id(t) for t in EOS_CANDIDATES if tk.token_to_id(t) is not None), None)
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
        self._token_bytes: np.ndarray | None = None

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

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for (int64 [vocab_size]); special tokens are 0.

        The denominator of bits per byte (docs/design.md, "Evaluation"). A byte-level BPE token is a
        string over GPT-2's byte-to-unicode alphabet, one character per byte, so its length is exact
        even for a token holding part of a multi-byte character (which decoding alone would turn into
        U+FFFD); any other tokenizer's token counts the bytes of its own decoding.
        """
        if self._token_bytes is None:
            alphabet = _byte_alphabet() if self._byte_level() else frozenset()
            special = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
            sizes = np.zeros(self.vocab_size, dtype=np.int64)
            for token, index in self._tk.get_vocab(with_added_tokens=True).items():
                if token in special:
                    continue
                if all(ch in alphabet for ch in token):
                    sizes[index] = len(token)
                else:
                    sizes[index] = len(self._tk.decode([index], skip_special_tokens=False).encode("utf-8"))
            self._token_bytes = sizes
        return self._token_bytes

    def _byte_level(self) -> bool:
        """Does the decoder map tokens back through GPT-2's byte alphabet (byte-level BPE)?"""
        def has(node: Any) -> bool:
            if isinstance(node, dict):
                return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
            return isinstance(node, list) and any(has(v) for v in node)
        return has(json.loads(self._tk.to_str()).get("decoder"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a directory to write it into)."""
        p = Path(path)
        if p.is_dir() or (not p.suffix and not p.exists()):
            p = p / "tokenizer.json"
        write_bytes_atomic(p, self._tk.to_str(pretty=True).encode("utf-8"))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
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
            raise DataError(f"tokenizer file {p} is corrupt or not a tokenizers JSON ({short_message(exc, 120)}); "
                            "replace it with a valid tokenizer.json or use tokenizer='bpe'") from None
        return cls(tk, name=str(p))

    @classmethod
    def from_pretrained(cls, name: str) -> Tokenizer:
        from tokenizers import Tokenizer as _Tk
        try:
            tk = _Tk.from_pretrained(name)
        except Exception as exc:
            raise DataError(f"could not load tokenizer {name!r} from the Hugging Face hub ({short_message(exc, 120)}); "
                            "check the name and that the hub is reachable (HF_HUB_OFFLINE unset), or give a "
                            f"local tokenizer.json path (if {name!r} is meant as a path, it does not exist) "
                            "or tokenizer='bpe'") from None
        return cls(tk, name=name)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


@functools.cache
def _byte_alphabet() -> frozenset[str]:
    """The 256 characters GPT-2's byte-level BPE writes bytes as (its ``bytes_to_unicode`` table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return frozenset([chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))])


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


