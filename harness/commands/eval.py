"""``python -m harness eval DIR``: re-evaluate a saved job (perplexity, downstream tasks) and update its result."""

from __future__ import annotations

import argparse
import json
import pathlib

from harness import checkpoint
from harness.core.errors import CheckpointError, ConfigError
from harness.core.io import read_json, write_json_atomic
from harness.evaluate import evaluate_model
from harness.job import load_job, resolve_device
from harness.lmeval.runner import evaluate_downstream
from harness.lmeval.tasks import resolve_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a job folder written by `python -m harness train`")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--tasks", default="", help="downstream tasks (lm-eval), comma separated")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="documents per downstream task")
    parser.add_argument("--no-progress", action="store_true")


def finished_result(folder: pathlib.Path) -> dict:
    """The full result of a job that finished training; a CheckpointError otherwise.

    eval only updates what training wrote: it never writes a result.json that a finished job would not
    have (no method, size, budget, training FLOPs).
    """
    if not folder.is_dir():
        raise CheckpointError(f"job folder not found: {folder}")
    if not (folder / "job.json").exists():  # every job folder has one from its first write on
        raise CheckpointError(f"{folder} is not a job folder (no job.json); give a folder written by "
                              "`python -m harness train --out DIR` (a sweep's jobs are in OUT/jobs/<job id>)")
    state = checkpoint.load_state(folder / "checkpoint") if (folder / "checkpoint").is_dir() else None
    again = "run the same `python -m harness train` command again to finish it (it evaluates too)"
    if state is None or int(state.get("step", -1)) != int(state.get("total_steps", -2)):
        done = "no checkpoint" if state is None else f"step {state.get('step')} of {state.get('total_steps')}"
        raise CheckpointError(f"{folder} has not finished training ({done}); {again}")
    result_path = folder / "result.json"
    result = read_json(result_path, "result") if result_path.exists() else {}
    if result.get("method") is None or "train_flops" not in result:
        raise CheckpointError(f"{folder} finished training but has no full result.json (stopped while "
                              f"evaluating?); {again}")
    return result


def run(args: argparse.Namespace) -> int:
    folder = pathlib.Path(args.folder)
    # every argument is checked before the perplexity pass, which rewrites tokens.npz
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1 (documents per task); leave it out for all")
    if args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot}: must be 0 or more (examples before each question)")
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks:  # a typo in a task name fails now, not after the perplexity pass
        resolve_tasks(tasks)
    finished_result(folder)  # an unfinished job fails now, before the perplexity pass
    job, model, corpus = load_job(folder)
    device = resolve_device(job.train.device)
    model.to(device)
    result_path = folder / "result.json"
    result = finished_result(folder)
    result.update(evaluate_model(model, corpus, job.train, device, records_path=folder / "tokens.npz",
                                 progress=not args.no_progress))
    if tasks:
        scores = evaluate_downstream(folder, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                     progress=not args.no_progress)
        result.setdefault("downstream", {}).update(scores)
    write_json_atomic(result_path, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for key in ("method", "size", "val_loss", "val_ppl", "infer_flops_per_token", "parallel_gap",
                    "mean_extra_steps", "consistency_gap", "jacobi_gap"):
            if key in result:
                print(f"{key:<24} {result[key]}")
        for task, score in result.get("downstream", {}).items():
            print(f"{task:<24} {score}")
    return 0
