#!/usr/bin/env python
"""Training-step speed of PonderLM-2 here against the official code: same weights, same inputs, same J.

What it does
    For each configuration (``--configs``; by default the three of issue 15: d128/L4 at K=1 and K=3 and
    d256/L6 at K=1, every one with J=3 Jacobi passes), builds ``ponderlm2`` here, writes its weights and
    a batch of token ids as safetensors, and times one training step (forward + backward, train mode,
    float32, ``--threads`` threads) on both sides: this project's model, and the LUMIA-Group/PonderLM-2
    ``modeling_llama.py`` ``LlamaForCausalLM`` under transformers 4.46.1 loaded with the same weights.
    The two sides run in separate processes, alternately (``--rounds`` rounds, the order swapped every
    round so that neither always runs first), each warming up and then timing ``--steps`` steps; the
    table gives the median step time of each side, the speed-up (the median over rounds of reference time
    / ours in the same round, so the machine's drift between rounds cancels) and the two
    training losses of the first step, which must agree (``reference_parity.TOLERANCE``): the timing
    compares the same computation.

Reuse
    ``scripts/reference_parity.py`` (the loss-parity check) owns the mapping onto the reference: its
    ``SPECS["ponderlm2"]`` flags, ``_reference_tensors`` (weights under the reference's names, through
    harness.hf's map), ``_perturb_norms`` and ``_reference_class`` (loads modeling_llama.py from a
    checkout) are imported from it, so both scripts build the reference model the same way. Here the
    reference runs in train mode with ``random_jacobi_iterations`` off and ``num_jacobi_iterations`` = J,
    the project's forward with ``jacobi_passes=J``: the reference's ``randint(2, 4)`` and the project's
    uniform draw over (2, 3) would make single steps incomparable.

Reference environment: as for scripts/reference_parity.py (a checkout of LUMIA-Group/PonderLM-2 and a
Python with torch and transformers==4.46.1):

    python scripts/reference_speed.py --reference REF --reference-python REFENV/bin/python \\
        [--configs d128_L4_K1 d128_L4_K3 d256_L6_K1] [--rounds 3] [--steps 3] [--threads 1] [--attn sdpa] \\
        [--compile]

``--compile`` adds a third side, ours with the blocks compiled (``train --compile``,
``Decoder.compile_training_blocks``): its first, untimed step compiles; its loss must also agree.

``--attn`` is the reference's ``attn_implementation`` (transformers' "sdpa" by default, its fastest on
CPU; "eager" is what the parity check uses). The project's speed target for this comparison (issue 15):
a speed-up of at least 1.3 at these configurations.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reference_parity as parity  # the sibling script, importable from any working folder

METHOD = "ponderlm2"
JACOBI = 3
VOCAB, BATCH, SEQ, SEED = 2048, 8, 128, 1234
# name -> the project's config overrides (head dimension 32; SwiGLU width by LLaMA's 8/3 rule)
CONFIGS: dict[str, dict[str, int]] = {
    "d128_L4_K1": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384, "latent_steps": 1},
    "d128_L4_K3": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384, "latent_steps": 3},
    "d256_L6_K1": {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 704, "latent_steps": 1},
}
TARGET_SPEEDUP = 1.3


# ============================================================================ setup (project side)


def _setup(workdir: pathlib.Path, name: str) -> None:
    """Weights under both namings, the reference config and flags, and the inputs, for one config."""
    import torch
    from safetensors.torch import save_file

    from harness.core import registry
    from harness.hf import SHAPE_FIELDS

    spec = parity.SPECS[METHOD]
    overrides = {"vocab_size": VOCAB, **CONFIGS[name], "jacobi_passes": (JACOBI,), "eval_jacobi_passes": JACOBI}
    plugin = registry.get(METHOD)
    torch.manual_seed(SEED)
    cfg = plugin.make_config(None, overrides)
    model = plugin.build(cfg).float()
    parity._perturb_norms(model)
    notes: list[str] = []
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(workdir / "ours.safetensors"))
    save_file(parity._reference_tensors(model, spec, notes), str(workdir / "reference.safetensors"))
    generator = torch.Generator().manual_seed(SEED)
    save_file({"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)},
              str(workdir / "inputs.safetensors"))
    flags = {**spec.flags, "num_latent_thoughts": cfg.latent_steps, "num_jacobi_iterations": JACOBI,
             "random_jacobi_iterations": False}
    config = {key: getattr(cfg, field) for field, key in SHAPE_FIELDS.items()}
    (workdir / "setup.json").write_text(json.dumps({"overrides": {**overrides, "jacobi_passes": [JACOBI]},
                                                    "config": config, "flags": flags, "notes": notes}))


# ======================================================================================== timing


def _time_steps(step, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(loss of the first step, seconds of each timed step)."""
    first = step()
    for _ in range(warmup - 1):
        step()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return first, seconds


def _ours(workdir: pathlib.Path, warmup: int, steps: int, compiled: bool = False) -> dict:
    import torch
    from safetensors.torch import load_file

    from harness.core import registry
    from models.base import IGNORE_INDEX

    setup = json.loads((workdir / "setup.json").read_text())
    model = registry.build(METHOD, overrides=setup["overrides"]).float().train()
    model.load_state_dict(load_file(str(workdir / "ours.safetensors")), strict=True)
    ids = load_file(str(workdir / "inputs.safetensors"))["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)  # HF's shifted labels
    if compiled and not model.decoder.compile_training_blocks():
        raise SystemExit("--compile: torch.compile cannot build code here (no C++ compiler)")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets, jacobi_passes=JACOBI).loss
        loss.backward()
        return float(loss)

    loss, seconds = _time_steps(step, warmup, steps)
    return {"loss": loss, "seconds": seconds, "torch": torch.__version__}


def _reference(workdir: pathlib.Path, reference: pathlib.Path, attn: str, warmup: int, steps: int) -> dict:
    import torch
    import transformers
    from safetensors.torch import load_file

    setup = json.loads((workdir / "setup.json").read_text())
    model = parity.reference_model(reference, parity.SPECS[METHOD], setup, attn,
                                   workdir / "reference.safetensors").train()
    ids = load_file(str(workdir / "inputs.safetensors"))["input_ids"]

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss)

    loss, seconds = _time_steps(step, warmup, steps)
    return {"loss": loss, "seconds": seconds, "torch": torch.__version__, "transformers": transformers.__version__}


# ================================================================================= orchestration


def _run(python: str, args: list[str]) -> dict:
    cmd = [python, str(pathlib.Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(cmd[:2])} {' '.join(args[:2])} failed (exit {done.returncode}); see above")
    return json.loads(done.stdout.strip().splitlines()[-1]) if args[1] != "setup" else {}


def _measure(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="reference_speed_") as tmp:
        common = ["--workdir", tmp, "--configs", name, "--threads", str(args.threads),
                  "--warmup", str(args.warmup), "--steps", str(args.steps)]
        _run(sys.executable, ["--side", "setup", *common])
        sides = {"ours": (sys.executable, ["--side", "ours", *common]),
                 "reference": (args.reference_python, ["--side", "reference", *common, "--attn", args.attn,
                                                       "--reference", str(args.reference.resolve())])}
        if args.compile:  # the first (untimed) step compiles
            sides["compiled"] = (sys.executable, ["--side", "compiled", *common])
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            order = tuple(sides) if round_ % 2 == 0 else tuple(reversed(sides))
            for side in order:
                python, side_args = sides[side]
                results[side].append(_run(python, side_args))
                print(f"  {name} round {round_ + 1}/{args.rounds} {side}: "
                      f"{statistics.median(results[side][-1]['seconds']) * 1e3:.1f} ms/step", file=sys.stderr)
    per_round = {side: [statistics.median(r["seconds"]) for r in runs] for side, runs in results.items()}
    seconds = {side: statistics.median(s) for side, s in per_round.items()}

    def speedup(side: str) -> float:  # round by round: this VM's speed drifts between rounds, not within one
        return statistics.median(ref / ours for ref, ours in zip(per_round["reference"], per_round[side]))

    losses = {side: runs[0]["loss"] for side, runs in results.items()}
    return {"config": name, **{f"{side}_ms": 1e3 * s for side, s in seconds.items()},
            "speedup": speedup("ours"), "loss_ours": losses["ours"],
            "loss_reference": losses["reference"], "loss_delta": abs(losses["ours"] - losses["reference"]),
            "transformers": results["reference"][0]["transformers"],
            **({"compiled_speedup": speedup("compiled"), "loss_compiled": losses["compiled"]}
               if "compiled" in seconds else {})}


def _table(rows: list[dict], args: argparse.Namespace) -> bool:
    compiled = bool(rows) and "compiled_speedup" in rows[0]
    extra = f" {'compiled ms':>11} {'speed-up':>9}" if compiled else ""
    print(f"{'config':<12} {'ours ms':>9} {'ref ms':>9} {'speed-up':>9} {'|dloss|':>9}{extra}  target >= "
          f"{TARGET_SPEEDUP:g}")
    ok = True
    for r in rows:
        same = r["loss_delta"] < parity.TOLERANCE
        if compiled:  # inductor may reorder reductions: the same loss to the parity tolerance, not bit for bit
            same &= abs(r["loss_compiled"] - r["loss_reference"]) < parity.TOLERANCE
        best = max(r["speedup"], r.get("compiled_speedup", 0.0))
        ok &= same
        cells = f" {r['compiled_ms']:11.1f} {r['compiled_speedup']:9.3f}" if compiled else ""
        print(f"{r['config']:<12} {r['ours_ms']:9.1f} {r['reference_ms']:9.1f} {r['speedup']:9.3f} "
              f"{r['loss_delta']:9.2e}{cells}  {'met' if best >= TARGET_SPEEDUP else 'missed'}"
              f"{'' if same else '  LOSSES DIFFER'}")
    print(f"J={JACOBI}, batch {BATCH} x {SEQ}, vocab {VOCAB}, float32, {args.threads} thread(s), reference attention "
          f"{args.attn!r}, transformers {rows[0]['transformers'] if rows else '?'}; medians of {args.rounds} "
          f"alternating rounds of {args.steps} steps")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=pathlib.Path, help="a checkout of LUMIA-Group/PonderLM-2")
    parser.add_argument("--reference-python", help="a Python with torch and transformers==4.46.1")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="the reference's attention")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with the blocks compiled (train --compile), a third side")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    parser.add_argument("--side", choices=("setup", "ours", "compiled", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--rounds, --steps, --warmup and --threads must be >= 1")
    if args.side is not None:
        import torch

        torch.set_num_threads(args.threads)
        if args.side == "setup":
            _setup(args.workdir, args.configs[0])
            return 0
        if args.side in ("ours", "compiled"):
            result = _ours(args.workdir, args.warmup, args.steps, compiled=args.side == "compiled")
        else:
            result = _reference(args.workdir, args.reference, args.attn, args.warmup, args.steps)
        print(json.dumps(result))
        return 0
    if args.reference is None or args.reference_python is None:
        parser.error("--reference and --reference-python are required")
    if not args.reference.joinpath(*parity.MODELING_DIR).is_dir():
        parser.error(f"--reference {args.reference}: no {'/'.join(parity.MODELING_DIR)}; give a checkout of "
                     "LUMIA-Group/PonderLM-2")
    rows = [_measure(name, args) for name in args.configs]
    ok = _table(rows, args)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
