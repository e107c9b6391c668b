"""3. Hard-pruned adaptive decoding against the method's fixed twin (PonderLM-3 against PonderLM-2).

Every method that declares the ``pruned_decoding`` role is measured against its ``fixed_twin`` at the
same maximum (``steps_field`` = ``prune_latent_steps``) and the same decoder weights; ``force_steps``
makes every token keep ``prune_kept_steps`` steps, so a known fraction of the steps is pruned.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from harness.bench.common import TARGET_PRUNE_EFFICIENCY, BenchConfig, PerRound, methods_with_role, time_interleaved
from harness.core import compute, registry
from harness.core.config import ConfigError
from harness.core.registry import Plugin
from harness.data import TokenizedCorpus, validation_windows
from models.base import PRUNED_DECODING


def bench_pruned_decode(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> list[dict[str, Any]]:
    windows = validation_windows(corpus.val, cfg.prune_seq_len, cfg.prune_batch * cfg.prune_seq_len + 1)
    if len(windows) < cfg.prune_batch:
        raise ConfigError(f"the validation split is too small for {cfg.prune_batch} windows of {cfg.prune_seq_len}")
    inputs, targets = windows[:cfg.prune_batch, :-1], windows[:cfg.prune_batch, 1:]
    return [_pruned_row(plugin, cfg, corpus, inputs, targets, tick) for plugin in methods_with_role(PRUNED_DECODING)]


def _pruned_row(plugin: Plugin, cfg: BenchConfig, corpus: TokenizedCorpus, inputs: torch.Tensor,
                targets: torch.Tensor, tick) -> dict[str, Any]:
    name, twin_name, steps_field = plugin.name, plugin.cls.fixed_twin, plugin.cls.steps_field
    if twin_name is None or steps_field is None:
        raise ConfigError(f"method {name!r} declares the {PRUNED_DECODING} role but no fixed_twin or steps_field")
    torch.manual_seed(0)
    K = cfg.prune_latent_steps
    common = {"vocab_size": corpus.vocab_size, steps_field: K}
    twin = registry.build(twin_name, cfg.prune_size, common).eval()
    model = plugin.build(plugin.make_config(cfg.prune_size, common)).eval()
    model.decoder.load_state_dict(twin.decoder.state_dict())
    model.force_steps(cfg.prune_kept_steps)

    def measured(m) -> tuple[float, torch.Tensor]:
        with compute.measure() as ledger:
            out = m.score(inputs, targets)
        return ledger.totals.forward_flops, out.steps

    twin_flops, twin_steps = measured(twin)
    flops, steps = measured(model)
    timings = time_interleaved({twin_name: lambda: twin.score(inputs, targets),
                                name: lambda: model.score(inputs, targets)}, cfg.warmup, cfg.repeats, tick)
    mean_steps = steps.float().mean().item()
    flops_saving = 1.0 - flops / twin_flops
    if flops_saving <= 0:
        raise ConfigError(f"{name} with prune_kept_steps={cfg.prune_kept_steps} saved no FLOPs against {twin_name}; "
                          "nothing to compare")
    # round by round: the wall saving of a round compares the two decodings of that round
    wall_savings = [1.0 - ours / theirs for ours, theirs in zip(timings[name].samples, timings[twin_name].samples)]
    efficiency = PerRound([saving / flops_saving for saving in wall_savings])
    return {
        "method": name, "twin": twin_name,
        "size": cfg.prune_size, "latent_steps": K, "kept_steps": cfg.prune_kept_steps,
        "batch_size": cfg.prune_batch, "seq_len": cfg.prune_seq_len,
        f"{twin_name}_mean_steps": twin_steps.float().mean().item(), f"{name}_mean_steps": mean_steps,
        "pruned_fraction": 1.0 - mean_steps / K,
        f"{twin_name}_seconds": timings[twin_name].median, f"{name}_seconds": timings[name].median,
        f"{twin_name}_flops": twin_flops, f"{name}_flops": flops,
        "flops_saving": flops_saving, "wall_saving": statistics.median(wall_savings),
        **efficiency.as_dict("efficiency"),
        "target": TARGET_PRUNE_EFFICIENCY, "met": efficiency.met(TARGET_PRUNE_EFFICIENCY, at_most=False),
        "decided": efficiency.decided(TARGET_PRUNE_EFFICIENCY, at_most=False),
    }


__all__ = ["bench_pruned_decode"]
