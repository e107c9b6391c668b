"""The CPU ladder where depth matters, and bits per byte against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from harness.core.config import CPU_SIZES, CPU_VOCAB_SIZE, SIZES
from harness.data import DataConfig, Tokenizer, train_bpe
from harness.evaluate import bits_per_byte
from harness.plan.ladder import lm_head_share


@pytest.mark.parametrize("size", CPU_SIZES)
def test_cpu_rungs_spend_at_most_a_third_of_the_forward_in_the_lm_head(size):
    share = lm_head_share(size)
    assert 0 < share <= 1 / 3, f"{size}: LM head is {share:.1%} of the forward"
    # Mixture-of-Recursions at R=3 runs at every CPU rung with Cycle sharing (every layer shared: L/3 layers)
    assert SIZES[size].n_layers % 3 == 0
    assert DataConfig().vocab_size == CPU_VOCAB_SIZE


def test_lm_head_share_matches_a_hand_count():
    size = SIZES["nano"]
    d, layers, ffn, vocab, seq = size.d_model, size.n_layers, size.d_ff, CPU_VOCAB_SIZE, 128
    block = 2 * (4 * d * d + 3 * d * ffn) + 4 * d * (seq + 1) / 2  # weights + causal attention, mean keys
    head = 2 * d * vocab
    assert lm_head_share("nano") == pytest.approx(head / (layers * block + head), rel=1e-9)


def test_the_old_ladder_would_have_failed_the_head_share_rule():
    # pico was d=32 with 3 layers at vocabulary 8192: the head was ~83% of the forward
    assert lm_head_share("pico", vocab_size=8192) > 1 / 3


# LUMIA-Group/PonderLM-2, llama_config/{125m,410m,1.4b}/config.json: hidden_size, num_hidden_layers,
# intermediate_size of the official models whose shape is a Pythia rung's ("125m" is Pythia-160m's shape)
PONDERLM2_CONFIGS = {"160m": (768, 12, 2064), "410m": (1024, 24, 2752), "1.4b": (2048, 24, 5504)}


@pytest.mark.parametrize("size", sorted(PONDERLM2_CONFIGS))
def test_pythia_rungs_take_the_reference_mlp_width_where_a_reference_config_exists(size):
    rung = SIZES[size]
    assert (rung.d_model, rung.n_layers, rung.d_ff) == PONDERLM2_CONFIGS[size]


def test_bits_per_byte_by_hand():
    nll = np.array([1.0, 2.0, 0.5, 3.0])  # nats
    targets = np.array([0, 1, 2, 1])
    token_bytes = np.array([3, 1, 0])  # token 2 is a special token: no text
    expected = (1.0 + 2.0 + 0.5 + 3.0) / (math.log(2) * (3 + 1 + 0 + 1))
    assert bits_per_byte(nll, targets, token_bytes) == pytest.approx(expected, rel=1e-12)


def test_token_bytes_of_a_byte_level_bpe_add_up_to_the_text():
    text = "Naïve café — ünïcödé text, with spaces.\nAnd a second line; 日本語 too."
    tok = train_bpe([text * 20], 300)
    ids = tok.encode(text)
    sizes = tok.token_bytes()
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))
    assert sizes[tok.eos_id] == 0


def test_token_bytes_of_a_word_level_tokenizer_count_each_tokens_decoding():
    vocab = {"hello": 0, "wörld": 1, "[UNK]": 2}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(hf)
    sizes = tok.token_bytes()
    assert sizes[0] == 5 and sizes[1] == len("wörld".encode()) and sizes[tok.eos_id] == 0

