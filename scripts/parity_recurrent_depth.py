#!/usr/bin/env python
"""Parity of recurrent depth (baselines/recurrent_depth.py) with the reference code, seal-rg/recurrent-pretraining's
``recpre/raven_modeling_minimal.py`` (``RavenForCausalLM``), on the same weights and tokens: |delta| per case.

What is compared
    The mechanism: the prelude, the state, the adapter's injection [s; e] at every iteration, the loop count,
    the final norm used twice, the coda; the training sampler and truncated backpropagation; the adaptive
    exits with their KV reuse. The block is not: the project uses its shared pre-norm LLaMA block where the
    reference has its SandwichBlock (two more norms, a q/k bias), so the reference's ``SandwichBlock.forward``
    is replaced, in the reference process only, by the pre-norm computation on its own modules:
    x = x + attn(norm_1(x)); x = x + mlp(norm_3(x)) (norm_2 and norm_4 unused, ``qk_bias=False``). Everything
    else runs as the reference file has it. Cases (the Huginn layout P=2, R=4, C=2 at a tiny width, so the
    reference's ``latest-m4`` cache lookup, which hard-codes R=4, applies):

    fixed       eval mode, r=6: ``forward(num_steps=(6, 0), input_states=s_0)`` against the project's eval-mode
                forward and its cached decoding (``score``), s_0 the project's deployed draw
    train       train mode, seeds 0..4: the same seed draws the same s_0 and (n, k) on both sides (with
                ``stratified=False`` the project calls the global RNG as ``initialize_state`` and
                ``randomized_iteration_sampler`` do, in their order), so the losses and every parameter's
                gradient (truncated backprop) must agree
    sampler     (n, k) of ``randomized_iteration_sampler`` in train mode, seeds 0..499: equal
    kl          ``forward_with_adaptive_compute`` with ``KLExitEvaluator`` (threshold 0.05, so exits vary),
                ``HuginnDynamicCache(lookup_strategy="latest-m4")``, ``init_scale=0`` (s_0 = 0), one row at a
                time (the reference's adaptive path is batch 1): its logits and per-token steps against
                ``recurrent_depth_adaptive`` (state_init="zero") decoding both rows at once
    latent      the same with ``LatentDiffExitEvaluator`` (threshold 0.3)

Weights: the project's model at its init (norm weights perturbed away from 1, so a mis-mapped norm shows)
mapped by name: q/k rows permuted per head from rotate-half to the reference's interleaved RoPE pairs (the
same rotation of the same pairs, so q.k is unchanged), Wqkv = [q; k; v], fc = [gate; up]; untied head.
Every reference parameter is assigned except the unused norm_2/norm_4.

Reference environment (outside the repository; CPU is enough):
    git clone https://github.com/seal-rg/recurrent-pretraining REF
    python3 -m venv REFENV && REFENV/bin/pip install torch==2.13.0 transformers==4.47.1
    python scripts/parity_recurrent_depth.py --reference REF --reference-python REFENV/bin/python

The reference file is copied into a temporary package (its ``recpre/__init__.py`` imports the training stack)
and run by the reference Python; tensors cross in safetensors, no pickle. Exit status 1 if a case fails.
Tolerance: 1e-5 on losses and logits (float32 reordering is ~1e-7), 1e-4 relative on gradients; steps and
(n, k) exactly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch

TOLERANCE, GRAD_TOLERANCE = 1e-5, 1e-4
# stratified off: the project then calls the global RNG as the reference does (its default draws a Weyl sequence)
SHAPE = {"vocab_size": 128, "d_model": 64, "n_heads": 4, "d_ff": 176, "n_layers": 8, "prelude_layers": 2,
         "coda_layers": 2, "mean_recurrence": 6, "backprop_depth": 2, "stratified": False}
BATCH, SEQ, SEED = 2, 24, 1234
TRAIN_SEEDS, SAMPLER_SEEDS = range(5), range(500)
EXITS = {"kl": ("kl", 0.05), "latent": ("latent-diff", 0.3)}  # case -> (criterion, threshold)


# -- the project's side ------------------------------------------------------------------------------------

def _permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a rotate-half q/k projection in the order of the reference's interleaved RoPE pairs."""
    half = torch.arange(head_dim // 2)
    one_head = torch.stack([half, half + head_dim // 2], dim=-1).flatten()
    return torch.cat([one_head + h * head_dim for h in range(n_heads)])


def to_reference(model) -> dict[str, torch.Tensor]:
    cfg, dec = model.config, model.decoder
    perm = _permutation(cfg.n_heads, cfg.head_dim)
    out = {"transformer.wte.weight": dec.embed_tokens.weight, "lm_head.weight": dec.lm_head.weight,
           "transformer.ln_f.weight": dec.norm.weight, "transformer.adapter.weight": model.adapter.weight}
    for name, part in _parts(model):
        block = dec.layers[part]
        attn, mlp = block.self_attn, block.mlp
        out[f"{name}.attn.Wqkv.weight"] = torch.cat([attn.q_proj.weight[perm], attn.k_proj.weight[perm],
                                                     attn.v_proj.weight])
        out[f"{name}.attn.proj.weight"] = attn.o_proj.weight
        out[f"{name}.mlp.fc.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        out[f"{name}.mlp.proj.weight"] = mlp.down_proj.weight
        out[f"{name}.norm_1.weight"] = block.input_layernorm.weight
        out[f"{name}.norm_3.weight"] = block.post_attention_layernorm.weight
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_reference(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference-named tensors (gradients) -> the project's parameter names (the inverse of :func:`to_reference`)."""
    cfg = model.config
    inverse = torch.argsort(_permutation(cfg.n_heads, cfg.head_dim))
    width, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"decoder.embed_tokens.weight": tensors["transformer.wte.weight"],
           "decoder.lm_head.weight": tensors["lm_head.weight"],
           "decoder.norm.weight": tensors["transformer.ln_f.weight"],
           "adapter.weight": tensors["transformer.adapter.weight"]}
    for name, part in _parts(model):
        ours = f"decoder.layers.{part}"
        q, k, v = tensors[f"{name}.attn.Wqkv.weight"].split([width, kv, kv])
        out[f"{ours}.self_attn.q_proj.weight"], out[f"{ours}.self_attn.k_proj.weight"] = q[inverse], k[inverse]
        out[f"{ours}.self_attn.v_proj.weight"] = v
        out[f"{ours}.self_attn.o_proj.weight"] = tensors[f"{name}.attn.proj.weight"]
        gate, up = tensors[f"{name}.mlp.fc.weight"].chunk(2)
        out[f"{ours}.mlp.gate_proj.weight"], out[f"{ours}.mlp.up_proj.weight"] = gate, up
        out[f"{ours}.mlp.down_proj.weight"] = tensors[f"{name}.mlp.proj.weight"]
        out[f"{ours}.input_layernorm.weight"] = tensors[f"{name}.norm_1.weight"]
        out[f"{ours}.post_attention_layernorm.weight"] = tensors[f"{name}.norm_3.weight"]
    return out


def _parts(model):
    """(reference block name, decoder layer index) of every layer."""
    for name, layers in (("prelude", model.prelude), ("core_block", model.core), ("coda", model.coda)):
        for j, i in enumerate(layers):
            yield f"transformer.{name}.{j}", i


def ours(work: pathlib.Path) -> dict:
    from safetensors.torch import save_file

    from harness.core import registry
    from models.base import next_token_loss

    torch.manual_seed(SEED)
    model = registry.build("recurrent_depth", overrides=SHAPE)
    with torch.no_grad():  # norms away from 1: a mis-mapped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    r = model.config.deployed_recurrence
    model.eval()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    state = model.initial_state(torch.zeros(BATCH, SEQ, SHAPE["d_model"]), positions)
    with torch.no_grad():
        results = {"fixed": {"forward": model(inputs, targets).lm_loss.item(),
                             "score": -model.score(inputs, targets).logprobs.mean().item()}}
    save_file(to_reference(model), str(work / "weights.safetensors"))
    save_file({"inputs": inputs.contiguous(), "targets": targets.contiguous(), "state": state.contiguous()},
              str(work / "inputs.safetensors"))

    model.train()
    train, grads = [], {}
    for seed in TRAIN_SEEDS:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = model(inputs, targets)
        out.loss.backward()
        train.append({"loss": out.loss.item(), "n": int(out.stats["no_grad_iterations"]),
                      "k": int(out.stats["grad_iterations"])})
        grads[seed] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    results["train"], results["grads"] = train, grads
    sampled = []
    for seed in SAMPLER_SEEDS:
        torch.manual_seed(seed)
        sampled.append(list(model.sample_iterations()))
    results["sampler"] = sampled

    for case, (criterion, threshold) in EXITS.items():
        adaptive = registry.build("recurrent_depth_adaptive", overrides={
            **SHAPE, "state_init": "zero", "exit_criterion": criterion, "exit_threshold": threshold}).eval()
        adaptive.load_state_dict(model.state_dict())
        with torch.no_grad():
            out = adaptive.decode(inputs, adaptive.new_cache(BATCH))
        results[case] = {"logits": out.logits, "steps": (out.steps + 1).tolist(),
                         "loss": next_token_loss(out.logits, targets).item()}
    (work / "spec.json").write_text(json.dumps({"shape": SHAPE, "recurrence": r, "train_seeds": list(TRAIN_SEEDS),
                                                "sampler_seeds": list(SAMPLER_SEEDS), "exits": EXITS}))
    return results


# -- the reference's side (torch, transformers and safetensors only) ----------------------------------------

def reference(work: pathlib.Path, source: pathlib.Path) -> None:
    from safetensors.torch import load_file, save_file

    package = work / "raven_ref"  # a package of its own: the file imports its config relatively
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        shutil.copy(source / "recpre" / name, package / name)
    sys.path.insert(0, str(work))
    from raven_ref import raven_modeling_minimal as raven

    def pre_norm(self, x, freqs_cis, step_idx, mask=None, past_key_values=None):
        x = x + self.attn(self.norm_1(x), freqs_cis, step_idx, mask, past_key_values)
        return x + self.mlp(self.norm_3(x))

    raven.SandwichBlock.forward = pre_norm  # the project's block on the reference's modules (docstring)

    spec = json.loads((work / "spec.json").read_text())
    shape = spec["shape"]
    core = shape["n_layers"] - shape["prelude_layers"] - shape["coda_layers"]
    config = raven.RavenConfig(
        n_embd=shape["d_model"], n_heads=shape["n_heads"], n_layers=shape["n_layers"], block_size=64,
        vocab_size=shape["vocab_size"], padding_multiple=1, tie_embeddings=False, intermediate_size=shape["d_ff"],
        qk_bias=False, mean_recurrence=shape["mean_recurrence"], mean_backprop_depth=shape["backprop_depth"],
        n_layers_in_prelude=shape["prelude_layers"], n_layers_in_recurrent_block=core,
        n_layers_in_coda=shape["coda_layers"], norm_eps=1e-6, rope_base=50000.0)
    model = raven.RavenForCausalLM(config)
    weights = load_file(str(work / "weights.safetensors"))
    state = model.state_dict()
    unassigned = {k for k in state if k not in weights and k != "freqs_cis" and not k.endswith(("norm_2.weight",
                                                                                                 "norm_4.weight"))}
    assert not unassigned and set(weights) <= set(state), (unassigned, set(weights) - set(state))
    state.update(weights)
    model.load_state_dict(state)
    data = load_file(str(work / "inputs.safetensors"))
    inputs, targets = data["inputs"], data["targets"]
    out_tensors, out = {}, {}

    model.eval()
    with torch.no_grad():
        r = spec["recurrence"]
        fixed = model(inputs, labels=targets, input_states=data["state"], num_steps=(r, 0))
        out["fixed"] = fixed.loss.item()

    model.train()
    train = []
    for seed in spec["train_seeds"]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        result = model(inputs, labels=targets)
        result.loss.backward()
        train.append(result.loss.item())
        out_tensors.update({f"grad.{seed}.{name}": p.grad.detach().clone() for name, p in model.named_parameters()
                            if p.grad is not None})
    out["train"] = train
    sampled = []
    for seed in spec["sampler_seeds"]:
        torch.manual_seed(seed)
        n, k = model.randomized_iteration_sampler()
        sampled.append([int(n), int(k)])
    out["sampler"] = sampled

    model.eval()
    for case, (criterion, threshold) in spec["exits"].items():
        logits, steps = [], []
        for row in range(inputs.shape[0]):
            evaluator = (raven.KLExitEvaluator(model, threshold) if criterion == "kl"
                         else raven.LatentDiffExitEvaluator(threshold))
            cache = raven.HuginnDynamicCache(lookup_strategy="latest-m4")
            result = model.forward_with_adaptive_compute(inputs[row:row + 1], evaluator, past_key_values=cache,
                                                         init_scale=0.0)
            logits.append(result.logits[0])
            steps.append(list(result.stats["compute_steps"]))
        out_tensors[f"{case}.logits"] = torch.stack(logits)
        out[case] = steps
    save_file({k: v.contiguous() for k, v in out_tensors.items()}, str(work / "reference.safetensors"))
    (work / "reference.json").write_text(json.dumps(out))


# -- comparison ---------------------------------------------------------------------------------------------

def compare(work: pathlib.Path, mine: dict) -> list[tuple[str, str, bool]]:
    from safetensors.torch import load_file

    from harness.core import registry

    theirs = json.loads((work / "reference.json").read_text())
    tensors = load_file(str(work / "reference.safetensors"))
    model = registry.build("recurrent_depth", overrides=SHAPE)
    rows = []
    for side in ("forward", "score"):
        delta = abs(mine["fixed"][side] - theirs["fixed"])
        rows.append((f"fixed r=6 ({side})", f"{mine['fixed'][side]:.6f} vs {theirs['fixed']:.6f}, "
                     f"|delta| {delta:.2e}", delta <= TOLERANCE))
    for i, seed in enumerate(TRAIN_SEEDS):
        got, want = mine["train"][i], theirs["train"][i]
        delta = abs(got["loss"] - want)
        grads = from_reference(model, {k.split(".", 2)[2]: v for k, v in tensors.items()
                                       if k.startswith(f"grad.{seed}.")})
        worst = max((mine["grads"][seed][k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                    for k, g in grads.items())
        missing = set(mine["grads"][seed]) - set(grads)
        rows.append((f"train seed {seed} (n={got['n']}, k={got['k']})",
                     f"loss |delta| {delta:.2e}, gradients max rel {worst:.2e}",
                     delta <= TOLERANCE and worst <= GRAD_TOLERANCE and not missing))
    same = sum(a == b for a, b in zip(mine["sampler"], theirs["sampler"]))
    mean = sum(n + k for n, k in theirs["sampler"]) / len(theirs["sampler"])
    rows.append(("sampler (n, k)", f"{same} of {len(SAMPLER_SEEDS)} seeds equal; mean n+k {mean:.3f}",
                 same == len(SAMPLER_SEEDS)))
    for case in EXITS:
        delta = (mine[case]["logits"] - tensors[f"{case}.logits"]).abs().max().item()
        equal = mine[case]["steps"] == theirs[case]
        steps = [s for row in theirs[case] for s in row]
        rows.append((f"adaptive {case}", f"logits max |delta| {delta:.2e}, steps {'equal' if equal else 'DIFFER'} "
                     f"(iterations {min(steps)}..{max(steps)})", delta <= TOLERANCE and equal))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=pathlib.Path, required=True,
                        help="a checkout of seal-rg/recurrent-pretraining")
    parser.add_argument("--reference-python", help="a Python with torch and transformers==4.47.1")
    parser.add_argument("--side", choices=("ours", "reference"), default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "reference":
        reference(args.workdir, args.reference)
        return 0
    if not args.reference_python:
        parser.error("--reference-python is required")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        mine = ours(work)
        cmd = [args.reference_python, str(pathlib.Path(__file__).resolve()), "--side", "reference",
               "--workdir", str(work), "--reference", str(args.reference.resolve())]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        rows = compare(work, mine)
    width = max(len(name) for name, _, _ in rows)
    for name, detail, ok in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
    failed = [name for name, _, ok in rows if not ok]
    print(f"parity: {len(rows) - len(failed)} of {len(rows)} cases within tolerance"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
