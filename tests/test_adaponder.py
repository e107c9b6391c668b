"""Gated adaptive depth (baselines/adaponder.py): the ledger's split of its work and the ponder losses.

Cached decoding, causality, padding and ledger-equals-analytic for forced depths are the contract tests'
(tests/test_contract.py); KV reuse, the relaxation and config basics are in tests/test_baselines_adaptive.py.
Here: which ledger entry each matmul lands in (heads vs gates and mixtures), against hand counts, and the
bottom-K ponder loss (and the expected-iterations option) against hand-computed values.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from baselines.adaponder import AdaPonderConfig, bottom_k_mean
from harness.core import compute, registry
from harness.core.config import ConfigError
from models.base import IGNORE_INDEX

V, D, GATE_HIDDEN = 61, 32, 8
BASE = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=2, d_ff=64, gate_hidden=GATE_HIDDEN)
HEAD = 2 * D * V  # one head position, and equally one pondering mixture: a [V] x [V, d] matmul
GATE = 2 * (D * GATE_HIDDEN + GATE_HIDDEN * 1)  # Linear(d, 8) then Linear(8, 1): 528 FLOPs a token


def build(**overrides):
    return registry.build("adaponder", overrides={**BASE, **overrides})


# -- the ledger's split ----------------------------------------------------------------------------

def test_gate_and_mixture_flops_are_the_hand_counts():
    model = build()
    assert model.gate_flops() == GATE == 528
    assert model.mixture_flops() == HEAD


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_decoding_ledger_heads_are_heads_and_gates_and_mixtures_are_other(padded):
    model = build(max_iterations=3, gate_init_bias=0.0).eval()
    ids = torch.randint(0, V, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    if padded:
        valid[1, 8:] = False
    with compute.measure() as ledger, torch.no_grad():
        out = model.decode(ids, model.new_cache(2), valid=valid)
    depth = (out.steps + 1) * valid  # iterations each real token ran; 0 for padding
    assert {1, 2, 3} <= set(depth[valid].tolist())  # mixed depths, so every term below is exercised
    heads = depth.sum().item()  # a head in every iteration a token runs
    mixtures = (depth - 1).clamp_min(0).sum().item()  # one mixture feeds each iteration after the first
    gates = depth.clamp(max=2).sum().item()  # a gate after iterations 1 and 2, none after the last (N = 3)
    t = ledger.totals
    assert t.head_positions == heads
    assert t.head_flops == HEAD * heads  # exactly the heads: the mixtures are not head calls
    assert t.other_flops == HEAD * mixtures + GATE * gates
    assert t.forward_flops == t.block_flops + t.head_flops + t.other_flops
    assert t.forward_flops == model.decode_flops(out.steps, valid)


def test_training_ledger_heads_are_heads_and_gates_and_mixtures_are_other():
    model = build(max_iterations=3)
    ids = torch.randint(0, V, (2, 12))
    with compute.measure() as ledger:
        model(ids, ids)
    t, tokens = ledger.totals, 24
    assert t.head_flops == HEAD * 3 * tokens  # N = 3 heads a token
    assert t.other_flops == (HEAD + GATE) * 2 * tokens  # N-1 = 2 mixtures and 2 gates a token
    assert t.forward_flops == tokens * model.analytic_flops_per_token(12, training=True)


def test_flop_counter_mode_agrees_on_the_training_matmuls():
    """torch's own count of the weight matmuls (gates and mixtures included) equals the ledger's."""
    model = build(max_iterations=3)
    ids = torch.randint(0, V, (2, 12))
    counter = FlopCounterMode(display=False)
    with compute.measure() as ledger, counter, torch.no_grad():
        model(ids, ids)
    theirs = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    assert theirs == pytest.approx(ledger.totals.matmul_flops, rel=1e-9)


# -- the ponder losses -----------------------------------------------------------------------------

class FixedGate(nn.Module):
    """A gate whose logits z [1, T, 1] are given, whatever the hidden states."""

    def __init__(self, stay: list[float]):
        super().__init__()
        # s = sigmoid(-z) is the paper's gate value (probability to go on): z = log((1 - s) / s)
        self.z = nn.Parameter(torch.tensor([[[math.log((1 - s) / s)] for s in stay]]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.z


# gate values s of 4 tokens after iterations 1 and 2; token 4 is padding (its target is ignored)
STAY = ([0.9, 0.2, 0.6, 0.01], [0.5, 0.1, 0.3, 0.05])


def fixed_gate_model(**overrides):
    model = build(max_iterations=3, **overrides)
    for i, stay in enumerate(STAY):
        model.gates[i] = FixedGate(stay)
    ids = torch.randint(0, V, (1, 4))
    targets = ids.clone()
    targets[0, 3] = IGNORE_INDEX
    return model, ids, targets


@pytest.mark.parametrize("k,expected", [
    (0.5, (0.1 + 0.2 + 0.3) / 3),  # real values 0.9 0.2 0.6 0.5 0.1 0.3: floor(3) smallest
    (0.4, (0.1 + 0.2) / 2),  # floor(2.4) = 2
    (0.01, 0.1),  # floor(0.06) = 0, but k > 0 keeps the smallest one
    (1.0, (0.9 + 0.2 + 0.6 + 0.5 + 0.1 + 0.3) / 6),
    (0.0, 0.0),  # no ponder loss
])
def test_bottom_k_ponder_loss_is_the_mean_of_the_smallest_gate_values(k, expected):
    model, ids, targets = fixed_gate_model(compute_penalty=0.5, bottom_k=k)
    out = model(ids, targets)
    # the padding's values 0.01 and 0.05 are the smallest of all, and must not count
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.5 * expected, abs=1e-6)
    assert out.stats["compute_penalty"] == pytest.approx(0.5 * expected, abs=1e-6)


def test_bottom_k_ponder_loss_pushes_only_the_picked_gates_towards_halting():
    model, ids, targets = fixed_gate_model(compute_penalty=0.5, bottom_k=0.5)
    out = model(ids, targets)
    (out.loss - out.lm_loss).backward()  # the ponder loss alone
    # d/dz [0.5/3 sum sigmoid(-z)] = -0.5/3 s (1 - s) on the three picked values (0.2, 0.1, 0.3), 0 elsewhere
    picked = {(0, 1): 0.2, (1, 1): 0.1, (1, 2): 0.3}
    for i, gate in enumerate(model.gates):
        for token in range(4):
            s = picked.get((i, token))
            want = 0.0 if s is None else -0.5 / 3 * s * (1 - s)
            assert gate.z.grad[0, token, 0].item() == pytest.approx(want, abs=1e-7)


def test_expected_iterations_option_is_the_mean_expected_extra_iterations():
    model, ids, targets = fixed_gate_model(compute_penalty=0.5, ponder_loss="expected_iterations")
    out = model(ids, targets)
    # extra iterations of a real token: c_2 + c_3 = s_1 + s_1 s_2
    extra = [0.9 + 0.9 * 0.5, 0.2 + 0.2 * 0.1, 0.6 + 0.6 * 0.3]
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.5 * sum(extra) / 3, abs=1e-6)
    assert out.stats["mean_extra_steps"] == pytest.approx(sum(extra) / 3, abs=1e-6)


def test_bottom_k_mean_counts():
    values = torch.tensor([0.5, 0.1, 0.3, 0.9])
    assert bottom_k_mean(values, 0.5).item() == pytest.approx(0.2)
    assert bottom_k_mean(values, 0.3).item() == pytest.approx(0.1)  # floor(1.2) = 1
    assert bottom_k_mean(values, 0.7).item() == pytest.approx(0.2)  # floor(2.8) = 2
    assert bottom_k_mean(values, 0.75).item() == pytest.approx(0.3)  # 3: 0.1, 0.3 and 0.5
    assert bottom_k_mean(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]), 0.3).item() == \
        pytest.approx(0.2)  # 0.3 x 10 is 3.0000000000000004 in floating point: still 3
    assert bottom_k_mean(values, 0.0).item() == 0.0
    assert bottom_k_mean(values[:0], 0.5).item() == 0.0


def test_defaults_are_the_papers():
    cfg = AdaPonderConfig()
    assert (cfg.ponder_loss, cfg.compute_penalty, cfg.bottom_k) == ("bottom_k", 0.1, 0.1)


@pytest.mark.parametrize("overrides,field", [
    (dict(ponder_loss="kl"), "ponder_loss"),
    (dict(bottom_k=1.5), "bottom_k"),
    (dict(bottom_k=-0.1), "bottom_k"),
])
def test_bad_ponder_loss_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build(**overrides)
