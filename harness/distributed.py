"""One job on several devices: data-parallel (DDP) or sharded (FSDP2) training through Ray Train.

``harness train --devices N [--parallel ddp|fsdp]`` and ``sweep --devices-per-job N`` (docs/design.md,
"Running and scale"). N = 1 is :func:`harness.train.train_job`, in this process, without Ray.

* **Launch.** Ray Train V2's ``TorchTrainer`` starts N workers (one GPU each where the Ray cluster has
  GPUs, else ``cpus_per_worker`` CPUs and the gloo backend) and sets up their process group; nothing
  here launches processes or builds process groups. Each worker runs the step loop of
  :func:`harness.train.run_steps` with a :class:`~harness.train.Placement` of this module.
* **DDP** (:class:`DataParallel`): ``ray.train.torch.prepare_model`` wraps the model; gradients are
  averaged over ranks once per step (``no_sync`` on all micro-batches but the last).
* **FSDP2** (:class:`Sharded`): ``torch.distributed.fsdp.fully_shard`` on every block of
  ``model.decoder.layers``, then on the root, with the mesh of ``init_device_mesh`` passed explicitly,
  as torchtitan's ``apply_fsdp`` does (``prepare_model(parallel_strategy="fsdp")`` would be the older
  FSDP1). Gradients are reduce-scattered after every micro-batch, so they stay sharded; parameters are
  fp32 under the same bf16 autocast as the single-process run.
* **The job does not depend on N.** Devices and strategy are run options, not fields of the
  :class:`~harness.job.Job`, so N changes neither its id nor its folder. The global batch
  (``train.batch_size x train.grad_accum`` sequences), tokens, budget and learning-rate schedule are the
  job's. Every micro-batch of ``batch_size`` sequences is drawn whole from (seed, step, micro-batch) and
  rank r trains rows ``[r B/N, (r+1) B/N)`` of it (so ``batch_size`` must be divisible by N); each rank
  runs all ``grad_accum`` micro-batches of a step and re-seeds torch's RNG from (seed, step) as the
  single process does, so every rank draws the same random numbers (PonderLM-2/3's Jacobi pass count J
  per micro-batch) in the same order as a one-device run. Losses and stats are averaged over ranks (equal
  shares: the mean of the rank means is the global mean), the compute ledger is summed over ranks (rank 0
  carries the totals of earlier attempts). A loss whose value depends on the whole batch at once (MoR's
  token-choice balancing loss) is computed per rank, as under any DDP.
* **Checkpoints** stay in the job folder (``DIR/checkpoint``), which every run of the job (any N,
  a sweep) resumes from; Ray's own checkpoint registry is not used. DDP: rank 0 writes the
  single-process layout. FSDP: every rank writes its shards (:func:`harness.checkpoint.save_sharded`,
  torch.distributed.checkpoint with safetensors files); the last checkpoint is consolidated on rank 0
  into the single-process layout, which ``harness eval``, ``export`` and the lm-eval model read
  (``harness eval`` also reads a sharded one directly). Either layout resumes at any N.
* **Failures.** A worker that dies makes Ray restart every worker (``FailureConfig(max_failures)``),
  and they resume from the last checkpoint. An error the user must fix (a :class:`HarnessError`: NaN
  loss, corrupt checkpoint) is raised on every rank at once; it is returned to the driver and raised
  there, without a retry. A finished job is not run again.
* **Evaluation** runs on rank 0 after training (DDP: the trained module; FSDP: a plain model loaded from
  the consolidated checkpoint), on its device.
* **Test hook.** ``HARNESS_FAULT_AT=STEP[:RANK]`` in the driver's environment makes the worker of rank
  RANK (default 1) write ``DIR/fault_injected.json`` and call ``os._exit(1)`` at the start of step STEP of
  an attempt that started from step 0, so a restarted attempt (which resumes from a checkpoint) runs
  through (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from harness import checkpoint
from harness.core import compute, errors
from harness.core.errors import ConfigError, HarnessError, SweepError
from harness.core.io import make_folder, remove_if_empty, write_json_atomic
from harness.data import load_corpus
from harness.job import Job, TrainConfig, make_model
from harness.train import Placement, claim_folder, finished_result, prepare, run_steps, total_steps

PARALLEL = ("ddp", "fsdp")
DEFAULT_MAX_FAILURES = 2  # worker-group restarts of one job (``sweep --retries`` sets it in a sweep)
FAULT_ENV = "HARNESS_FAULT_AT"  # test hook: see the module docstring
FAULT_MARKER = "fault_injected.json"  # written by the test hook before the worker dies
RAY_FOLDER = "ray"  # Ray Train's run state inside the job folder, removed once the job has trained


@dataclass
class RunOptions:
    """How a job runs on several devices; not part of the job (see the module docstring)."""

    devices: int = 2
    parallel: str = "ddp"
    address: str | None = None  # Ray cluster to join (default: RAY_ADDRESS, else a local instance)
    cpus_per_worker: int = 1  # CPU workers: CPUs (and torch threads) per worker
    max_failures: int = DEFAULT_MAX_FAILURES
    verbose: bool = False  # forward Ray's logs
    compile_blocks: bool = False  # every rank's training blocks through torch.compile (harness.train.run_steps)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices {self.devices}: must be at least 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"--parallel {self.parallel!r}: choose {' or '.join(PARALLEL)}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"CPUs per worker {self.cpus_per_worker}: must be at least 1")


def check_devices(train: TrainConfig, devices: int) -> None:
    """A ConfigError unless every micro-batch splits evenly over ``devices`` ranks."""
    if devices > 1 and train.batch_size % devices:
        raise ConfigError(f"train.batch_size={train.batch_size} (sequences per micro-batch, split across the "
                          f"devices) is not divisible by {devices} devices; set train.batch_size to a multiple of "
                          f"{devices} (the global batch is batch_size x grad_accum sequences)")


# ---------------------------------------------------------------------------------------------------
# the placements: what one rank does differently from the single-process run


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class _Rank(Placement):
    def __init__(self, rank: int, world: int, device: torch.device, fault: tuple[int, int] | None = None,
                 marker: pathlib.Path | None = None):
        self.rank, self.world, self._device = rank, world, device
        self._fault, self._marker = fault, marker

    def device(self, cfg: TrainConfig) -> torch.device:
        return self._device  # Ray's: cuda:<local rank> on a GPU worker, else cpu

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world for v in _all_reduce(values, self._device)]

    def totals(self, totals: compute.LedgerTotals) -> compute.LedgerTotals:
        names = [f.name for f in dataclasses.fields(totals)]
        summed = _all_reduce([getattr(totals, n) for n in names], self._device)
        return compute.LedgerTotals(**dict(zip(names, summed)))

    def before_step(self, step: int, start_step: int) -> None:
        if self._fault is not None and start_step == 0 and (step, self.rank) == self._fault:
            if self._marker is not None:
                write_json_atomic(self._marker, {"step": step, "rank": self.rank, "pid": os.getpid()})
            os._exit(1)  # the test hook: a worker dies as a crash would, without cleanup


class DataParallel(_Rank):
    """DDP: every rank holds the whole model; rank 0 writes the single-process checkpoint layout."""

    strategy = "ddp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def micro_batch(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else model.no_sync()  # one all-reduce per step

    def save(self, folder: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], last: bool) -> None:
        import torch.distributed as dist

        if self.rank == 0:
            checkpoint.save(folder, model.module, optimizer, state)
        dist.barrier()  # no rank runs ahead of a checkpoint that a restart would resume from

    def load(self, folder: pathlib.Path, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return checkpoint.load(folder, model.module, optimizer)

    def evaluation_model(self, model: torch.nn.Module, rebuild) -> torch.nn.Module:
        return model.module


class Sharded(_Rank):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks; sharded checkpoints."""

    strategy = "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self._device.type, (self.world,))
        for block in model.decoder.layers:  # every method's blocks (models/base.py: LanguageModel.decoder)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, head, norms, a method's own parameters
        return model

    def clip(self, model: torch.nn.Module, max_norm: float) -> float:
        """The global norm over every shard (torchtitan's ``clip_grad_norm_``, made whole before clipping)."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm.item()

    def save(self, folder: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], last: bool) -> None:
        if last:  # what eval, export and lm-eval read; a finished job needs no optimizer state
            checkpoint.save_consolidated(folder, model, state)
        else:
            checkpoint.save_sharded(folder, model, optimizer, state)

    def evaluation_model(self, model: torch.nn.Module, rebuild) -> torch.nn.Module:
        return rebuild() if self.rank == 0 else model


# ---------------------------------------------------------------------------------------------------
# the worker (one per device, started by Ray Train)


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's training function: one rank of the job; rank 0 returns the result or the user error."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(config["threads"])
    fault = tuple(config["fault"]) if config["fault"] else None
    out = pathlib.Path(config["out"])
    placement = (Sharded if config["parallel"] == "fsdp" else DataParallel)(rank, world, device, fault,
                                                                           out / FAULT_MARKER)
    job = Job.from_dict(config["job"])
    try:
        result = run_steps(job, out, prepare(job), placement, config["downstream"], config["started"],
                           progress=False, compile_blocks=config["compile_blocks"])
    except HarnessError as exc:  # raised on every rank alike (the loop reduces before it decides)
        return {"error": type(exc).__name__, "message": str(exc)} if rank == 0 else None
    return {"result": result} if rank == 0 else None


def _fault_from_env() -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    step, _, rank = spec.partition(":")
    return int(step), int(rank or 1)


# ---------------------------------------------------------------------------------------------------
# the driver


def train_distributed(job: Job, out: str | os.PathLike, options: RunOptions, progress: bool = True,
                      force: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) ``job`` on ``options.devices`` devices.

    Validates and claims the folder here (as :func:`harness.train.train_job` does), then starts the
    workers through Ray Train (joining the Ray instance of a sweep's task when there is one).
    """
    out = pathlib.Path(out)
    finished = finished_result(job, out, force)
    if finished is not None:
        return finished
    check_devices(job.train, options.devices)
    remove_if_empty(make_folder(out, "job folder"), out)
    started = time.time()
    corpus = load_corpus(job.data)  # tokenised once, here: the workers find the cache
    with torch.device("meta"):  # the step count needs the method's FLOPs per token, not its weights
        shape = make_model(job, corpus.tokenizer.vocab_size)
    total_steps(job, shape.train_flops_per_token(job.train.seq_len), len(corpus.train))
    # Ray first: a cluster that cannot be joined fails before job.json and tokenizer.json are written
    with ray_session(options.address, options.devices * options.cpus_per_worker, options.verbose):
        previous = claim_folder(job, out, force, corpus)
        returned = _fit(job, out, options, previous.get("downstream"), started, progress)
    if "error" in returned:
        raise getattr(errors, returned["error"], HarnessError)(returned["message"])
    return returned["result"]


def _use_gpu(train: TrainConfig) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if train.device.startswith("cuda") and not gpus:
        raise ConfigError(f"TrainConfig.device={train.device!r}: the Ray cluster has no GPU; use device=auto or cpu")
    return bool(gpus) and train.device != "cpu"


def _fit(job: Job, out: pathlib.Path, options: RunOptions, downstream: dict[str, Any] | None, started: float,
         progress: bool) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = _use_gpu(job.train)
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": options.cpus_per_worker}
    config = {"job": job.to_dict(), "out": str(out.resolve()), "parallel": options.parallel,
              "threads": options.cpus_per_worker, "downstream": downstream, "started": started,
              "fault": _fault_from_env(), "compile_blocks": options.compile_blocks}
    storage = out.resolve() / RAY_FOLDER  # on a cluster the job folder is on storage every node sees
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=options.devices, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{job.job_id()}-{uuid.uuid4().hex[:8]}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=options.max_failures)))
    if progress:
        kind = "GPU" if use_gpu else f"{options.cpus_per_worker}-CPU gloo"
        print(f"{job.method}/{job.size}: training on {options.devices} {kind} workers ({options.parallel}) "
              "through Ray Train", file=sys.stderr, flush=True)
    returned = trainer.fit().return_value
    shutil.rmtree(storage, ignore_errors=True)  # Ray's run state; the checkpoint and metrics are the job's own
    if not isinstance(returned, dict):
        raise RuntimeError(f"Ray Train returned no result for {job.method}/{job.size} ({returned!r}); rerun to "
                           "resume it from its checkpoint")
    return returned


# ---------------------------------------------------------------------------------------------------
# Ray


def ray_module():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray


def _project_root() -> pathlib.Path | None:
    root = pathlib.Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else None


CONNECT_TIMEOUT_ENV = "HARNESS_RAY_CONNECT_TIMEOUT"  # seconds to reach a cluster's head before giving up
DEFAULT_CONNECT_TIMEOUT = 30.0


def connect_timeout() -> float:
    """Seconds :func:`start_ray` waits for a cluster's head (``HARNESS_RAY_CONNECT_TIMEOUT``, default 30)."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_CONNECT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={text!r}: must be a positive number of seconds")
    return value


def _wait_for_head(address: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for the head's GCS port to accept a TCP connection; a SweepError if it never does.

    ray.init(address=...) retries an unreachable GCS without end inside Ray's C++ client (no Python signal
    reaches it), so the address is probed first; ``auto`` and addresses without a port are left to Ray.
    """
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    deadline, reason = time.monotonic() + timeout, ""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if left <= 0.5:
            break
        time.sleep(0.5)  # a head that is still starting comes up within the timeout
    raise SweepError(f"cannot reach the Ray cluster at {address} within {timeout:g} s ({reason}); check the address "
                     f"(`ray status` on the head node), or raise {CONNECT_TIMEOUT_ENV} if the head is slow to start")


def start_ray(address: str | None, cpus: int | None, verbose: bool) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``) or start a local instance with ``cpus`` CPUs
    (default: all cores); True if this call started or joined it (and must shut it down)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.ERROR}
    if address and address != "local":
        env = {k: v for k, v in os.environ.items() if k.startswith(("HARNESS_", "HF_", "TOKENIZERS_"))}
        runtime_env: dict[str, Any] = {"env_vars": env}
        root = _project_root()
        if root is not None:  # a checkout: ship it so every node imports the same code
            runtime_env["working_dir"] = str(root)
            runtime_env["excludes"] = [".git", ".venv", ".tox", "results", "**/__pycache__", "*.safetensors"]
        _wait_for_head(address, connect_timeout())
        try:
            ray.init(address=address, runtime_env=runtime_env, **kwargs)
        except (ConnectionError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise SweepError(f"cannot join the Ray cluster at {address} ({detail}); check the address "
                             "(`ray status` on the head node) and, if the cluster uses token authentication, "
                             "RAY_AUTH_MODE=token with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
    else:
        ray.init(num_cpus=cpus or os.cpu_count() or 1, **kwargs)
    return True


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int | None, verbose: bool) -> Iterator[None]:
    """Ray for the duration of the block: the running instance (a sweep's task, a test session), else one
    started (or joined) here and shut down after. One Ray instance per host: never a second one."""
    started = start_ray(address, max(cpus or 1, os.cpu_count() or 1), verbose)
    try:
        yield
    finally:
        if started:
            ray_module().shutdown()


__all__ = ["CONNECT_TIMEOUT_ENV", "DEFAULT_MAX_FAILURES", "FAULT_ENV", "FAULT_MARKER", "PARALLEL", "DataParallel",
           "RunOptions", "Sharded", "check_devices", "connect_timeout", "ray_module", "ray_session", "start_ray",
           "train_distributed"]
