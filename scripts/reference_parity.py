#!/usr/bin/env python
"""Loss parity with the official reference code (PonderLM-2; Mixture-of-Recursions): identical weights and
inputs, |delta loss| per method.

What it does
    Builds each method here at its defaults (``registry.get(method).make_config``, overridden only by a
    tiny shape, plus ``loops=3`` for ``looped`` as the reference scripts and the study use), copies its
    weights into the matching Llama class of the LUMIA-Group/PonderLM-2 repository, feeds both the same
    token ids, and prints both training losses (eval mode: no dropout, PonderLM-2's J fixed at 3), their
    difference, and pass/fail against the tolerance. For ``ponderlm2`` it also compares the exact
    (sequential, KV-cached) decoding loss. Exit status 1 if any method fails.

    method     reference file (src/llamafactory/model/modeling/)  flags (scripts/train_*_llama_1_4b.sh)
    vanilla    none: stock transformers LlamaForCausalLM          (patch_method vanilla)
    ponderlm2  modeling_llama.py                                  scale_embeds, interpolation off, K=1, J=3
    pondering  modeling_llama_orin.py (--patch_method ponderlm)   scale_embeds, interpolation on, P=3
    looped     modeling_llama_loop.py                             num_latent_thoughts = loops
    pause      modeling_llama_pause.py                            num_latent_thoughts = pause tokens

    The reference's step count (``num_latent_thoughts``; PonderLM-2's ``num_jacobi_iterations`` too) is
    the project config's, and a note says where that differs from the reference scripts' value. The
    mapping of weights is ``harness.hf``'s name map (the one the export uses); the reference model
    receives them with ``load_state_dict(strict=True)``, so no reference weight stays at its random
    init. Stored embeddings are copied as they are (the reference files scale them at lookup, as the
    project does), so a different embedding scale shows as a difference; only for vanilla, whose
    reference is a stock Llama without a scale, is the project's scale folded into the embedding
    (``harness.hf.export``'s rule). Pause's one pause token becomes row V of a (V+1)-row reference
    vocabulary (``pause_token_id`` = V), as its 50288 is an unused row of the padded one. The final and
    per-layer RMSNorm weights are perturbed away from 1 so that a mis-mapped norm cannot go unnoticed.

Design
    The reference code needs transformers 4.46.1, the project a newer one, so the two sides run in two
    processes with two interpreters: this file, run by the project's Python, first runs itself with
    ``--side ours`` (writes weights, inputs and the project's losses as safetensors and JSON into a
    temporary folder), then with ``--side reference`` under ``--reference-python`` (reads them, writes
    the reference losses), and prints the table. No pickle crosses the boundary.

Reference environment (any machine; CPU is enough)
    git clone https://github.com/LUMIA-Group/PonderLM-2 REF     # or any checkout of it
    python3 -m venv REFENV
    REFENV/bin/pip install torch transformers==4.46.1           # the modeling files import nothing else
    python scripts/reference_parity.py --reference REF --reference-python REFENV/bin/python [--methods ...]

    ``--set METHOD:FIELD=VALUE`` changes a config field here, to see what a non-default option departs
    by (e.g. ``--set pondering:ponder_reference=original``, ``--set pause:pause_token=per_slot``).

Mixture-of-Recursions (a second reference: raymin0223/mixture_of_recursions, model/ and util/ at its merge
commit 884fa5a; transformers 4.53.x, which its ``model/kv_caches/cache_utils.py`` needs, and omegaconf)
    case       released config (conf/pretrain/250720_pretrain_smollm-360m_*.yaml)    here
    mor        rec3_middle_cycle_..._mor_expert_linear_alpha_0.1_sigmoid_aux_loss_0.001   defaults (L = 8)
    mor-token  rec3_middle_cycle_..._mor_token_softmax_bal_loss_coeff_0.1_linear_zloss_1e-5  routing=token
    mor-kv     kv-share_rec3_middle_cycle_..._mor_expert_..._aux_loss_0.001             kv_sharing=true
    mor-cycle  the expert config with recursive.sharing = cycle (L = 6)   unshared_first = unshared_last = 0

    The reference model is built as its ``pretrain.py`` does: ``MoRLlamaForCausalLM``, then
    ``sharing_strategy`` (ties the recursion copies), ``set_kv_sharing_config`` (mor-kv), then
    ``transform_layer_to_mor_expert``/``_token`` (expert-choice: a fresh attention per recursion). Every one
    of its parameters then receives the weights here (walked by structure; a parameter left unassigned
    stops the script, except mor-kv's key/value projections of recursions >= 2, which the reference holds
    but never uses). It runs in training mode (its auxiliary losses exist only there) with
    ``num_items_in_batch`` = B T (its trainer's count for one micro-batch, so their factor is 1); the
    compared loss is the mean LM loss (from its logits) + the released coeff x its auxiliary loss (+ z_coeff
    x its z-loss where z_loss is on), as ``util/trainer_pt.py`` forms it. Unique parameter counts are
    compared too (``model.parameters()`` counts a tied tensor once).

    python3 -m venv MORENV; MORENV/bin/pip install torch "transformers==4.53.*" omegaconf safetensors
    git clone https://github.com/raymin0223/mixture_of_recursions MOR
    python scripts/reference_parity.py --mor-reference MOR --mor-reference-python MORENV/bin/python \
        --methods mor mor-token mor-kv mor-cycle

Tolerance
    1e-5 on the mean cross-entropy (about 5.5 nats at vocab 256). Both sides compute in float32; the
    same function evaluated with a different order of operations (fused vs. separate matmuls, SDPA vs.
    eager attention, four passes for PonderLM-1) differs by float32 rounding, ~1e-7 relative, i.e. a
    few 1e-7 nats. Every departure the review of issue 17 found is 1e-3 or more. 1e-5 separates the
    two by two orders of magnitude each way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 1e-5
# Tiny shape: 3 layers so the output-projection init and per-layer mapping are exercised; fp32 throughout.
SHAPE = {"vocab_size": 256, "d_model": 64, "n_layers": 3, "n_heads": 4, "d_ff": 176}
BATCH, SEQ, SEED = 2, 32, 1234
MAX_POSITIONS = 2048  # the reference loader's max_position_embeddings
MODELING_DIR = ("src", "llamafactory", "model", "modeling")
MOR_CONF = "conf/pretrain/250720_pretrain_smollm-360m_{}.yaml"
MOR_EXPERT = "rec3_middle_cycle_random_lr3e-3_mor_expert_linear_alpha_0.1_sigmoid_aux_loss_0.001"


@dataclass(frozen=True)
class MoRCase:
    """One Mixture-of-Recursions comparison: the project's config and the reference's released config."""

    overrides: dict[str, Any]  # the project's config, beyond SHAPE
    conf: str  # the released config's name, between MOR_CONF's prefix and ".yaml"
    sharing: str = "middle_cycle"  # the reference's recursive.sharing
    # Rows of the inputs used. The reference's token-choice under eager attention gathers its 4-D mask for
    # one row only (token_choice_router.py, select_tokens_and_batch_with_padding: B > 1 fails; its sdpa
    # path would drop causality); the authors trained with FlashAttention-2, which takes no such mask.
    batch: int = BATCH


MOR_CASES: dict[str, MoRCase] = {
    "mor": MoRCase({"n_layers": 8}, MOR_EXPERT),
    "mor-token": MoRCase({"n_layers": 8, "routing": "token"},
                         "rec3_middle_cycle_random_lr3e-3_mor_token_softmax_bal_loss_coeff_0.1_linear_zloss_1e-5",
                         batch=1),
    "mor-kv": MoRCase({"n_layers": 8, "kv_sharing": True}, "kv-share_" + MOR_EXPERT),
    "mor-cycle": MoRCase({"n_layers": 6, "unshared_first": 0, "unshared_last": 0}, MOR_EXPERT, "cycle"),
}


@dataclass(frozen=True)
class Spec:
    """How one method here maps onto the reference code (flags from its scripts/train_*_llama_1_4b.sh)."""

    modeling_file: str | None  # None: transformers' own LlamaForCausalLM (patch_method vanilla)
    embed_scale_c: float | None  # reference embedding scale sqrt(c d); None: no scale (stock Llama)
    # reference config flag -> (the project's config field that sets it, the reference script's value)
    linked: dict[str, tuple[str, int]] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)  # fixed reference flags
    overrides: dict[str, Any] = field(default_factory=dict)  # the project's config, beyond SHAPE
    decode: bool = False  # also compare exact (sequential, cached) decoding


SPECS: dict[str, Spec] = {
    "vanilla": Spec(None, None),
    "ponderlm2": Spec("modeling_llama.py", 2.5, decode=True,
                      linked={"num_latent_thoughts": ("latent_steps", 1),
                              "num_jacobi_iterations": ("eval_jacobi_passes", 3)},
                      flags={"recurrent_model": True, "scale_embeds": True, "interpolation": False,
                             "interpolation_use_topk": False, "random_jacobi_iterations": True}),
    "pondering": Spec("modeling_llama_orin.py", 1.0, linked={"num_latent_thoughts": ("ponder_steps", 3)},
                      flags={"recurrent_model": True, "scale_embeds": True, "interpolation": True}),
    "looped": Spec("modeling_llama_loop.py", 2.5, linked={"num_latent_thoughts": ("loops", 3)},
                   overrides={"loops": 3},
                   flags={"recurrent_model": True, "scale_embeds": True, "interpolation": False}),
    # pause_token_id: row V of the reference's V+1 rows (see _reference_tensors), set in _our_side
    "pause": Spec("modeling_llama_pause.py", 1.0, linked={"num_latent_thoughts": ("pause_tokens", 3)},
                  flags={"recurrent_model": True, "scale_embeds": True, "interpolation": False}),
}


# ============================================================================================ ours


def _perturb_norms(model) -> None:
    """Norm weights away from their init of 1, so that a wrong norm mapping changes the loss."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _reference_tensors(model, spec: Spec, notes: list[str]) -> dict[str, Any]:
    """The model's weights under the reference's names (harness.hf's map), ready for strict loading."""
    import torch

    from harness.hf import hf_name

    cfg = model.decoder.cfg
    tensors: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        value = value.detach().float().clone()
        if not key.startswith("decoder."):
            extra[key] = value
            continue
        inner = key[len("decoder."):]
        if inner == "embed_tokens.weight" and spec.embed_scale_c is None and cfg.embed_scale != 1.0:
            value = (value.double() * cfg.embed_scale).float()  # harness.hf.export's fold
        tensors[hf_name(inner)] = value.contiguous()
    if "pause_embeddings" in extra:
        # The reference's pause token is vocabulary row V (pause_token_id): its embedding row is the
        # pause vector here, its LM-head row this method's pause_head (baselines/pause.py).
        vectors, head = extra.pop("pause_embeddings"), extra.pop("pause_head", None)
        if not bool((vectors == vectors[:1]).all()):
            notes.append(f"{len(vectors)} distinct pause vectors here, one pause token in the reference "
                         "(vector 0 used)")
        if head is None:
            notes.append("no pause LM-head row here; the reference's pause row is in its softmax (set to 0)")
            head = torch.zeros_like(vectors[:1])
        for name, row in (("model.embed_tokens.weight", vectors[:1]), ("lm_head.weight", head)):
            tensors[name] = torch.cat([tensors[name], row]).contiguous()
    if extra:
        notes.append(f"parameters without a place in the reference: {', '.join(sorted(extra))}")
    return tensors


def _notes(spec: Spec, cfg, default) -> list[str]:
    linked = {name for name, _ in spec.linked.values()}  # noted against the reference scripts below
    notes = [f"{name}={getattr(cfg, name)!r} (default {getattr(default, name)!r})"
             for name in sorted(set(cfg.to_dict()) - set(SHAPE) - linked)
             if getattr(cfg, name) != getattr(default, name)]
    if spec.embed_scale_c is None and cfg.embed_scale != 1.0:
        notes.append(f"stock Llama has no embedding scale: {cfg.embed_scale:.4f} folded in (harness.hf.export)")
    elif spec.embed_scale_c is not None:
        want = math.sqrt(spec.embed_scale_c * cfg.d_model)
        if not math.isclose(cfg.embed_scale, want, rel_tol=1e-12):
            notes.append(f"embedding scale here {cfg.embed_scale:.4f}, reference sqrt({spec.embed_scale_c:g} d) "
                         f"= {want:.4f}")
    notes += [f"{name}={getattr(cfg, name)} here, the reference scripts' {flag} is {script}"
              for flag, (name, script) in spec.linked.items() if getattr(cfg, name) != script]
    return notes


def _mor_our_side(workdir: pathlib.Path, case_name: str, ids, targets, sets: dict[str, str]) -> None:
    """The project's MoR on the inputs: its losses, its weights under its own names (the reference side maps
    them by structure) and the layout the reference needs."""
    import torch
    from safetensors.torch import save_file

    from harness.core import registry
    from harness.hf import SHAPE_FIELDS

    case = MOR_CASES[case_name]
    plugin = registry.get("mor")
    torch.manual_seed(SEED)
    cfg = plugin.make_config(None, {**SHAPE, **case.overrides, **sets})
    model = plugin.build(cfg).float().eval()
    _perturb_norms(model)
    with torch.no_grad():
        out = model(ids[:case.batch], targets[:case.batch])
    weights = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.ponder_init and cfg.embed_scale != 1.0:  # the reference embeds without a scale: fold it in
        weights["decoder.embed_tokens.weight"] = (weights["decoder.embed_tokens.weight"].double()
                                                  * cfg.embed_scale).float()
    out_dir = workdir / case_name
    out_dir.mkdir()
    save_file(weights, str(out_dir / "weights.safetensors"))
    layout = {"unshared_first": cfg.unshared_first, "unshared_last": cfg.unshared_last, "n_shared": cfg.n_shared,
              "recursions": cfg.recursions, "routing": cfg.routing, "per_recursion": len(model.attentions) > 0,
              "kv_sharing": cfg.kv_sharing, "last": len(model.decoder.layers) - 1}
    linked = {"recursions": cfg.recursions, "expert_alpha": cfg.expert_alpha, "z_weight": cfg.z_weight,
              "router_aux_weight": cfg.router_aux_weight, "balance_weight": cfg.balance_weight,
              "capacity": list(cfg.capacity_schedule)}
    config = {key: getattr(cfg, name) for name, key in SHAPE_FIELDS.items()}
    (out_dir / "ours.json").write_text(json.dumps({
        "config": config, "layout": layout, "linked": linked, "conf": case.conf, "sharing": case.sharing,
        "batch": case.batch,
        "loss": float(out.loss), "lm_loss": float(out.lm_loss), "params": model.num_params(), "decode_loss": None,
        "notes": [f"{k}={v}" for k, v in sorted({**case.overrides, **sets}.items())]
        + ([f"batch {case.batch}"] if case.batch != BATCH else [])}, indent=1))


def _our_side(workdir: pathlib.Path, methods: list[str], sets: dict[str, dict[str, str]]) -> None:
    import torch
    from safetensors.torch import save_file

    from harness.core import registry
    from harness.hf import SHAPE_FIELDS
    from models.base import IGNORE_INDEX

    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=gen)
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), IGNORE_INDEX)], dim=1)  # = HF's shifted labels
    save_file({"input_ids": ids.contiguous()}, str(workdir / "inputs.safetensors"))
    for method in methods:
        if method in MOR_CASES:
            _mor_our_side(workdir, method, ids, targets, sets.get(method, {}))
            continue
        spec = SPECS[method]
        plugin = registry.get(method)
        torch.manual_seed(SEED)
        cfg = plugin.make_config(None, {**SHAPE, **spec.overrides, **sets.get(method, {})})
        default = plugin.make_config(None, SHAPE)
        model = plugin.build(cfg).float().eval()
        _perturb_norms(model)
        notes = _notes(spec, cfg, default)
        with torch.no_grad():
            loss = float(model(ids, targets).loss)
            decode = None
            if spec.decode:
                decode = float(-model.score(ids[:, :-1], ids[:, 1:]).logprobs.mean())
        out = workdir / method
        out.mkdir()
        tensors = _reference_tensors(model, spec, notes)
        save_file(tensors, str(out / "weights.safetensors"))
        config = {key: getattr(cfg, name) for name, key in SHAPE_FIELDS.items()}
        # pause: the reference's vocabulary is V+1 rows, the last the pause token (an unused input id)
        config["vocab_size"] = len(tensors["lm_head.weight"])
        flags = {**spec.flags, **{flag: getattr(cfg, name) for flag, (name, _) in spec.linked.items()},
                 "pause_token_id": cfg.vocab_size}
        (out / "ours.json").write_text(json.dumps({"config": config, "flags": flags, "loss": loss,
                                                   "decode_loss": decode, "notes": notes}, indent=1))


# ====================================================================================== reference


def _reference_class(reference: pathlib.Path, spec: Spec):
    if spec.modeling_file is None:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    path = reference.joinpath(*MODELING_DIR, spec.modeling_file)
    if not path.exists():
        raise SystemExit(f"--reference {reference}: {path} not found; give a checkout of LUMIA-Group/PonderLM-2")
    name = "ponderlm2_reference_" + path.stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module.LlamaForCausalLM


def _reference_decode_loss(model, ids) -> float:
    """Exact decoding as the reference's cached path: one token per call, its latent stages inside."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache, logits = DynamicCache(), []
    for t in range(ids.shape[1] - 1):
        # an empty cache takes the prefill branch (one token: exact), later calls the cached stage loop
        position = torch.full((ids.shape[0], 1), t, dtype=torch.long)
        out = model(input_ids=ids[:, t:t + 1], position_ids=position, past_key_values=cache, use_cache=True,
                    return_dict=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    stacked = torch.stack(logits, dim=1).float()
    return float(torch.nn.functional.cross_entropy(stacked.flatten(0, 1), ids[:, 1:].flatten()))


def reference_model(reference: pathlib.Path, spec: Spec, setup: dict[str, Any], attn: str, weights: pathlib.Path):
    """The reference Llama class of ``spec`` built from ``setup`` ({"config", "flags"}), seeded, with the
    weights of ``weights`` loaded strictly (no reference weight left at its random init)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    config = LlamaConfig(**setup["config"], max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation=attn, torch_dtype="float32")
    for key, value in {**setup["flags"], "output_hidden_states": False, "classifier_dropout": 0}.items():
        setattr(config, key, value)  # as the reference loader.load_model sets them
    torch.manual_seed(SEED)
    model = _reference_class(reference, spec)(config).float()
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model


def _mor_cfg(reference: pathlib.Path, ours: dict[str, Any]):
    """The released config ``ours["conf"]`` as the reference's ``util/config.py`` completes it, in float32."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(reference / MOR_CONF.format(ours["conf"]))
    with open_dict(cfg):
        cfg.precision = "fp32"
        cfg.gradient_accumulation_steps = 1
        cfg.recursive.sharing = ours["sharing"]
        r = cfg.recursive.num_recursion
        if cfg.mor.capacity is None:  # util/config.py: (R - i) / R
            cfg.mor.capacity = ",".join(str((r - i) / r) for i in range(r))
        if cfg.kv_sharing.enable:
            cfg.kv_sharing.num_recursion, cfg.kv_sharing.sharing = r, cfg.recursive.sharing
    return cfg


def _mor_notes(cfg, ours: dict[str, Any]) -> list[str]:
    """Where the project's config differs from the released one it is compared with."""
    linked, mor = ours["linked"], cfg.mor
    pairs = [("recursions", cfg.recursive.num_recursion), ("capacity", [float(c) for c in mor.capacity.split(",")])]
    if mor.type == "expert":
        pairs += [("expert_alpha", mor.expert.alpha), ("router_aux_weight", mor.expert.coeff)]
    else:
        pairs += [("balance_weight", mor.token.coeff)]
    pairs += [("z_weight", mor.z_coeff if mor.z_loss else 0.0)]
    return [f"{name}={linked[name]} here, released {value}" for name, value in pairs
            if not (linked[name] == value or (isinstance(value, float) and math.isclose(linked[name], value)))]


def _mor_reference_model(reference: pathlib.Path, ours: dict[str, Any], weights: pathlib.Path, notes: list[str]):
    """The authors' MoR built as their pretrain.py does, with every parameter set from the project's weights."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    from model.mor_model.modeling_llama import MoRLlamaForCausalLM
    from model.sharing_strategy.llama import sharing_strategy

    cfg = _mor_cfg(reference, ours)
    notes += _mor_notes(cfg, ours)
    config = LlamaConfig(**ours["config"], max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="eager", torch_dtype="float32")
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # sharing_strategy's "random" initialisation picks layers with numpy
    model = MoRLlamaForCausalLM(config).float()
    model, _ = sharing_strategy(cfg, model)
    if cfg.kv_sharing.enable:
        model.set_kv_sharing_config(cfg)
    getattr(model, f"transform_layer_to_mor_{cfg.mor.type}")(cfg)
    model = model.float()
    unused = _mor_load(model, load_file(str(weights)), ours["layout"], notes)
    if unused:
        notes.append(f"reference parameters {sum(p.numel() for p in model.parameters()):,}, {unused:,} of them unused")
    return model, cfg, unused


def _mor_block_pairs(ref, ours_layer: int, attention: str) -> Iterator[tuple[Any, str]]:
    """(reference parameter, project weight name) of one reference decoder layer."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield getattr(ref.self_attn, name).weight, f"{attention}.{name}.weight"
    for name in ("gate_proj", "up_proj", "down_proj"):
        yield getattr(ref.mlp, name).weight, f"decoder.layers.{ours_layer}.mlp.{name}.weight"
    for name in ("input_layernorm", "post_attention_layernorm"):
        yield getattr(ref, name).weight, f"decoder.layers.{ours_layer}.{name}.weight"


def _mor_pairs(model, lay: dict[str, Any]) -> Iterator[tuple[Any, str]]:
    """(reference parameter, project weight name) for the whole reference MoR, walked by its structure:
    [first layer], R expert-choice MoR layers (``.block[j]``, ``.mor_router``) or one token-choice layer
    (``.block_list[r][j]``), [last layer]."""
    def attention(r: int, j: int) -> str:
        if r == 1 or not lay["per_recursion"]:
            return f"decoder.layers.{lay['unshared_first'] + j}.self_attn"
        return f"attentions.{(r - 2) * lay['n_shared'] + j}"

    layers, uf = model.model.layers, lay["unshared_first"]
    if uf:
        yield from _mor_block_pairs(layers[0], 0, "decoder.layers.0.self_attn")
    if lay["unshared_last"]:
        yield from _mor_block_pairs(layers[-1], lay["last"], f"decoder.layers.{lay['last']}.self_attn")
    if lay["routing"] == "expert":
        for r in range(1, lay["recursions"] + 1):
            yield layers[uf + r - 1].mor_router.router.weight, f"routers.{r - 1}.weight"
            for j, ref in enumerate(layers[uf + r - 1].block):
                yield from _mor_block_pairs(ref, uf + j, attention(r, j))
    else:
        yield layers[uf].mor_router.router.weight, "routers.0.weight"
        for r, blocks in enumerate(layers[uf].block_list, start=1):
            for j, ref in enumerate(blocks):
                yield from _mor_block_pairs(ref, uf + j, attention(r, j))
    yield model.model.embed_tokens.weight, "decoder.embed_tokens.weight"
    yield model.model.norm.weight, "decoder.norm.weight"
    yield model.lm_head.weight, "decoder.lm_head.weight"


def _mor_load(model, ours_w: dict[str, Any], lay: dict[str, Any], notes: list[str]) -> int:
    """Every parameter of the reference MoR ``model`` from the project's weights ``ours_w``. A weight that
    does not exist here is only allowed for KV sharing's never-used k/v projections of recursions >= 2;
    returns how many parameters those hold."""
    import torch

    done: set[int] = set()
    with torch.no_grad():
        for param, key in _mor_pairs(model, lay):
            if key in ours_w:
                param.copy_(ours_w[key])
                done.add(id(param))
    left = [name for name, p in model.named_parameters() if id(p) not in done]
    unused = [name for name in left if lay["kv_sharing"] and name.endswith(("k_proj.weight", "v_proj.weight"))]
    if set(left) - set(unused):
        raise SystemExit(f"reference parameters without a weight from here: {sorted(set(left) - set(unused))}")
    if unused:
        notes.append(f"{len(unused)} reference k/v projections of recursions >= 2 never used (KV sharing): not set")
    return sum(p.numel() for name, p in model.named_parameters() if name in unused)


def _mor_reference_losses(model, cfg, ids) -> tuple[float, float]:
    """(mean LM loss, training loss) as util/trainer_pt.py forms it, on one micro-batch."""
    import torch

    b, t = ids.shape
    model.train()  # the auxiliary losses exist only in training mode (no dropout: attention_dropout 0)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(b * t),
                    use_cache=bool(cfg.kv_sharing.enable))
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if cfg.mor.type == "expert":
        total = lm + cfg.mor.expert.coeff * out.sampling_loss
    else:
        total = lm + cfg.mor.token.coeff * out.balancing_loss
    if cfg.mor.z_loss:
        total = total + cfg.mor.z_coeff * out.router_z_loss
    return float(lm), float(total)


def _mor_reference_side(workdir: pathlib.Path, reference: pathlib.Path, cases: list[str]) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True)
    ids = load_file(str(workdir / "inputs.safetensors"))["input_ids"]
    for case in cases:
        folder = workdir / case
        ours = json.loads((folder / "ours.json").read_text())
        notes: list[str] = []
        model, cfg, unused = _mor_reference_model(reference, ours, folder / "weights.safetensors", notes)
        lm, total = _mor_reference_losses(model, cfg, ids[:ours["batch"]])
        (folder / "reference.json").write_text(json.dumps(
            {"loss": total, "lm_loss": lm, "params": sum(p.numel() for p in model.parameters()) - unused,
             "decode_loss": None,
             "notes": notes, "transformers": transformers.__version__}, indent=1))


def _reference_side(workdir: pathlib.Path, reference: pathlib.Path, methods: list[str]) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True)
    ids = load_file(str(workdir / "inputs.safetensors"))["input_ids"]
    for method in methods:
        spec, folder = SPECS[method], workdir / method
        ours = json.loads((folder / "ours.json").read_text())
        model = reference_model(reference, spec, ours, "eager", folder / "weights.safetensors").eval()
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
            decode = _reference_decode_loss(model, ids) if spec.decode else None
        (folder / "reference.json").write_text(json.dumps(
            {"loss": loss, "decode_loss": decode, "transformers": transformers.__version__}, indent=1))


# =================================================================================== orchestration


def _run(python: str, args: list[str]) -> None:
    cmd = [python, str(pathlib.Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(cmd[:2])} --side {args[1]} failed (exit {done.returncode}); its output is above")


def _rows(workdir: pathlib.Path, methods: list[str]) -> list[tuple[str, float, float, str]]:
    rows = []
    for method in methods:
        ours = json.loads((workdir / method / "ours.json").read_text())
        ref = json.loads((workdir / method / "reference.json").read_text())
        note = "; ".join(ours["notes"] + ref.get("notes", []))
        if method in MOR_CASES:
            counts = f"parameters {ours['params']:,} here, {ref['params']:,} used by the reference"
            note = counts + (f"; {note}" if note else "")
            rows.append((f"{method} (LM loss)", ours["lm_loss"], ref["lm_loss"], note))
            rows.append((f"{method} (training loss)", ours["loss"], ref["loss"], ""))
            if ours["params"] != ref["params"]:
                rows.append((f"{method} (parameter count)", float(ours["params"]), float(ref["params"]), note))
            continue
        rows.append((method, ours["loss"], ref["loss"], note))
        if ours["decode_loss"] is not None:
            rows.append((f"{method} (exact decoding)", ours["decode_loss"], ref["decode_loss"], note))
    return rows


def _table(rows: list[tuple[str, float, float, str]]) -> bool:
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'loss_ours':>12}  {'loss_reference':>14}  {'|delta|':>9}  result  note")
    ok = True
    for name, ours, ref, note in rows:
        delta = abs(ours - ref)
        passed = delta < TOLERANCE
        ok &= passed
        print(f"{name:<{width}}  {ours:12.8f}  {ref:14.8f}  {delta:9.2e}  {'pass' if passed else 'FAIL':<6}  "
              f"{note if not passed or note else ''}".rstrip())
    print(f"tolerance {TOLERANCE:g}; shape {SHAPE}, batch {BATCH}, seq {SEQ}, float32")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=pathlib.Path, help="a checkout of LUMIA-Group/PonderLM-2")
    parser.add_argument("--reference-python", help="a Python with torch and transformers==4.46.1")
    parser.add_argument("--mor-reference", type=pathlib.Path,
                        help="a checkout of raymin0223/mixture_of_recursions (for the mor cases)")
    parser.add_argument("--mor-reference-python", help="a Python with torch, transformers 4.53.x and omegaconf")
    parser.add_argument("--methods", nargs="+", choices=[*SPECS, *MOR_CASES],
                        help="default: every method whose reference is given")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:FIELD=VALUE",
                        help="change a config field here (diagnosis: e.g. pondering:ponder_reference=original)")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sets: dict[str, dict[str, str]] = {}
    for item in args.set:
        method, _, assignment = item.partition(":")
        name, eq, value = assignment.partition("=")
        if method not in {**SPECS, **MOR_CASES} or not name or not eq:
            parser.error(f"--set {item}: expected METHOD:FIELD=VALUE with METHOD one of "
                         f"{', '.join([*SPECS, *MOR_CASES])}")
        sets.setdefault(method, {})[name] = value
    if args.side == "ours":
        _our_side(args.workdir, args.methods, sets)
        return 0
    if args.side == "reference":
        plain = [m for m in args.methods if m in SPECS]
        if plain:
            _reference_side(args.workdir, args.reference, plain)
        if len(plain) < len(args.methods):
            _mor_reference_side(args.workdir, args.mor_reference, [m for m in args.methods if m in MOR_CASES])
        return 0
    if args.methods is None:
        args.methods = [*(SPECS if args.reference else []), *(MOR_CASES if args.mor_reference else [])]
        if not args.methods:
            parser.error("give --reference (PonderLM-2 methods) and/or --mor-reference (Mixture-of-Recursions)")
    plain = [m for m in args.methods if m in SPECS]
    mor = [m for m in args.methods if m in MOR_CASES]
    if plain and (args.reference is None or args.reference_python is None):
        parser.error(f"{', '.join(plain)}: --reference and --reference-python are required")
    if plain and not args.reference.joinpath(*MODELING_DIR).is_dir():
        parser.error(f"--reference {args.reference}: no {'/'.join(MODELING_DIR)}; give a checkout of "
                     "LUMIA-Group/PonderLM-2")
    if mor and (args.mor_reference is None or args.mor_reference_python is None):
        parser.error(f"{', '.join(mor)}: --mor-reference and --mor-reference-python are required")
    if mor and not args.mor_reference.joinpath("model", "mor_model").is_dir():
        parser.error(f"--mor-reference {args.mor_reference}: no model/mor_model; give a checkout of "
                     "raymin0223/mixture_of_recursions")
    with tempfile.TemporaryDirectory(prefix="reference_parity_") as tmp:
        workdir = pathlib.Path(tmp)
        _run(sys.executable, ["--side", "ours", "--workdir", str(workdir), "--methods", *args.methods,
                              *(f"--set={item}" for item in args.set)])
        if plain:
            _run(args.reference_python, ["--side", "reference", "--workdir", str(workdir),
                                         "--reference", str(args.reference.resolve()), "--methods", *plain])
        if mor:
            _run(args.mor_reference_python, ["--side", "reference", "--workdir", str(workdir), "--mor-reference",
                                             str(args.mor_reference.resolve()), "--methods", *mor])
        ok = _table(_rows(workdir, args.methods))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
