"""Synthetic sources with known per-token difficulty: the depth probe (docs/design.md, "Depth probe").

Source string (``DataConfig.source``)
    ``synthetic:FAMILY`` or ``synthetic:FAMILY:KEY=VALUE,KEY=VALUE,...`` with FAMILY ``phop`` or ``msum`` and
    the keys (defaults in brackets) ``hops`` H [3] (the deepest difficulty: hops for phop, terms for msum),
    ``length`` L [12] and ``alphabet`` A [8] (phop), ``modulus`` m [2] (msum), ``items`` per block [3],
    ``block`` tokens [128], ``filler`` ``text`` | ``random`` [text], ``seed`` [0], ``tokens`` of training
    stream [0 = one pass of the filler text, at most 2,000,000].

p-hop induction (Sanford, Hsu, Telgarsky 2024)
    For a sequence x_1..x_L let find(i) = 1 + the largest j < i with x_j = x_i (0 if none), hop_1(i) =
    x_{find(i)} and hop_h(i) = x_{find^h(i)}. An item is the ``L + 3`` tokens

        S  x_1 ... x_L  Q_h  a          with a = hop_h(L), h in 1..H

    where x is drawn uniformly over the alphabet with no two equal neighbours (so find(i) < i and every
    hop moves), redrawn until find^h(L) > 0 (the answer lies inside the item); S is the start marker and
    Q_h the query marker for h hops. Items cycle through h = 1..H, so every h is equally frequent.

Running modular sum (``msum``: parity at m = 2, the task of ACT, Graves 2016, and PonderNet, Banino et
    al. 2021, written out as items)
    An item is the ``h + 3`` tokens

        S  x_1 ... x_h  Q_h  a        with a = (x_1 + ... + x_h) mod m, h in 1..H

    with x drawn uniformly over the m digits (the first m alphabet tokens) and Q = Q_h, the query marker of
    phop, so that the item names its own difficulty as a p-hop item does.
    h = 1 is a copy of the token two back; each further term adds one more operand that the answer depends
    on, so a model that adds the terms one after another needs one more sequential step per term.

Tokens
    The corpus keeps the embedded corpus's byte-level BPE (``data.tokenizer = bpe``). The alphabet and
    the markers are single-byte tokens of bytes that never occur in UTF-8 text or in the corpus: the
    alphabet is bytes 0xF5..0xFF then 0xC0, 0xC1 (A <= 13), S is byte 0x02 and Q_h is byte 0x10 + h (H <= 8).

Stream
    A sequence of blocks of ``block`` tokens. Each block holds ``items`` items (of either family); the rest
    is filler, cut
    at random points between the items: consecutive tokens of the embedded corpus's own split (training
    blocks take the training split, validation blocks the validation split; ``filler = text``) or tokens
    drawn uniformly from the vocabulary without the reserved ones (``filler = random``). An item never
    crosses a block boundary, so with ``block`` equal to ``train.seq_len`` (128 by default) every
    validation item lies whole inside one validation window.

Difficulty
    ``TokenizedCorpus.val_difficulty`` (int8, aligned with ``val``) is h at each answer token a and 0 at
    every other token (filler, S, x_i, Q_h). ``harness.evaluate`` groups validation targets by it.

Seeds
    Training blocks come from a generator seeded by ``(seed, 0)`` and validation blocks from ``(seed, 1)``:
    disjoint streams, deterministic from ``seed`` (the data seed, not the job's seed: every job sees the
    same data, as the pairing of seeds requires).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from harness.core.errors import DataError

PREFIX = "synthetic:"
FAMILIES = ("phop", "msum")
ALPHABET_BYTES = tuple(range(0xF5, 0x100)) + (0xC0, 0xC1)
START_BYTE = 0x02
QUERY_BYTE = 0x10            # Q_h is byte 0x10 + h
MAX_HOPS = 8
MAX_TRAIN_TOKENS = 2_000_000
_SALT = 0x5E7D            # part of every generator's seed, so no other stream of the harness shares them


@dataclass(frozen=True)
class SyntheticSpec:
    family: str = "phop"
    hops: int = 3
    length: int = 12
    alphabet: int = 8
    modulus: int = 2
    items: int = 3
    block: int = 128
    filler: str = "text"
    seed: int = 0
    tokens: int = 0

    def item_length(self, h: int) -> int:
        """Tokens of an item of difficulty h (markers and answer included)."""
        return self.length + 3 if self.family == "phop" else h + 3

    @property
    def item_tokens(self) -> int:
        """Tokens of the longest item."""
        return self.item_length(self.hops)

    @property
    def block_item_tokens(self) -> int:
        """The most item tokens one block holds: its ``items`` consecutive items, which cycle through h."""
        return max(sum(self.item_length((start + i) % self.hops + 1) for i in range(self.items))
                   for start in range(self.hops))

    @property
    def symbols(self) -> int:
        """Alphabet tokens the family uses."""
        return self.alphabet if self.family == "phop" else self.modulus

    def label(self) -> str:
        shape = f"L={self.length},A={self.alphabet}" if self.family == "phop" else f"m={self.modulus}"
        return (f"synthetic:{self.family}(H={self.hops},{shape},items={self.items},"
                f"block={self.block},filler={self.filler},seed={self.seed})")


def is_synthetic(source: str) -> bool:
    return isinstance(source, str) and source.strip().startswith(PREFIX)


def parse(source: str) -> SyntheticSpec:
    """The spec of a ``synthetic:`` source string; a bad string raises a one-line DataError."""
    usage = ("use 'synthetic:phop' or 'synthetic:phop:hops=3,length=12,alphabet=8,items=3,block=128,"
             "filler=text|random,seed=0', or 'synthetic:msum:hops=6,modulus=2,items=6'")
    parts = source.strip()[len(PREFIX):].split(":", 1)
    family = parts[0].strip()
    if family not in FAMILIES:
        raise DataError(f"DataConfig.source={source!r}: unknown synthetic family {family!r} "
                        f"(known: {', '.join(FAMILIES)}); {usage}")
    values: dict[str, object] = {}
    fields = {f.name for f in dataclasses.fields(SyntheticSpec)}
    for pair in (parts[1].split(",") if len(parts) > 1 and parts[1].strip() else []):
        key, eq, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in fields or key == "family":
            raise DataError(f"DataConfig.source={source!r}: bad setting {pair.strip()!r}; {usage}")
        if key == "filler":
            values[key] = value
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise DataError(f"DataConfig.source={source!r}: {key}={value!r} is not an integer; {usage}") from None
    spec = SyntheticSpec(family=family, **values)  # type: ignore[arg-type]
    problems = []
    if not 1 <= spec.hops <= MAX_HOPS:
        problems.append(f"hops must be in 1..{MAX_HOPS}")
    if not 2 <= spec.alphabet <= len(ALPHABET_BYTES):
        problems.append(f"alphabet must be in 2..{len(ALPHABET_BYTES)}")
    if not 2 <= spec.modulus <= len(ALPHABET_BYTES):
        problems.append(f"modulus must be in 2..{len(ALPHABET_BYTES)}")
    if spec.family == "phop" and spec.length < spec.hops + 1:
        problems.append("length must be at least hops + 1")
    if spec.items < 1 or spec.block_item_tokens > spec.block:
        problems.append(f"the items of a block take up to {spec.block_item_tokens} tokens; at least 1 item and at "
                        f"most block = {spec.block} tokens (fewer items, or a larger block)")
    if spec.filler not in ("text", "random"):
        problems.append("filler must be 'text' or 'random'")
    if spec.seed < 0 or spec.tokens < 0:
        problems.append("seed and tokens must be >= 0")
    if problems:
        raise DataError(f"DataConfig.source={source!r}: {'; '.join(problems)}")
    return spec


# ------------------------------------------------------------------------------------------ p-hop

def find(x: list[int] | np.ndarray, i: int) -> int:
    """1 + the largest j < i with x_j = x_i, 0 if none (1-based positions, as in the definition)."""
    for j in range(i - 1, 0, -1):
        if x[j - 1] == x[i - 1]:
            return j + 1
    return 0


def hop(x: list[int] | np.ndarray, h: int) -> int | None:
    """hop_h(L) of x_1..x_L: the symbol reached after h hops from the last position, None if undefined."""
    p = len(x)
    for _ in range(h):
        p = find(x, p)
        if p == 0:
            return None
    return int(x[p - 1])


def _chain_answer(x: np.ndarray, h: int) -> int | None:
    """hop_h(L) through a last-occurrence table (the generator's own; ``hop`` is the plain definition)."""
    last: dict[int, int] = {}
    prev = [0] * len(x)           # prev[i] = find(i + 1) - 1 as a 0-based index, -1 if none
    for i, s in enumerate(x.tolist()):
        prev[i] = last[s] + 1 if s in last else -1
        last[s] = i
    p = len(x) - 1
    for _ in range(h):
        p = prev[p]
        if p < 0:
            return None
    return int(x[p])


def make_item(rng: np.random.Generator, h: int, length: int, alphabet: int) -> tuple[np.ndarray, int]:
    """Symbols x (0-based alphabet indices, no equal neighbours) and the answer hop_h(L) (an index)."""
    while True:
        first = rng.integers(0, alphabet)
        steps = rng.integers(1, alphabet, size=length - 1)   # x_i = x_{i-1} + step mod A: no repeats
        x = np.concatenate([[first], first + np.cumsum(steps)]) % alphabet
        ans = _chain_answer(x, h)
        if ans is not None:
            return x, ans


def make_sum_item(rng: np.random.Generator, h: int, modulus: int) -> tuple[np.ndarray, int]:
    """Digits x_1..x_h (0-based) and their sum mod ``modulus``."""
    x = rng.integers(0, modulus, size=h)
    return x, int(x.sum() % modulus)


def make_item_tokens(spec: SyntheticSpec, rng: np.random.Generator, h: int, alphabet_ids: np.ndarray, start_id: int,
                query_ids: np.ndarray) -> np.ndarray:
    """The tokens of one item of difficulty h; its last token is the answer."""
    if spec.family == "phop":
        x, ans = make_item(rng, h, spec.length, spec.alphabet)
        query = query_ids[h - 1]
    else:
        x, ans = make_sum_item(rng, h, spec.modulus)
        query = query_ids[h - 1]
    return np.concatenate([[start_id], alphabet_ids[x], [query, alphabet_ids[ans]]])


@dataclass
class Stream:
    tokens: np.ndarray       # token ids
    difficulty: np.ndarray   # int8, h at answer tokens, else 0


def reserved_ids(tokenizer, spec: SyntheticSpec) -> tuple[np.ndarray, int, np.ndarray]:
    """Token ids of the alphabet, of S and of Q_1..Q_H in ``tokenizer`` (a byte-level BPE)."""
    table = _bytes_to_unicode()

    def tid(b: int) -> int:
        i = tokenizer.backend.token_to_id(table[b])
        if i is None:
            raise DataError(f"{spec.label()}: the tokenizer has no single-byte token for byte 0x{b:02x}; "
                            "synthetic sources need the byte-level BPE (data.tokenizer = bpe)")
        return int(i)

    alphabet = np.array([tid(b) for b in ALPHABET_BYTES[:spec.symbols]], dtype=np.int64)
    queries = np.array([tid(QUERY_BYTE + h) for h in range(1, spec.hops + 1)], dtype=np.int64)
    return alphabet, tid(START_BYTE), queries


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def generate(spec: SyntheticSpec, part: int, n_blocks: int, filler: np.ndarray | None, vocab_size: int,
             alphabet_ids: np.ndarray, start_id: int, query_ids: np.ndarray) -> Stream:
    """``n_blocks`` blocks of the stream ``part`` (0 training, 1 validation); ``filler`` is the text to
    cut filler from (None: random tokens)."""
    rng = np.random.default_rng([_SALT, spec.seed, part])
    B, k = spec.block, spec.items
    tokens = np.empty(n_blocks * B, dtype=np.int64)
    diff = np.zeros(n_blocks * B, dtype=np.int8)
    if filler is None:
        reserved = np.zeros(vocab_size, dtype=bool)
        reserved[alphabet_ids] = reserved[query_ids] = reserved[start_id] = True
        pool = np.flatnonzero(~reserved)
    pos_filler, item_no, out = 0, 0, 0
    for _ in range(n_blocks):
        hs = [(item_no + i) % spec.hops + 1 for i in range(k)]  # items cycle through h = 1..H
        n_fill = B - sum(spec.item_length(h) for h in hs)
        cuts = np.sort(rng.integers(0, n_fill + 1, size=k))
        gaps = np.diff(np.concatenate([[0], cuts, [n_fill]]))
        for g, gap in enumerate(gaps):
            if gap:
                if filler is None:
                    tokens[out:out + gap] = pool[rng.integers(0, len(pool), size=gap)]
                else:
                    idx = (pos_filler + np.arange(gap)) % len(filler)
                    tokens[out:out + gap] = filler[idx]
                    pos_filler = (pos_filler + gap) % len(filler)
                out += gap
            if g == k:
                break
            h = hs[g]
            item_no += 1
            item = make_item_tokens(spec, rng, h, alphabet_ids, start_id, query_ids)
            tokens[out:out + len(item)] = item
            diff[out + len(item) - 1] = h
            out += len(item)
    return Stream(tokens, diff)


@dataclass
class Built:
    train: np.ndarray
    val: np.ndarray
    val_difficulty: np.ndarray
    name: str
    meta: dict


def build(source: str, train_text: np.ndarray, val_text: np.ndarray, tokenizer) -> Built:
    """The streams of a ``synthetic:`` source, filler cut from ``train_text`` / ``val_text`` (token ids of the
    embedded corpus's splits, tokenised by ``tokenizer``); ``harness.data.cache.load_corpus`` wraps them."""
    spec = parse(source)
    alphabet_ids, start_id, query_ids = reserved_ids(tokenizer, spec)
    reserved = np.concatenate([alphabet_ids, query_ids, [start_id]])
    n_fill = spec.block - spec.block_item_tokens  # the fewest filler tokens a block holds
    streams = {}
    for part, text in ((0, train_text), (1, val_text)):
        filler = np.asarray(text, dtype=np.int64) if spec.filler == "text" else None
        if filler is not None and np.isin(filler, reserved).any():
            raise DataError(f"{spec.label()}: the filler text contains reserved byte tokens; use filler=random")
        if part == 0:
            want = spec.tokens or min(MAX_TRAIN_TOKENS, len(text) * spec.block // max(1, n_fill))
        else:
            want = max(len(text) * spec.block // max(1, n_fill), 256 * spec.block)
        n_blocks = max(2, -(-want // spec.block))
        streams[part] = generate(spec, part, n_blocks, filler, tokenizer.vocab_size, alphabet_ids, start_id,
                                 query_ids)
    dtype = np.asarray(train_text[:1]).dtype
    train = streams[0].tokens.astype(dtype)
    val = streams[1].tokens.astype(dtype)
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()[:16]
    meta = {"name": spec.label(), "synthetic": dataclasses.asdict(spec), "content_sha": digest,
            "train": {"tokens": len(train)}, "val": {"tokens": len(val)},
            "answers_per_h": {str(h): int((streams[1].difficulty == h).sum()) for h in range(1, spec.hops + 1)}}
    return Built(train, val, streams[1].difficulty, spec.label(), meta)
