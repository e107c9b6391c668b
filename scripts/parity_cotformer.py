#!/usr/bin/env python
"""Loss parity of ``cotformer`` and ``cotformer_adaptive`` with the official CoTFormer code (epfml/CoTFormer).

What it does
    Builds each case here, copies its weights into the reference's model class, feeds both the same token ids
    and prints both losses, |delta| and pass/fail at 1e-5 (exit status 1 if any case fails).

    case              reference model (models/)                                  here
    cotformer         cotformer_full_depth                                       defaults (R = 5)
    cotformer-ln      cotformer_full_depth_lnmid_depthemb, begin 1 / end 1,      prefix/suffix 1, mid_norm,
                        --depth_embedding linear_learned                           linear_learned
    cotformer-learned cotformer_full_depth_lnmid_depthemb, learned, R = 3        learned, mid_norm, R = 3
    adaptive          adaptive_cotformer_..._single_final, begin 1 / end 1,      prefix/suffix 1,
                        linear_learned, eval mode (capacity 1 everywhere)          linear_learned, eval mode
    adaptive-topk     the same at --eval_length_factor 0.8 0.5 0.3 0.1           eval_length_factors
    adaptive-train    the same in training mode, both drawing the same u         training mode, same u
                        (torch.rand patched on both sides: each side turns u
                        into its length factors by its own code)

    For the fixed cases it also prints the loss of deployed (cached) decoding here, ``score``, which must equal
    the reference's parallel forward. The adaptive model's deployed rule (router weight against a threshold per
    token) has no reference function to compare with: the reference turns the threshold into top-k capacities
    (get_ppl_per_mac.py); tests/test_cotformer.py checks it against a hand-written oracle.

Blocks
    The reference runs GPT-2 blocks; the harness runs the shared Llama block. To compare the mechanism (repeats,
    key buffer over the repeats and its mask, ln_mid, depth embedding, routers, capacities, mixing, final-state
    assembly, prefix/suffix layers) the reference runs here with Llama's block math swapped in before its model
    is built: its ``LayerNorm`` computes RMSNorm (same eps) and its ``MLP`` is SwiGLU. Its attention is left as
    it is: fused c_attn = [q | k | v] (the q and k rows of each head permuted: the reference rotates interleaved
    pairs (2i, 2i+1), Llama the halves (i, i + D/2), at the same frequencies, so permuting rows maps one onto the
    other and q.k is unchanged), its own rotary (base 10, log 4: theta 10^4), its own masks. Its embedding is tied
    to the head: here lm_head is set equal to the embedding, ``ponder_init`` off (no embedding scale). Norm
    weights are perturbed away from 1, routers and depth embeddings drawn large, so a mis-mapped piece shows.
    The reference's last router (``mod[n_repeat - 1]``) is never used by its forward and stays unassigned.

Reference environment (any machine; CPU is enough; the model files import torch and tiktoken, and tiktoken is
only used to build an unused tokenizer, so a stub replaces it)
    git clone https://github.com/epfml/CoTFormer REF
    python3 -m venv REFENV && REFENV/bin/pip install torch
    python scripts/parity_cotformer.py --reference REF --reference-python REFENV/bin/python [--cases ...]

Design
    This file, run by the project's Python, computes the project's losses in process, writes weights (reference
    names), inputs and the case list into a temporary folder (``torch.save`` of plain tensors, read back with
    ``weights_only=True``: no pickled code crosses), runs itself under ``--reference-python`` with ``--side
    reference`` (which imports nothing of the project), and prints the table.

Tolerance
    1e-5 on the mean cross-entropy, as scripts/reference_parity.py: both sides compute in float32, so the same
    function in another order of operations (fused qkv, SDPA against the reference's attention, concatenated keys
    against its preallocated buffer) differs by float32 rounding, ~1e-7 nats.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn.functional as F
from torch import nn

TOLERANCE = 1e-5
SHAPE = dict(vocab_size=97, d_model=64, n_heads=4, d_ff=96)
BATCH, LENGTH = 2, 16
INIT_STD = 0.1  # N(0, 0.1^2) weights (ponder_init off): logits far from uniform, so a wrong piece moves the loss
U = (0.3, 0.9, 0.6, 0.1)  # the draw both sides turn into length factors in adaptive-train (R = 5)

# case -> (method, overrides here, reference model module, mode, reference config overrides)
CASES = {
    "cotformer": ("cotformer", {"n_layers": 3}, "cotformer_full_depth", "eval", {}),
    "cotformer-ln": ("cotformer", {"n_layers": 4, "prefix_layers": 1, "suffix_layers": 1, "mid_norm": True,
                                   "depth_embedding": "linear_learned"},
                     "cotformer_full_depth_lnmid_depthemb", "eval", {}),
    "cotformer-learned": ("cotformer", {"n_layers": 3, "repeats": 3, "mid_norm": True, "depth_embedding": "learned"},
                          "cotformer_full_depth_lnmid_depthemb", "eval", {}),
    "adaptive": ("cotformer_adaptive", {"n_layers": 4, "prefix_layers": 1, "suffix_layers": 1,
                                        "depth_embedding": "linear_learned"},
                 "adaptive_cotformer_mod_efficient_sigmoid_crw_lnmid_de_random_factor_single_final", "eval", {}),
    "adaptive-topk": ("cotformer_adaptive", {"n_layers": 4, "prefix_layers": 1, "suffix_layers": 1,
                                             "depth_embedding": "linear_learned",
                                             "eval_length_factors": (0.8, 0.5, 0.3, 0.1)},
                      "adaptive_cotformer_mod_efficient_sigmoid_crw_lnmid_de_random_factor_single_final", "eval",
                      {"eval_length_factor": [0.8, 0.5, 0.3, 0.1]}),
    "adaptive-train": ("cotformer_adaptive", {"n_layers": 4, "prefix_layers": 1, "suffix_layers": 1,
                                              "depth_embedding": "linear_learned"},
                       "adaptive_cotformer_mod_efficient_sigmoid_crw_lnmid_de_random_factor_single_final", "train", {}),
}


class fixed_draw:
    """torch.rand((R - 1,)) returns ``u`` inside the block (both sides draw their length factors so)."""

    def __init__(self, u):
        self.u, self.original = torch.tensor(u), torch.rand

    def __enter__(self):
        def rand(*size, **kwargs):
            shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            return self.u.clone() if tuple(shape) == tuple(self.u.shape) else self.original(*size, **kwargs)

        torch.rand = rand

    def __exit__(self, *exc):
        torch.rand = self.original


def head_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Our q/k rows in the reference's order: per head, (i, i + D/2) for each frequency i (interleaved pairs)."""
    half = head_dim // 2
    return torch.tensor([h * head_dim + i + j * half for h in range(n_heads) for i in range(half) for j in (0, 1)])


# -- our side (the project's interpreter) ------------------------------------------------------------

def our_side(case: str, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]]:
    from harness.core import registry

    method, overrides, _, mode, _ = CASES[case]
    torch.manual_seed(0)
    model = registry.build(method, overrides={**SHAPE, "ponder_init": False, "init_std": INIT_STD, **overrides})
    with torch.no_grad():
        model.decoder.lm_head.weight.copy_(model.decoder.embed_tokens.weight)  # the reference's tied head
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for router in getattr(model, "routers", []):
            router.weight.normal_(0.0, 0.5)
        if model.depth_embedding is not None:
            model.depth_embedding.weight.normal_(0.0, 0.3)
    cfg = model.config
    losses = {}
    if mode == "train":
        model.train()
        with fixed_draw(U):
            losses["loss"] = model(ids, ids.roll(-1, 1)).lm_loss.item()
    else:
        model.eval()
        with torch.no_grad():
            losses["loss"] = model(ids, ids.roll(-1, 1)).lm_loss.item()
        if not model.adaptive:
            losses["decode"] = -model.score(ids, ids.roll(-1, 1)).logprobs.mean().item()
    dec, p_layers, s_layers = model.decoder, cfg.prefix_layers, cfg.suffix_layers
    rows = head_rows(cfg.n_heads, cfg.head_dim)
    weights = {"transformer.wte.weight": dec.embed_tokens.weight, "lm_head.weight": dec.embed_tokens.weight,
               "transformer.ln_f.weight": dec.norm.weight}
    for i, layer in enumerate(dec.layers):
        if i < p_layers:
            name = f"transformer.h_begin.{i}"
        elif i < cfg.n_layers - s_layers:
            name = f"transformer.h_mid.{i - p_layers}"
        else:
            name = f"transformer.h_end.{i - (cfg.n_layers - s_layers)}"
        a, m = layer.self_attn, layer.mlp
        weights.update({
            f"{name}.ln_1.weight": layer.input_layernorm.weight,
            f"{name}.ln_2.weight": layer.post_attention_layernorm.weight,
            f"{name}.attn.c_attn.weight": torch.cat((a.q_proj.weight[rows], a.k_proj.weight[rows], a.v_proj.weight)),
            f"{name}.attn.c_proj.weight": a.o_proj.weight,
            f"{name}.mlp.gate.weight": m.gate_proj.weight, f"{name}.mlp.up.weight": m.up_proj.weight,
            f"{name}.mlp.down.weight": m.down_proj.weight})
    if model.mid_norm is not None:
        weights["transformer.ln_mid.weight"] = model.mid_norm.weight
    if model.depth_embedding is not None:
        weights["depth_emb.embs.weight"] = model.depth_embedding.weight
    for i, router in enumerate(getattr(model, "routers", [])):
        weights[f"transformer.mod.{i}.mod_router.weight"] = router.weight
    setup = {"n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_layer_begin": p_layers,
             "n_layer_end": s_layers, "n_repeat": cfg.repeats, "d_ff": cfg.d_ff, "eps": cfg.norm_eps,
             "vocab_size": cfg.vocab_size,
             "depth_embedding": None if cfg.depth_embedding == "none" else cfg.depth_embedding}
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}, setup, losses


# -- the reference's side (any interpreter with torch; imports nothing of the project) ------------------

class SwiGLU(nn.Module):
    """Llama's MLP in place of the reference's GELU MLP (``MLP(config)`` in its Block)."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.up = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def reference_module(reference: pathlib.Path, name: str, eps: float):
    """Import the reference's model file ``name`` (its package ``__init__``, which imports every model and einops,
    is skipped), with RMSNorm and SwiGLU swapped in and tiktoken stubbed."""
    sys.modules.setdefault("tiktoken", types.SimpleNamespace(get_encoding=lambda name: None))
    if "cotref" not in sys.modules:
        package = types.ModuleType("cotref")
        package.__path__ = [str(reference / "models")]
        sys.modules["cotref"] = package
    utils = importlib.import_module("cotref.utils")
    utils.LayerNorm.forward = lambda self, x: F.rms_norm(x, self.weight.shape, self.weight, eps)
    module = importlib.import_module(f"cotref.{name}")
    module.MLP = SwiGLU
    return module


def reference_side(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    spec = json.loads((workdir / "cases.json").read_text())
    ids = torch.load(workdir / "ids.pt", weights_only=True)
    out = {}
    for case, item in spec.items():
        setup, mode, extra = item["setup"], item["mode"], item["reference_config"]
        module = reference_module(reference, item["module"], setup["eps"])
        config = types.SimpleNamespace(**{
            "vocab_size": setup["vocab_size"], "sequence_length": ids.shape[1], "n_embd": setup["n_embd"],
            "n_head": setup["n_head"], "n_layer": setup["n_layer"], "n_layer_begin": setup["n_layer_begin"],
            "n_layer_end": setup["n_layer_end"], "n_repeat": setup["n_repeat"], "d_ff": setup["d_ff"], "dropout": 0.0,
            "bias": False, "positional_encoder": "rotary", "lm_cache": "none", "attention_window_length": None,
            "depth_embedding": setup["depth_embedding"], "disable_ln_mid": False, "eval_length_factor": None,
            "depth_random_method": "uniform", **extra})
        torch.manual_seed(0)
        model = module.GPTBase(config)
        weights = torch.load(workdir / f"{case}.pt", weights_only=True)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # buffers (rotary frequencies, the causal mask) and the router the reference never uses
        unused = f"transformer.mod.{setup['n_repeat'] - 1}.mod_router.weight"
        left = [k for k in missing if not k.endswith(("wpe.freqs", "attn.bias")) and k != unused]
        if left or unexpected:
            raise SystemExit(f"{case}: reference weights left unassigned {left} or unknown {unexpected}")
        targets = ids.roll(-1, 1)
        if mode == "train":
            model.train()
            with fixed_draw(U):
                loss = model(ids, targets=targets, get_logits=True)["loss"]
        else:
            model.eval()
            with torch.no_grad():
                loss = model(ids, targets=targets, get_logits=True)["loss"]
        out[case] = loss.item()
    (workdir / "reference.json").write_text(json.dumps(out))


# -- driver -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=pathlib.Path, required=True, help="a checkout of epfml/CoTFormer")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="interpreter with torch for the reference side (default: this one)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--side", choices=["ours", "reference"], default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "reference":
        reference_side(args.workdir, args.reference.resolve())
        return 0
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the project, run from anywhere
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    ours, spec = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        torch.save(ids, workdir / "ids.pt")
        for case in args.cases:
            weights, setup, ours[case] = our_side(case, ids)
            torch.save(weights, workdir / f"{case}.pt")
            _, _, module, mode, extra = CASES[case]
            spec[case] = {"setup": setup, "module": module, "mode": mode, "reference_config": extra}
        (workdir / "cases.json").write_text(json.dumps(spec))
        cmd = [args.reference_python, str(pathlib.Path(__file__).resolve()), "--side", "reference",
               "--reference", str(args.reference.resolve()), "--workdir", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout + done.stderr)
            return 2
        theirs = json.loads((workdir / "reference.json").read_text())
    print(f"{'case':<18} {'reference':>11} {'here':>11} {'|delta|':>9} {'decode here':>12} {'|delta|':>9}  result")
    ok = True
    for case in args.cases:
        ref, here = theirs[case], ours[case]["loss"]
        deltas = [abs(ref - here)]
        decode = ours[case].get("decode")
        cells = f"{decode:12.7f} {abs(ref - decode):9.2e}" if decode is not None else f"{'-':>12} {'-':>9}"
        if decode is not None:
            deltas.append(abs(ref - decode))
        passed = max(deltas) <= TOLERANCE
        ok &= passed
        print(f"{case:<18} {ref:11.7f} {here:11.7f} {deltas[0]:9.2e} {cells}  {'pass' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
