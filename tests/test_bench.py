"""``python -m harness bench``: the machinery on a tiny configuration (no wall-clock assertions)."""

import dataclasses
import json
import math

import pytest
import torch

from harness.bench import (
    SECTIONS,
    BenchConfig,
    PerRound,
    benchmark,
    format_report,
    generate_cached,
    generate_recomputing,
    methods_with_role,
    op_kind,
    per_round,
    time_interleaved,
    to_transformers_llama,
)
from harness.cli import main
from harness.core import registry
from harness.core.config import SIZES, ConfigError
from harness.data import DataConfig, load_corpus

SECTION_KEYS = ("train_throughput", "decode_cache", "pruned_decode", "jacobi_training", "utilization", "targets")


def tiny_config(data: DataConfig, **changes) -> BenchConfig:
    # decode_compile off: compiling takes tens of seconds; tests/test_fast_paths.py tests the compiled step
    return BenchConfig.quick(
        sizes=("pico",), seq_len=16, batch_size=2, warmup=1, repeats=2, decode_size="pico", decode_tokens=6,
        decode_prompt=4, decode_batches=(1, 2), decode_repeats=1, decode_compile=False, prune_size="pico",
        prune_latent_steps=2, prune_kept_steps=1, prune_seq_len=8, prune_batch=2, jacobi_size="pico",
        jacobi_batch=2, jacobi_latent_steps=(2,), jacobi_repeats=1, peak_matmul_n=64, threads_method="vanilla",
        threads_size="pico", threads_batch=2, threads_seq_len=16, threads_steps=1, threads_configs=((1, 1), (2, 1)),
        data=data, **changes)


def _numbers(value):
    """Every number in a JSON value (bools excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def small_data(small_corpus):
    return DataConfig(source=small_corpus, vocab_size=512)


@pytest.fixture(scope="module")
def report(small_data):
    return json.loads(json.dumps(benchmark(tiny_config(small_data), progress=False)))


def test_every_section_has_finite_positive_numbers(report):
    for key in SECTION_KEYS:
        assert report[key], f"section {key} is empty"
    assert report["peak_matmul"]["flops_per_s"] > 0
    positive = {
        "train_throughput": ("ours_tokens_per_s", "transformers_tokens_per_s", "ratio", "train_flops_per_token"),
        "decode_cache": ("cached_seconds", "recompute_seconds", "speedup", "cached_tokens_per_s"),
        "pruned_decode": ("ponderlm2_seconds", "ponderlm3_seconds", "ponderlm2_flops", "ponderlm3_flops",
                          "flops_saving", "pruned_fraction"),
        "jacobi_training": ("step_seconds", "time_ratio", "flops_ratio", "overhead", "train_flops_per_token"),
        "utilization": ("flops_per_s", "fraction_of_peak"),
    }
    for key, fields in positive.items():
        for row in report[key]:
            for name in fields:
                assert math.isfinite(row[name]) and row[name] > 0, (key, name, row[name])
    for key in SECTION_KEYS:
        assert all(math.isfinite(x) for x in _numbers(report[key])), key
    assert [r["size"] for r in report["train_throughput"]] == ["pico"]
    assert [r["batch_size"] for r in report["decode_cache"]] == [1, 2]
    assert [r["variant"] for r in report["jacobi_training"]] == ["vanilla", "ponderlm2 K=2", "ponderlm3 K=2"]
    assert [r["latent_steps"] for r in report["jacobi_training"]] == [0, 2, 2]
    assert len(report["utilization"]) == 2 + 3
    # pico is a rung the reference study trains vanilla, PonderLM-2 and PonderLM-3 at: all but HF's judged
    assert [("target" in r) for r in report["utilization"]] == [True, False, True, True, True]
    assert {t["section"] for t in report["targets"]} == {"train_throughput", "decode_cache", "pruned_decode",
                                                          "jacobi_training", "utilization"}
    threads = report["threads"]
    assert [(r["jobs"], r["threads_per_job"]) for r in threads["rows"]] == [(1, 1), (2, 1)]
    assert all(len(r["step_seconds"]) == r["jobs"] and r["total_tokens_per_s"] > 0 for r in threads["rows"])
    assert threads["recommended_threads_per_job"] == {"1": 1, "2": 1}  # the only thread count measured
    if not torch.cuda.is_available():
        assert report["gpu"] == {"skipped": "no CUDA device"}
    for t in report["targets"]:  # decoding is judged at 512 generated tokens only
        assert t["met"] is None if t["section"] == "decode_cache" else isinstance(t["met"], bool)


def test_the_measurements_compare_like_with_like(report):
    # transformers computes the same function as our backbone, and both generators the same tokens
    assert report["train_throughput"][0]["max_logit_diff"] < 1e-4
    assert all(r["tokens_agree"] == 1.0 for r in report["decode_cache"])
    prune = report["pruned_decode"][0]
    assert [(r["method"], r["twin"]) for r in report["pruned_decode"]] == [("ponderlm3", "ponderlm2")]
    # the router bias keeps 1 of K=2 steps for every token: half the latent steps pruned, fewer FLOPs
    assert prune["ponderlm2_mean_steps"] == 2 and prune["ponderlm3_mean_steps"] == 1
    assert prune["pruned_fraction"] == pytest.approx(0.5)
    assert prune["ponderlm3_flops"] < prune["ponderlm2_flops"]
    for row in report["jacobi_training"]:  # the ledger counts what train_flops_per_token predicts
        assert row["ledger_train_flops_per_token"] == pytest.approx(row["train_flops_per_token"], rel=1e-9)
    vanilla, p2, p3 = report["jacobi_training"]
    assert vanilla["flops_ratio"] == 1.0 and 1.0 < p2["flops_ratio"] < p3["flops_ratio"]
    text = format_report(report)
    for heading in ("1. training", "2. cached", "3. ponderlm3 hard-pruned decoding vs ponderlm2", "4. Jacobi",
                    "5. achieved", "6. threads per job", "7. GPU", "targets met"):
        assert heading in text


def test_gpu_rows_run_their_machinery_on_any_device():
    """The GPU section runs only with CUDA; on the CPU (bf16 autocast there too) it still measures what it
    reports: rates, MFU against the measured peak, and each attention call counted under its SDPA kernel."""
    from harness.bench.gpu import bench_gpu

    cfg = BenchConfig.quick(gpu_sizes=("pico",), gpu_batch=1, gpu_seq_len=8, gpu_vocab_size=64, gpu_repeats=1,
                            gpu_peak_n=32, warmup=0)
    out = bench_gpu(cfg, None, lambda: None, device="cpu")
    assert out["dtype"] == "bfloat16" and out["peak_matmul"]["flops_per_s"] > 0
    vanilla, p3 = out["rows"]
    assert (vanilla["method"], p3["method"], p3["latent_steps"]) == ("vanilla", "ponderlm3", 3)
    for row in out["rows"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] == pytest.approx(
            row["train_flops_per_token"] * row["tokens_per_s"] / out["peak_matmul"]["flops_per_s"])
    layers = SIZES["pico"].n_layers
    assert vanilla["sdpa_kernels"] == {"flash_attention_for_cpu": layers}  # one call per layer of pico
    # PonderLM-3 at K=3: 3 init passes, J in {2, 3} Jacobi passes and the final pass, pico's layers each
    assert list(p3["sdpa_kernels"]) == ["flash_attention_for_cpu"]
    assert p3["sdpa_kernels"]["flash_attention_for_cpu"] in (layers * 6, layers * 7)


def test_generators_agree_token_for_token(small_data):
    corpus = load_corpus(small_data)
    model = registry.build("vanilla", "pico", {"vocab_size": corpus.vocab_size}).eval()
    prompt = torch.randint(0, corpus.vocab_size, (3, 5))
    with torch.no_grad():
        cached, recomputed = generate_cached(model, prompt, 7), generate_recomputing(model, prompt, 7)
    assert cached.shape == (3, 7) and torch.equal(cached, recomputed)
    llama = registry.build("vanilla", "pico", {"vocab_size": corpus.vocab_size, "ponder_init": False}).eval()
    hf = to_transformers_llama(llama.decoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=prompt).logits, llama.decoder(prompt), atol=1e-4, rtol=1e-4)


def test_methods_take_part_by_their_declared_roles():
    assert [p.name for p in methods_with_role("jacobi_training")] == ["ponderlm2", "ponderlm3"]
    assert [p.name for p in methods_with_role("pruned_decoding")] == ["ponderlm3"]
    model = registry.build("ponderlm3", "pico", {"vocab_size": 64, "latent_steps": 3}).eval()
    for kept in range(4):  # force_steps is what the pruned-decoding benchmark uses
        model.force_steps(kept)
        decision = model.decide(torch.randn(5, model.config.d_model))
        assert decision.steps.tolist() == [kept] * 5


def test_ratios_and_utilisation_are_formed_round_by_round(report):
    # drift between rounds cancels: a round's ratio uses that round's samples only
    slow_machine = per_round([2.0, 4.0, 3.0], [1.0, 2.0, 1.5])  # the machine halves its speed, ratio stays 2
    assert slow_machine.values == [2.0, 2.0, 2.0] and slow_machine.decided(1.9, at_most=False)
    noisy = PerRound([1.1, 1.2, 1.3])
    assert noisy.median == 1.2 and noisy.met(1.25, at_most=True) and not noisy.decided(1.25, at_most=True)
    assert noisy.as_dict("x") == {"x": 1.2, "x_low": 1.1, "x_high": 1.3, "x_rounds": [1.1, 1.2, 1.3]}
    with pytest.raises(ValueError, match="rounds"):
        per_round([1.0], [1.0, 2.0])
    # every training measurement is judged against the matmul peak timed in its own rounds
    repeats = report["config"]["jacobi_repeats"]
    jacobi = {r["variant"]: r for r in report["jacobi_training"]}
    for row in report["utilization"]:
        assert row["fraction_of_peak_low"] <= row["fraction_of_peak"] <= row["fraction_of_peak_high"]
        variant = row["what"].removesuffix(" train step")
        if variant in jacobi:
            source = jacobi[variant]
            assert row["fraction_of_peak_rounds"] == source["fraction_of_peak_rounds"]
            assert len(source["overhead_rounds"]) == repeats
            assert source["overhead"] == pytest.approx(source["time_ratio"] / source["flops_ratio"])
    # where the time goes: one profiled step per model, its time split by the kind of operator
    assert op_kind("aten::mm") == "matmul" and op_kind("aten::mul") == "other"
    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    for row in report["jacobi_training"]:
        shares = row["time_shares"]
        assert sum(shares.values()) == pytest.approx(1.0) and shares["matmul"] > 0 and shares["attention"] > 0
        assert row["utilization_ceiling"] > 0
    assert "4b. where the Jacobi section's step time goes" in format_report(report)
    for t in report["targets"]:
        if t["section"] != "decode_cache":
            assert isinstance(t["decided"], bool) and t["low"] <= t["value"] <= t["high"]


def test_utilisation_ceiling_by_hand(monkeypatch):
    import harness.bench.jacobi_training as jacobi
    from harness.core.compute import LedgerTotals

    # 3 FLOPs of matmul and 1 of attention per forward, all trained (x3); 1 s of matmuls, 2 s of attention
    ledger = LedgerTotals(forward_flops=4.0, train_flops=12.0, matmul_flops=3.0, attention_flops=1.0)
    monkeypatch.setattr(jacobi, "profile_step", lambda step: {"matmul": 1.0, "attention": 2.0, "other": 1.0})
    row = jacobi.where_the_time_goes(lambda: None, ledger)
    assert row["time_shares"] == {"matmul": 0.25, "attention": 0.5, "other": 0.25}
    assert (row["matmul_flops_per_s"], row["attention_flops_per_s"]) == (9.0, 1.5)
    assert row["attention_efficiency"] == pytest.approx(1 / 6)
    # matmuls at the peak, attention at 1/6 of it: 0.75 + 0.25 x 6 = 2.25 peak-seconds per FLOP-second
    assert row["utilization_ceiling"] == pytest.approx(1 / 2.25)


def test_compiled_twins_are_timed_beside_the_eager_steps(small_data, monkeypatch):
    # The machinery, without paying for inductor (tests/test_fast_paths.py tests the compiled blocks):
    # a twin whose compile_training_blocks says yes but stays eager must count the eager FLOPs.
    from harness.bench.jacobi_training import bench_jacobi_training
    from models.backbone import Decoder

    cfg = dataclasses.replace(tiny_config(small_data, jacobi_compiled=True), jacobi_repeats=2)
    corpus = load_corpus(small_data)
    monkeypatch.setattr(Decoder, "compile_training_blocks", lambda self, enabled=True: True)
    rows = bench_jacobi_training(cfg, corpus, tick=lambda: None)
    for row in rows:
        assert len(row["compiled_speedup_rounds"]) == 2 and row["compiled_speedup"] > 0
        assert row["compiled_fraction_of_peak"] > 0
    monkeypatch.setattr(Decoder, "compile_training_blocks", lambda self, enabled=True: False)  # no compiler
    assert all("compiled_speedup" not in row for row in bench_jacobi_training(cfg, corpus, tick=lambda: None))


def test_interleaved_timing_runs_contenders_in_turn():
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and all(len(t.samples) == 3 for t in timings.values())


def test_config_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="prune_kept_steps"):
        BenchConfig(prune_kept_steps=3, prune_latent_steps=3)
    with pytest.raises(ConfigError, match="unknown size"):
        BenchConfig(sizes=("huge",))
    assert main(["bench", "--sections", "train,warp", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "warp" in err and err.count("\n") == 1
    assert main(["bench", "--quick", "--out", str(tmp_path / "missing" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert set(SECTIONS) == {"train", "decode", "prune", "jacobi", "threads", "gpu"}
    with pytest.raises(ConfigError, match="threads_configs"):
        BenchConfig(threads_configs=((2, 0),))
    with pytest.raises(ConfigError, match="jacobi_latent_steps"):
        BenchConfig(jacobi_latent_steps=())


# -- the speed changes of models/backbone.py compute what the textbook forms compute --------------


def test_rope_by_roll_is_bit_identical_to_rotate_half():
    from models.backbone import Rotary, apply_rotary, rotate

    rotary = Rotary(16, 10000.0)
    positions = torch.tensor([[0, 3, 3, 700], [5, 1, 2, 9]])
    cos, sin_signed = rotary(positions)
    freqs = positions.float()[..., None] * rotary.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    x = torch.randn(2, 3, 4, 16)
    assert torch.equal(rotate(x, cos, sin_signed), apply_rotary(x, emb.cos(), emb.sin()))
    cos_f, sin_f = rotary(positions.float())  # fractional positions are computed, not looked up
    assert torch.equal(cos_f, cos) and torch.equal(sin_f, sin_signed)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_key_bias_channel_equals_an_additive_mask_with_gradients(n_kv_heads):
    from harness.core.config import ModelConfig
    from models.backbone import Decoder

    decoder = Decoder(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64))
    x = torch.randn(2, 9, 32)
    positions = torch.arange(9).repeat_interleave(1).expand(2, -1)
    bias = -torch.rand(2, 9) * 12
    results = []
    for explicit in (False, True):
        b = bias.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        if explicit:  # the general path: an explicit causal pattern gives a materialised mask
            allowed = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 9, 9)
            plan = decoder.plan(positions, key_bias=b, allowed=allowed)
            assert plan.mask is not None and plan.key_bias is None
        else:
            plan = decoder.plan(positions, key_bias=b)
            assert plan.mask is None and plan.key_bias is not None
        out = decoder.run_blocks(xx, plan)
        out.square().sum().backward()
        results.append((out.detach(), xx.grad, b.grad, plan.key_pairs))
    (out_a, gx_a, gb_a, pairs_a), (out_b, gx_b, gb_b, pairs_b) = results
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_a, gx_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb_a, gb_b, atol=1e-4, rtol=1e-4)
    assert pairs_a == pairs_b == 2 * 9 * 10 / 2


def test_one_query_decoding_mask_equals_the_general_mask():
    from harness.core.config import ModelConfig
    from models.backbone import Decoder

    decoder = Decoder(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    old_bias, old_valid = -torch.rand(3, 4), torch.tensor([[1, 0, 1, 1]] * 3, dtype=torch.bool)
    bias, valid = torch.tensor([[-0.5], [-1.0], [-2.0]]), torch.tensor([[True], [False], [True]])
    plans = []
    for general in (False, True):
        cache = decoder.new_cache(3)
        cache.allocate(4, key_bias=old_bias, key_valid=old_valid)
        allowed = torch.ones(3, 1, 5, dtype=torch.bool) if general else None
        plans.append(decoder.plan(torch.full((3, 1), 2), cache=cache, key_bias=bias, key_valid=valid,
                                  allowed=allowed))
    fast, slow = plans
    assert torch.equal(fast.mask, slow.mask) and fast.key_pairs == slow.key_pairs == 2 * 4
    assert fast.queries == slow.queries == 2


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_fused_head_loss_equals_logits_and_cross_entropy(chunk_rows):
    import torch.nn.functional as F

    from harness.core.config import ModelConfig
    from models.backbone import Decoder, LinearCrossEntropy

    decoder = Decoder(ModelConfig(vocab_size=70, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    h = torch.randn(2, 11, 16)
    targets = torch.randint(0, 70, (2, 11))
    targets[1, 7:] = -100  # padding is left out of the mean
    grads = []
    for fused in (False, True):
        hh = h.clone().requires_grad_(True)
        decoder.zero_grad()
        if fused:
            loss = LinearCrossEntropy.apply(hh.reshape(-1, 16), decoder.lm_head.weight, targets.reshape(-1), chunk_rows)
        else:
            loss = F.cross_entropy(decoder.lm_head(hh).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        grads.append((loss.detach(), hh.grad, decoder.lm_head.weight.grad.clone()))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation takes the plain path: the same number
        torch.testing.assert_close(decoder.head_loss(h, targets), grads[0][0], atol=1e-6, rtol=1e-5)
