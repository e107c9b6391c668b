"""Matched-budget sweeps on Ray: plan the jobs, fan them out, record every result, write the reports.

How it runs (docs/design.md, "Running and scale"):

* The plan (:mod:`harness.plan`) is printed first. A plan whose estimated wall time on the hardware
  found exceeds :data:`harness.plan.hardware.CONFIRM_HOURS` stops and asks; ``--yes`` skips the question (without a
  terminal the sweep stops with a one-line error instead).
* ``ray.init()`` starts a local instance with every CPU core unless ``--address``/``RAY_ADDRESS``
  names a cluster. A job takes one GPU when the cluster has GPUs, else ``--cpus-per-job`` CPUs (and as
  many torch threads). On a cluster, ``OUT`` must be on a filesystem every node sees.
* ``--devices-per-job N`` (N > 1, or ``devices_per_job`` in a study) trains each job on N devices through
  Ray Train (:mod:`harness.distributed`, ``--parallel ddp|fsdp``): the job's task then reserves nothing
  itself (its trainer's N workers hold the GPUs, or ``--cpus-per-job`` CPUs each), at most as many such
  tasks run at once as the cluster has room for, the trainer restarts crashed workers (``--retries``
  times) and the downstream tasks run in a task of their own with one GPU. N changes no job's id.
* ``--compile`` (or ``compile = true`` in a study) trains every job with its blocks through torch.compile
  (:func:`harness.train.train_job`'s ``compile_blocks``); a run option too, so no job's id changes.
* Each Ray task calls :func:`harness.train.train_job` on ``OUT/jobs/<job_id>`` (which resumes from the
  job's checkpoint, or returns the result of a finished job), then the downstream tasks through
  :func:`harness.lmeval.runner.evaluate_downstream` when ``--tasks`` is given, and appends the record
  to ``OUT/runs.jsonl`` itself, so a finished job is stored even if the driver dies a moment later.
* Errors the user must fix (config, data, NaN loss, a corrupt checkpoint) are recorded as failed at
  once; anything else (a crashed or killed worker, an unexpected exception) is retried by Ray
  (``--retries``, resuming from the checkpoint) and then recorded as failed with its one-line message.
  The sweep goes on either way and exits with status 1 if a job failed.
* Failures of Ray itself (a dead raylet or node, a lost object: :data:`RAY_FAULTS`; a crashed worker
  only when a node died with it) are not the job's: they use none of its retries. The sweep backs off,
  restarts the local Ray instance (or joins the cluster again) and resubmits the jobs, which resume
  from their checkpoints; after :data:`MAX_OUTAGES` restarts in a row with no job finished in between
  it records them as failed. (A local instance always starts the dashboard agent, even with
  ``include_dashboard=False`` or a minimal ``ray`` install, and its raylet dies with it.)
* An I/O error on the output folder (made unwritable, disk full: :func:`storage_fault`) is an outage, not
  a job's failure: the task returns it instead of raising (so Ray does not retry it at once), the driver
  stops launching jobs, cancels the queued ones, records nothing for them, keeps every checkpoint and ends
  with the summary and one line naming what failed and where (:attr:`SweepOutcome.outage`); rerunning the
  same command resumes.
* Running the same command again skips jobs already recorded "ok" and resumes interrupted ones.
* At the end it writes the plots, tables and ``report.html`` of :mod:`harness.report` into ``OUT``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pathlib
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from harness import checkpoint, report
from harness import plan as planning
from harness.analyze import analyze
from harness.core.errors import CheckpointError, ConfigError, HarnessError, SweepError
from harness.core.io import file_lock, make_folder, write_bytes_atomic, write_json_atomic
from harness.data import load_corpus
from harness.distributed import PARALLEL, RunOptions, check_devices, ray_module, start_ray, train_distributed
from harness.job import Job
from harness.lmeval.runner import evaluate_downstream
from harness.results import OK, PLAN_FILE, ResultsStore, failed_record, ok_record, one_line
from harness.tracking import DEFAULT_TRACKER
from harness.train import train_job

# What `python -m harness sweep` runs with neither --study nor --budget (harness/studies/quick.toml).
DEFAULT_STUDY = "quick"
STUDY_COPY = "study.toml"  # the study file a sweep ran, kept beside its results
DEFAULT_RETRIES = 2
WORKER_FILE = "worker.json"  # written by a running task into its job folder: pid, host, sweep token
OUTAGE = "outage"  # status of what a task returns on an output-folder fault; never stored in runs.jsonl
# errors of a write that say the storage is unusable (no permission, read-only, full, over quota, failing)
STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO}


def storage_fault(exc: OSError, root: str | os.PathLike) -> bool:
    """True for an OSError of the output folder ``root`` (a path under it, or a nameless write error such as
    ENOSPC from a file already open there), False for any other (a data source that cannot be read)."""
    if exc.filename is None:
        return exc.errno in STORAGE_ERRNOS
    path, top = pathlib.Path(os.path.abspath(exc.filename)), pathlib.Path(os.path.abspath(root))
    return path == top or top in path.parents


def _outage_line(exc: OSError) -> str:
    where = f" on {exc.filename}" if exc.filename else ""
    return f"{type(exc).__name__}{where}: {exc.strerror or exc}"


@dataclass
class SweepOptions:
    """How to run the planned jobs (the plan itself is a :class:`harness.plan.PlanRequest`)."""

    out: str
    address: str | None = None
    cpus: int | None = None  # CPUs of a local Ray instance (default: all cores)
    cpus_per_job: int = 1
    devices_per_job: int = 1  # > 1: each job on that many devices through Ray Train (harness.distributed)
    parallel: str = "ddp"  # ddp | fsdp, with devices_per_job > 1
    compile_blocks: bool = False  # every job's training blocks through torch.compile (harness.train.train_job)
    tracker: str = DEFAULT_TRACKER  # each job's training logs: tensorboard, wandb (offline) or none (harness.tracking)
    retries: int = DEFAULT_RETRIES
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    task_limit: int | None = None
    dry_run: bool = False
    yes: bool = False
    progress: bool = True
    reports: bool = True
    verbose: bool = False  # forward workers' logs to the driver
    study_text: str | None = None  # the study file's text, copied into the output folder

    def __post_init__(self) -> None:
        if self.devices_per_job < 1:
            raise ConfigError(f"--devices-per-job {self.devices_per_job}: must be at least 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"--parallel {self.parallel!r}: choose {' or '.join(PARALLEL)}")


@dataclass
class SweepOutcome:
    plan: planning.Plan
    ran: int = 0
    skipped: int = 0  # already recorded ok before this sweep
    ok: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    reports: list[str] = field(default_factory=list)
    outage: str | None = None  # what failed on the output folder, and where; the sweep stopped launching jobs
    not_run: int = 0  # jobs left for a rerun because of the outage


# ---------------------------------------------------------------------------------------------------
# one job (runs inside a Ray worker)


def _note_worker(folder: pathlib.Path, token: str) -> tuple[int, int | None]:
    """Write WORKER_FILE; return (attempt of this sweep, step of the checkpoint we resume from)."""
    attempt = 1
    marker = folder / WORKER_FILE
    try:
        previous = json.loads(marker.read_text())
        if previous.get("token") == token:
            attempt = int(previous.get("attempt", 0)) + 1
    except (OSError, ValueError):
        pass
    resumed_from = None
    if (folder / "checkpoint" / "state.json").exists() and not (folder / "result.json").exists():
        try:
            resumed_from = int(checkpoint.load_state(folder / "checkpoint")["step"])
        except (CheckpointError, KeyError, ValueError):  # damaged: train_job names the problem
            resumed_from = None
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                               "attempt": attempt, "started": time.time()})
    return attempt, resumed_from


def execute_job(job_dict: dict[str, Any], root: str, token: str, tasks: list[str], num_fewshot: int,
                task_limit: int | None, threads: int, devices: int = 1, parallel: str = "ddp",
                retries: int = 0, compile_blocks: bool = False, tracker: str = DEFAULT_TRACKER) -> dict[str, Any]:
    """Train (or resume, or reuse) one job, evaluate it downstream, append and return its record.

    ``devices`` > 1: the job trains through Ray Train on that many devices (``threads`` CPUs per CPU
    worker, ``retries`` restarts of its worker group). ``compile_blocks``: its blocks through torch.compile.
    ``tracker``: where its training logs go (:mod:`harness.tracking`; a job on several devices logs to TensorBoard).
    """
    torch.set_num_threads(max(1, threads))
    store = ResultsStore(root)
    job = Job.from_dict(job_dict)
    folder = store.job_dir(job.job_id())
    run = (RunOptions(devices, parallel, cpus_per_worker=threads, max_failures=retries,
                      compile_blocks=compile_blocks) if devices > 1 else None)
    try:
        with file_lock(folder / ".lock"):  # a killed sweep's worker may outlive its driver
            return _execute_locked(job, folder, store, token, tasks, num_fewshot, task_limit, run, compile_blocks,
                                   tracker)
    except OSError as exc:
        if not storage_fault(exc, root):
            raise
        # returned, not raised: Ray would retry it at once, and every retry would meet the same fault
        return {"job_id": job.job_id(), "status": OUTAGE, "error": _outage_line(exc)}


def token_analysis(folder: pathlib.Path) -> dict[str, Any]:
    """Where an adaptive job spent its steps, in the few numbers claim C3 needs (the rest stays on disk).

    :func:`harness.analyze.analyze` also writes its plot, table and summary into the job folder.
    """
    summary = analyze(folder)
    rare = summary["rare_vs_frequent"]
    return {"spearman_steps_nll": summary["spearman_steps_nll"]["rho"],
            "spearman_steps_nll_pvalue": summary["spearman_steps_nll"]["pvalue"],
            "rare_mean_steps": (rare.get("rare") or {}).get("steps_mean"),
            "frequent_mean_steps": (rare.get("frequent") or {}).get("steps_mean"),
            "rare_vs_frequent_pvalue": rare.get("pvalue"), "step_histogram": summary["step_histogram"]}


def _execute_locked(job, folder: pathlib.Path, store: ResultsStore, token: str, tasks: list[str], num_fewshot: int,
                    task_limit: int | None, run: RunOptions | None, compile_blocks: bool = False,
                    tracker: str = DEFAULT_TRACKER) -> dict[str, Any]:
    attempt, resumed_from = _note_worker(folder, token)
    extra = {"attempt": attempt, "resumed_from_step": resumed_from, "host": socket.gethostname()}
    try:
        if run is None:
            result = train_job(job, folder, progress=False, compile_blocks=compile_blocks, tracker=tracker)
        else:
            result = train_distributed(job, folder, run, progress=False)
    except HarnessError as exc:
        record = failed_record(job, one_line(exc), **extra)
        store.append(record)
        return record
    if "mean_extra_steps" in result and "token_analysis" not in result:
        try:
            result["token_analysis"] = token_analysis(folder)
            write_json_atomic(folder / "result.json", result)
        except HarnessError as exc:  # the trained model is still a result worth keeping
            extra["token_analysis_error"] = one_line(exc)
    missing = [t for t in tasks if t not in result.get("downstream", {})]
    if missing:
        try:
            scores = _downstream(folder, missing, num_fewshot, task_limit, run)
            result.setdefault("downstream", {}).update(scores)
            result["downstream_num_fewshot"], result["downstream_limit"] = num_fewshot, task_limit
            write_json_atomic(folder / "result.json", result)  # a rerun then finds the scores
        except Exception as exc:  # the trained model is still a result worth keeping
            extra["downstream_error"] = one_line(exc)
    record = ok_record(job, result, **extra)
    store.append(record)
    return record


def _lm_eval_in_ray(folder: pathlib.Path, tasks: list[str], num_fewshot: int, limit: int | None) -> dict[str, Any]:
    # lm-eval bootstraps standard errors in a fork()ed multiprocessing pool; fork() inside a Ray
    # worker (threads, signal handlers) deadlocks, so its documented switch makes it run serially
    os.environ["DISABLE_MULTIPROC"] = "1"
    return evaluate_downstream(folder, tasks, num_fewshot=num_fewshot, limit=limit, progress=False)


def _downstream(folder: pathlib.Path, tasks: list[str], num_fewshot: int, limit: int | None,
                run: RunOptions | None) -> dict[str, Any]:
    """The downstream scores, here (a one-device job's task holds its GPU) or, for a job trained on several
    devices (whose task holds nothing), in a task of its own with one GPU (or its CPUs)."""
    if run is None:
        return _lm_eval_in_ray(folder, tasks, num_fewshot, limit)
    ray = _ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    task = ray.remote(_lm_eval_in_ray).options(num_gpus=1 if gpus else 0, num_cpus=1 if gpus else run.cpus_per_worker)
    return ray.get(task.remote(folder, tasks, num_fewshot, limit))


# ---------------------------------------------------------------------------------------------------
# Ray


def _ray():
    return ray_module()


def _start_ray(options: SweepOptions) -> bool:
    """Connect to or start Ray; True if this call started it (and must shut it down). A local instance is
    started only after the agents an earlier, killed driver left behind are ended (:func:`end_orphaned_agents`)."""
    if not (options.address or os.environ.get("RAY_ADDRESS")) or options.address == "local":
        end_orphaned_agents()
    return start_ray(options.address, options.cpus, options.verbose)


ORPHAN_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _cmdline(pid: int) -> bytes:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int | None:
    try:
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def end_orphaned_agents() -> list[int]:
    """End the dashboard and runtime-env agents whose raylet is gone (Linux /proc; nothing elsewhere).

    A raylet starts both agents; when its driver is killed (SIGKILL: no chance to shut Ray down) they outlive
    it by a minute or two, holding memory and ports. An agent whose parent is no longer a raylet belongs to no
    running Ray instance, so ending it takes nothing from anyone. Returns the pids ended."""
    ended = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        if not any(_cmdline(pid).startswith(name.encode()) for name in ORPHAN_AGENTS):
            continue
        parent = _parent(pid)
        if parent is not None and b"raylet" not in _cmdline(parent):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
                ended.append(pid)
    return ended


def _cluster_slots(options: SweepOptions) -> tuple[int, int]:
    """(GPUs, jobs the cluster runs at once) of the Ray cluster."""
    resources = _ray().cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_device = 1 if gpus else options.cpus_per_job
    devices = gpus if gpus else int(resources.get("CPU", 1)) // per_device
    return gpus, max(1, devices // options.devices_per_job)


# ---------------------------------------------------------------------------------------------------
# the sweep


def _confirm(plan: planning.Plan, options: SweepOptions) -> None:
    hours = plan.wall_hours
    if hours <= planning.CONFIRM_HOURS or options.yes:
        return
    message = (f"budget {plan.request.budget:.3g} FLOPs needs ~{hours:,.0f} h of wall time on the hardware found "
               f"({plan.hardware.workers} worker(s), {plan.device_hours:,.0f} device-hours)")
    if sys.stdin is not None and sys.stdin.isatty():
        answer = input(f"{message}. Run it anyway? [y/N] ").strip().lower()
        if answer in ("y", "yes"):
            return
        raise SweepError("sweep not started; lower --budget, or pass --yes to run it anyway")
    raise SweepError(f"{message}; pass --yes to run it anyway, or lower --budget")


def _prepare_data(plan: planning.Plan, progress: bool) -> int | None:
    """Tokenise each distinct dataset once, here (workers then find the cache); the shared vocabulary size."""
    configs = {json.dumps(dataclasses.asdict(j.job.data), sort_keys=True): j.job.data for j in plan.jobs}
    sizes = set()
    for data in configs.values():
        if progress:
            print(f"data: preparing {data.source} (tokenizer {data.tokenizer})", file=sys.stderr, flush=True)
        try:
            sizes.add(load_corpus(data).tokenizer.vocab_size)
        except HarnessError as exc:  # its jobs fail and are recorded with this message; the others run
            print(f"warning: data {data.source}: {one_line(exc)}", file=sys.stderr, flush=True)
            return None
    return sizes.pop() if len(sizes) == 1 else None


def _finished(record: dict[str, Any] | None, tasks: list[str]) -> bool:
    return (record is not None and record.get("status") == OK
            and all(t in (record.get("downstream") or {}) for t in tasks))


def _running(pending: dict[Any, planning.PlannedJob], store: ResultsStore, token: str, slots: int) -> int:
    """Jobs of this sweep whose worker is alive, at most ``slots``: a job queued for a retry keeps the marker
    of its dead worker until a new one starts."""
    count, host = 0, socket.gethostname()
    for planned in pending.values():
        try:
            marker = json.loads((store.job_dir(planned.job_id) / WORKER_FILE).read_text())
        except (OSError, ValueError):
            continue
        count += marker.get("token") == token and (marker.get("host") != host or _pid_alive(marker.get("pid")))
    return min(count, slots)


def _pid_alive(pid: Any) -> bool:
    """A process ``pid`` of this host that has not exited (a zombie counts as exited)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # gone, or no /proc (not Linux): signal 0 asks the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def _failure_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause)
    return one_line(exc)


def _describe(record: dict[str, Any]) -> str:
    job = record.get("job", {})
    name = f"{record.get('method')}/{record.get('size')} seed {record.get('seed')}"
    variant = (record.get("tags") or {}).get("variant")
    if variant:
        name += f" [{variant}]"
    if record.get("status") == OK:
        text = f"ok      {name}: ppl {record.get('val_ppl', float('nan')):.2f} at " \
               f"{record.get('infer_flops_per_token', 0):.3g} FLOPs/token"
        if record.get("resumed_from_step"):
            text += f" (resumed from step {record['resumed_from_step']})"
        if record.get("downstream_error"):
            text += f"; downstream failed: {record['downstream_error']}"
        return text
    return f"FAILED  {name} ({job.get('budget', 0):.3g} FLOPs): {record.get('error')}"


def sweep(request: planning.PlanRequest, options: SweepOptions) -> SweepOutcome:
    """Plan, confirm, run every unfinished job on Ray, record, report. See the module docstring."""
    started = time.time()
    store = ResultsStore(options.out)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if options.progress else (lambda text: None)
    remote = bool(options.address or os.environ.get("RAY_ADDRESS")) and options.address != "local"
    we_started = False
    # the plan estimates the jobs as they will run (hours and memory on N devices)
    request = dataclasses.replace(request, devices_per_job=options.devices_per_job, parallel=options.parallel)
    try:
        hardware = None
        if remote and not options.dry_run:
            we_started = _start_ray(options)
            gpus, slots = _cluster_slots(options)
            if gpus and not request.gpu:
                probe = _ray().remote(num_gpus=1)(_probe_hardware)
                hardware = _ray().get(probe.remote(request))
            devices = slots * options.devices_per_job  # the plan's workers are devices; it divides them by N
            hardware = dataclasses.replace(hardware, workers=devices) if hardware else None
            request = dataclasses.replace(request, workers=request.workers or devices)
        plan = planning.make_plan(request, hardware)
        print(planning.format_plan(plan), flush=True)
        for planned in plan.jobs:  # a batch that does not split over the devices fails before anything runs
            check_devices(planned.job.train, options.devices_per_job)
        outcome = SweepOutcome(plan)
        if options.dry_run:
            return outcome
        _confirm(plan, options)
        if not remote:
            vocab = _prepare_data(plan, options.progress)
            if vocab is not None and vocab != plan.vocab_size:  # count with the tokenizer's real size
                plan = planning.make_plan(dataclasses.replace(request, vocab_size=vocab), plan.hardware)
                outcome.plan = plan
        latest = _open_output(store, plan, options)
        todo = [j for j in plan.jobs if not _finished(latest.get(j.job_id), options.tasks)]
        outcome.skipped = len(plan.jobs) - len(todo)
        if outcome.skipped:
            say(f"{outcome.skipped} job(s) already recorded in {store.path}; skipped")
        if todo:
            if not we_started:
                we_started = _start_ray(options)
            we_started = _run_jobs(todo, store, options, outcome, say) or we_started
    except KeyboardInterrupt:
        say(f"interrupted: finished jobs are in {store.path}; rerun the same command to resume the others")
        raise
    finally:
        if we_started:
            _shutdown_ray()
    _write_reports(store, options, outcome, say)
    outcome.wall_seconds = time.time() - started
    return outcome


def _open_output(store: ResultsStore, plan: planning.Plan, options: SweepOptions) -> dict[str, dict[str, Any]]:
    """Create the output folder, write the plan (and study) into it; the records it holds already."""
    make_folder(store.root, "--out")  # after the confirmation: a sweep that stops leaves nothing behind
    try:
        write_json_atomic(store.root / PLAN_FILE, plan.to_dict())
        if options.study_text is not None:
            write_bytes_atomic(store.root / STUDY_COPY, options.study_text.encode("utf-8"))
        return store.latest()
    except OSError as exc:  # before any job: nothing to keep, so one line and no summary
        raise SweepError(f"the output folder failed ({_outage_line(exc)}); fix it (permissions, free space) "
                         "or choose another --out, then run the same command") from None


def _write_reports(store: ResultsStore, options: SweepOptions, outcome: SweepOutcome, say) -> None:
    """The plots, tables and claims; none after an outage (the folder cannot take them; the caller says so)."""
    if options.reports and store.path.exists() and not outcome.outage:
        try:
            outcome.reports = [str(p) for p in report.write_reports(store.root)]
        except Exception as exc:  # the results are safe in runs.jsonl; the report can be redone
            say(f"warning: could not write the reports ({one_line(exc)}); "
                f"run `python -m harness plot/table {store.root}`")


def _probe_hardware(request: planning.PlanRequest) -> planning.Hardware:
    """Runs on a GPU worker of a cluster: the same probe ``plan`` makes locally."""
    scale = planning.SCALES["pythia"]
    train = planning._train_config(scale, scale.sizes[0])
    return planning.detect_hardware(scale, train, scale.vocab_size, mfu=request.mfu)


# Ray's own failures: the job did nothing wrong, so they must not use up its --retries (a dead raylet
# fails every running and queued task within a second, each retry included). A crashed worker is the
# job's failure (an OOM kill, a segfault) unless the cluster lost a node at the same time.
RAY_FAULTS = ("LocalRayletDiedError", "NodeDiedError", "RaySystemError", "ObjectLostError", "RpcError")
MAX_OUTAGES = 5  # Ray restarts in a row without a job finishing in between, before the jobs are failed
OUTAGE_BACKOFF = 2.0  # seconds before the first restart; doubled for each further one in a row


def _alive_nodes() -> set[str] | None:
    try:
        return {n["NodeID"] for n in _ray().nodes() if n.get("Alive")}
    except Exception:  # the GCS itself is gone
        return None


def _is_ray_fault(exc: BaseException, nodes: set[str] | None) -> bool:
    """True for a failure of Ray (a dead raylet or node, a lost object), False for the job's own."""
    ray = _ray()
    if isinstance(exc, ray.exceptions.RayTaskError):  # raised by the job's code
        return False
    faults = tuple(getattr(ray.exceptions, name) for name in RAY_FAULTS if hasattr(ray.exceptions, name))
    if isinstance(exc, faults):
        return True
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        alive = _alive_nodes()
        return alive is None or (nodes is not None and not nodes <= alive)
    return False


def _local_node():
    """The Ray node this process started (a local instance), or None (a joined cluster, Ray not started)."""
    try:  # Ray's private handle on the processes it started: the only record of their pids
        from ray._private import worker

        node = worker._global_node
    except ImportError:
        return None
    return node if node is not None and node.head else None


def _gcs_dead() -> bool:
    """True when the GCS (head process) of the local instance this process started has exited. Ray's client
    would wait 60 s for it, then end the driver with no summary; the sweep sees it at its next poll and restarts
    Ray as after a dead raylet. (A cluster's GCS runs elsewhere: its loss surfaces as a RayError instead.)"""
    from ray._private import ray_constants

    node = _local_node()
    processes = node.all_processes.get(ray_constants.PROCESS_TYPE_GCS_SERVER, []) if node is not None else []
    return any(info.process.poll() is not None for info in processes)


def _descendants(root: int) -> list[int]:
    """Pids of the live descendants of process ``root`` (Linux /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _shutdown_ray() -> None:
    """Shut Ray down, then end what the local instance's raylet started and left running (its dashboard and
    runtime-env agents outlive a raylet whose GCS died by a minute or two, holding memory and ports)."""
    from ray._private import ray_constants

    node = _local_node()
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) if node is not None else []
    leftovers = [pid for info in raylets for pid in [info.process.pid, *_descendants(info.process.pid)]]
    with contextlib.suppress(Exception):  # already half gone
        _ray().shutdown()
    for pid in leftovers:  # processes of the instance this sweep started: nobody else's
        if _pid_alive(pid) and _is_ray_process(pid):  # and still Ray's: a pid freed meanwhile may be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)


def _is_ray_process(pid: int) -> bool:
    """Process ``pid`` runs Ray's code (raylet, ray::DashboardAgent, ray::RuntimeEnvAgent, a Ray worker)."""
    return b"ray" in _cmdline(pid)


def _restart_ray(options: SweepOptions, outages: int) -> None:
    """Back off, then start the local instance afresh (or join the cluster again)."""
    _shutdown_ray()
    time.sleep(OUTAGE_BACKOFF * 2 ** (outages - 1))
    _start_ray(options)


def _run_jobs(todo: list[planning.PlannedJob], store: ResultsStore, options: SweepOptions, outcome: SweepOutcome,
              say) -> bool:
    """Run the jobs, restarting Ray after its own failures; True if this restarted (and so owns) Ray."""
    token = uuid.uuid4().hex
    bar = tqdm(total=len(todo), desc="sweep", unit="job", dynamic_ncols=True, disable=not options.progress,
               file=sys.stderr)
    queue, outages, restarted = list(todo), 0, False
    try:
        while queue:
            done_before = outcome.ran
            lost, fault = _run_round(queue, store, options, outcome, say, token, bar)
            if not lost or outcome.outage:
                outcome.not_run += len(lost)
                break
            outages = 1 if outcome.ran > done_before else outages + 1
            if outages > MAX_OUTAGES:
                for planned in lost:
                    _collect(failed_record(planned.job, f"Ray failed {MAX_OUTAGES} times in a row: {fault}"),
                             store, outcome, bar)
                break
            say(f"Ray failed ({fault}); restarting it and resuming {len(lost)} job(s) from their checkpoints "
                "(this does not count against --retries)")
            _restart_ray(options, outages)
            queue, restarted = lost, True
    finally:
        bar.close()
    return restarted


def _collect(record: dict[str, Any], store: ResultsStore, outcome: SweepOutcome, bar) -> bool:
    """Record a finished job; False (and ``outcome.outage`` set) if runs.jsonl cannot be written."""
    try:
        store.append(record)  # the worker appended ok records already: this is then a no-op
    except OSError as exc:
        if not storage_fault(exc, store.root):
            raise
        outcome.outage = outcome.outage or _outage_line(exc)
        return False
    outcome.ran += 1
    if record.get("status") == OK:
        outcome.ok += 1
    else:
        outcome.failed += 1
    bar.write(_describe(record), file=sys.stderr)
    bar.update(1)
    return True


def _store(record: dict[str, Any], store: ResultsStore, outcome: SweepOutcome, bar) -> bool:
    """Collect a job's record; False on an outage of the output folder (the task's or runs.jsonl's)."""
    if record.get("status") == OUTAGE:
        outcome.outage = outcome.outage or record["error"]
        return False
    return _collect(record, store, outcome, bar)


def _stop_launching(first: bool, pending: dict[Any, planning.PlannedJob], waiting: list[planning.PlannedJob],
                    lost: list[planning.PlannedJob], outcome: SweepOutcome, say) -> None:
    """On the first outage: submit nothing more and cancel what is pending (they would meet the same fault)."""
    if not first:
        return
    say(f"the output folder failed ({outcome.outage}); stopping: no new jobs, the others cancelled")
    lost.extend(waiting)
    waiting.clear()
    for other in pending:
        _ray().cancel(other)  # queued: never starts; running: stops, its last checkpoint stays


def _run_round(queue: list[planning.PlannedJob], store: ResultsStore, options: SweepOptions, outcome: SweepOutcome,
               say, token: str, bar) -> tuple[list[planning.PlannedJob], str]:
    """Submit the queue and collect it; return the jobs lost to a failure of Ray, and its message."""
    ray = _ray()
    gpus, slots = _cluster_slots(options)
    nodes = _alive_nodes()
    devices = options.devices_per_job
    if devices > 1:  # the trainer's workers hold the devices and restart themselves (FailureConfig)
        task = ray.remote(execute_job).options(num_cpus=0, num_gpus=0, max_retries=0)
        each = f"{devices} {'GPUs' if gpus else f'x {options.cpus_per_job} CPU'} per job, {options.parallel}"
    else:
        task = ray.remote(execute_job).options(
            num_cpus=options.cpus_per_job, num_gpus=1 if gpus else 0, max_retries=options.retries,
            retry_exceptions=True)
        each = f"{'1 GPU' if gpus else f'{options.cpus_per_job} CPU'} per job"
    say(f"running {len(queue)} job(s) on Ray: {slots} at once ({each}); results -> {store.path}")
    root = str(store.root.resolve())  # workers may run elsewhere (a cluster's working_dir): no relative paths
    waiting = list(queue)
    # one-device tasks queue in Ray for their resources; a several-device job's task reserves nothing, so
    # only as many are submitted as can train at once (the others would only wait, each holding a process)
    limit = slots if devices > 1 else len(waiting)

    def submit() -> None:
        while waiting and len(pending) < limit:
            planned = waiting.pop(0)
            ref = task.remote(planned.job.to_dict(), root, token, options.tasks, options.num_fewshot,
                              options.task_limit, options.cpus_per_job, devices, options.parallel, options.retries,
                              options.compile_blocks, options.tracker)
            pending[ref] = planned

    pending: dict[Any, planning.PlannedJob] = {}
    submit()
    lost: list[planning.PlannedJob] = []
    fault, shown = "", None
    while pending:
        try:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        except ray.exceptions.RayError as exc:  # the driver lost its raylet or the GCS
            return lost + list(pending.values()) + waiting, one_line(exc)
        if _gcs_dead():  # every job still pending is lost with it: resumed from its checkpoint after a restart
            return lost + list(pending.values()) + waiting, "Ray's GCS (its head process) died"
        for ref in ready:
            planned = pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries exhausted (crash, kill, unexpected error)
                if outcome.outage:  # a queued job cancelled below: left for the rerun
                    lost.append(planned)
                    continue
                if _is_ray_fault(exc, nodes):
                    lost.append(planned)
                    fault = _failure_message(exc)
                    continue
                record = failed_record(planned.job, _failure_message(exc), attempt=options.retries + 1)
            first = not outcome.outage
            if not _store(record, store, outcome, bar):  # an outage: this job and the others wait for a rerun
                lost.append(planned)
                _stop_launching(first, pending, waiting, lost, outcome, say)
        submit()
        counts = {"done": outcome.ok, "running": _running(pending, store, token, slots), "failed": outcome.failed}
        if counts != shown:  # redraw on change only: a log file gets one line per change, not per poll
            bar.set_postfix(counts, refresh=True)
            shown = counts
    return lost, fault
