#!/usr/bin/env python
"""Loss parity with the official PonderLM-2 code: identical weights and inputs, |delta loss| per method.

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
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 1e-5
# Tiny shape: 3 layers so the output-projection init and per-layer mapping are exercised; fp32 throughout.
SHAPE = {"vocab_size": 256, "d_model": 64, "n_layers": 3, "n_heads": 4, "d_ff": 176}
BATCH, SEQ, SEED = 2, 32, 1234
MAX_POSITIONS = 2048  # the reference loader's max_position_embeddings
MODELING_DIR = ("src", "llamafactory", "model", "modeling")


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
        note = "; ".join(ours["notes"])
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
    parser.add_argument("--methods", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:FIELD=VALUE",
                        help="change a config field here (diagnosis: e.g. pondering:ponder_reference=original)")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sets: dict[str, dict[str, str]] = {}
    for item in args.set:
        method, _, assignment = item.partition(":")
        name, eq, value = assignment.partition("=")
        if method not in SPECS or not name or not eq:
            parser.error(f"--set {item}: expected METHOD:FIELD=VALUE with METHOD one of {', '.join(SPECS)}")
        sets.setdefault(method, {})[name] = value
    if args.side == "ours":
        _our_side(args.workdir, args.methods, sets)
        return 0
    if args.side == "reference":
        _reference_side(args.workdir, args.reference, args.methods)
        return 0
    if args.reference is None or args.reference_python is None:
        parser.error("--reference and --reference-python are required")
    if not args.reference.joinpath(*MODELING_DIR).is_dir():
        parser.error(f"--reference {args.reference}: no {'/'.join(MODELING_DIR)}; give a checkout of "
                     "LUMIA-Group/PonderLM-2")
    with tempfile.TemporaryDirectory(prefix="reference_parity_") as tmp:
        workdir = pathlib.Path(tmp)
        _run(sys.executable, ["--side", "ours", "--workdir", str(workdir), "--methods", *args.methods,
                              *(f"--set={item}" for item in args.set)])
        _run(args.reference_python, ["--side", "reference", "--workdir", str(workdir),
                                     "--reference", str(args.reference.resolve()), "--methods", *args.methods])
        ok = _table(_rows(workdir, args.methods))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
