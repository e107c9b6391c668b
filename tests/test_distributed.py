"""One job on several devices (harness/distributed.py): Ray Train workers on CPU (gloo) against one process.

Ray starts once per test session (tests/conftest.py, ``ray_instance``). Each Ray Train run costs the start of a
worker group (10-20 s on 2 cores), so the runs are module fixtures that several tests compare: one 2-job sweep
with ``devices_per_job=2`` (vanilla and PonderLM-3, DDP), the same jobs in one process, and the PonderLM-3 job
with FSDP; the killed-worker test adds one FSDP run whose worker dies. Jobs are pico-sized (PonderLM-3 with
K=2), 9 steps of 4 x 32 tokens.

Tolerance of "equal" across numbers of workers (:data:`REL_TOL`): every logged loss and the validation loss agree
to 1e-5 relative. Two workers average two half-batch gradients where one process sums the whole batch, and
log the mean of two half-batch mean losses: the same numbers added in another order, which differs in float32
by ~1e-7 relative per reduction and grows little over 9 AdamW steps (measured here: 1.1e-7 for DDP and for
FSDP). A real fault (another batch, another Jacobi pass count J, unsynchronised gradients) moves the
loss by 1e-3 or more. The compute ledger counts integers, so its FLOPs agree exactly; a resumed run repeats
the unbroken run at the same N exactly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from harness import checkpoint
from harness.core import registry
from harness.core.errors import ConfigError, StudyError, TrainingError
from harness.data import DataConfig
from harness.distributed import FAULT_ENV, FAULT_MARKER, RunOptions, Sharded, check_devices, train_distributed
from harness.job import Job, TrainConfig, load_job
from harness.plan import Hardware, planning, study
from harness.plan.hardware import job_hours, memory_per_device, suggest_devices
from harness.results import ResultsStore
from harness.sweep import SweepOptions, sweep
from harness.train import build_optimizer, train_job

REL_TOL = 1e-5  # see the module docstring
# train.device=cpu: CPU workers (gloo) even where Ray finds a GPU, as in CI. Vanilla takes its 4 sequences per
# step as 2 micro-batches of 2 (one row per rank each), so DDP's gradient accumulation (no_sync) is covered.
TINY = ["data.vocab_size=512", "train.seq_len=32", "train.batch_size=4", "train.checkpoint_every=4",
        "train.log_every=1", "train.eval_tokens=1024", "train.device=cpu", "ponderlm3:latent_steps=2",
        "vanilla:train.batch_size=2", "vanilla:train.grad_accum=2"]
BUDGET = 4.7e9  # the tokens protocol: 9 steps for both methods at pico


def _curve(folder):
    """Every metrics line's training or learning-curve loss, in order."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line.get("loss", line.get("val_loss")) for line in lines]


def _close(a, b, rel=REL_TOL):
    assert len(a) == len(b) and a and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)), (a, b)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, small_corpus, ray_instance):
    """A 2-job sweep, each job on 2 CPU workers (DDP), on the session's Ray instance; and its Ray node."""
    ray = ray_instance()
    node = ray.get_runtime_context().get_node_id()
    out = tmp_path_factory.mktemp("swept") / "sweep"
    request = planning.PlanRequest(budget=BUDGET, methods=["vanilla", "ponderlm3"], sizes=["pico"], match="tokens",
                                   overrides=[f"data.source={small_corpus}", *TINY])
    outcome = sweep(request, SweepOptions(out=str(out), progress=False, reports=False, devices_per_job=2,
                                          parallel="ddp", retries=1))
    return {"out": out, "outcome": outcome, "request": request, "node": node,
            "jobs": {j.method: j.job for j in outcome.plan.jobs}}


@pytest.fixture(scope="module")
def single(swept, tmp_path_factory):
    """The sweep's jobs trained in one process: the reference every multi-worker run is compared with."""
    root = tmp_path_factory.mktemp("single")
    return {method: (train_job(job, root / method, progress=False), root / method)
            for method, job in swept["jobs"].items()}


@pytest.fixture(scope="module")
def fsdp(swept, tmp_path_factory):
    """The PonderLM-3 job on 2 CPU workers with FSDP2: its blocks run several times per step (Jacobi passes)."""
    folder = tmp_path_factory.mktemp("fsdp") / "ponderlm3"
    return train_distributed(swept["jobs"]["ponderlm3"], folder, RunOptions(devices=2, parallel="fsdp"),
                             progress=False), folder


def _swept_job(swept, method):
    job = swept["jobs"][method]
    folder = swept["out"] / "jobs" / job.job_id()
    return json.loads((folder / "result.json").read_text()), folder


def test_two_job_sweep_with_two_devices_per_job_finishes_on_one_ray_instance(swept, ray_instance):
    outcome = swept["outcome"]
    assert (outcome.ok, outcome.failed, outcome.skipped) == (2, 0, 0)
    ray = ray_instance()
    assert ray.get_runtime_context().get_node_id() == swept["node"]  # the session's instance, still up
    records = {r["method"]: r for r in ResultsStore(swept["out"]).records()}
    assert set(records) == {"vanilla", "ponderlm3"}
    for method, record in records.items():
        assert (record["devices"], record["parallel"]) == (2, "ddp")
        assert record["job_id"] == swept["jobs"][method].job_id()  # the number of devices is not part of the job
        assert not (swept["out"] / "jobs" / record["job_id"] / "ray").exists()  # Ray's run state is cleaned up
    again = sweep(swept["request"], SweepOptions(out=str(swept["out"]), progress=False, reports=False,
                                                 devices_per_job=2))
    assert (again.skipped, again.ran) == (2, 0)  # a rerun of finished jobs does nothing


def test_two_worker_ddp_curve_equals_one_worker(swept, single):
    got, folder = _swept_job(swept, "vanilla")
    ref, ref_folder = single["vanilla"]
    _close(_curve(folder), _curve(ref_folder))
    _close([got["val_loss"]], [ref["val_loss"]])
    # the ledger sums both ranks: the same FLOPs as one process, within 2% of the budget
    assert got["train_flops"] == ref["train_flops"] and got["train_steps"] == ref["train_steps"] == 9
    assert abs(got["train_flops"] / got["budget"] - 1) < 0.02
    # rank 0 wrote the one-process checkpoint layout
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {"model.safetensors", "optimizer.safetensors",
                                                                   "state.json"}


def test_ponderlm3_on_two_workers_matches_one(swept, single):
    """Every rank re-seeds torch's RNG from (seed, step) and draws J per micro-batch in the same order, so the
    two workers take the Jacobi pass counts one process takes; a desynchronised J would change the FLOPs."""
    got, folder = _swept_job(swept, "ponderlm3")
    ref, ref_folder = single["ponderlm3"]
    _close(_curve(folder), _curve(ref_folder))
    _close([got["val_loss"], got["mean_extra_steps"]], [ref["val_loss"], ref["mean_extra_steps"]])
    assert got["train_flops"] == ref["train_flops"]


def test_fsdp2_equals_ddp_and_its_last_checkpoint_is_consolidated(swept, fsdp):
    result, folder = fsdp
    ddp, ddp_folder = _swept_job(swept, "ponderlm3")
    _close(_curve(folder), _curve(ddp_folder))
    _close([result["val_loss"]], [ddp["val_loss"]])
    assert result["train_flops"] == ddp["train_flops"] and result["parallel"] == "fsdp"
    # the last checkpoint is the one-process layout (no optimizer: the job is finished), which eval reads
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {"model.safetensors", "state.json"}
    assert "format" not in checkpoint.load_state(folder / "checkpoint")
    _, model, _ = load_job(folder)
    _, ddp_model, _ = load_job(ddp_folder)
    for (name, a), b in zip(model.state_dict().items(), ddp_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_killed_worker_resumes_and_ends_where_an_unbroken_run_does(swept, fsdp, tmp_path, monkeypatch):
    """Rank 1 dies (os._exit) at step 6 after the sharded checkpoint of step 4: Ray restarts both workers
    (FailureConfig), they reload the shards (weights and AdamW state) and end exactly where the unbroken
    FSDP run ended, random Jacobi pass counts included."""
    unbroken, unbroken_folder = fsdp
    monkeypatch.setenv(FAULT_ENV, "6:1")
    folder = tmp_path / "killed"
    result = train_distributed(swept["jobs"]["ponderlm3"], folder, RunOptions(devices=2, parallel="fsdp",
                                                                             max_failures=1), progress=False)
    assert json.loads((folder / FAULT_MARKER).read_text())["step"] == 6  # the worker did die
    assert _curve(folder) == _curve(unbroken_folder)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 10))  # training lines, once each
    for key in ("val_loss", "train_flops", "train_steps", "infer_flops_per_token", "mean_extra_steps"):
        assert result[key] == unbroken[key], key
    written = (folder / "result.json").stat().st_mtime_ns
    again = train_distributed(swept["jobs"]["ponderlm3"], folder, RunOptions(devices=2, parallel="fsdp"))
    assert again == json.loads((folder / "result.json").read_text())  # finished: returned as it is
    assert (folder / "result.json").stat().st_mtime_ns == written  # and nothing ran


def test_user_error_on_the_workers_is_raised_once_in_one_line(swept, tmp_path):
    """A diverging job (NaN loss) fails on every rank at the same step; rank 0 returns the error, which the
    driver raises as the same TrainingError one process would raise, instead of a crash that Ray retries."""
    base = swept["jobs"]["vanilla"].to_dict()
    job = Job.from_dict({**base, "train": {**base["train"], "lr": 1e9}})
    with pytest.raises(TrainingError, match=r"vanilla: loss became nan at step 1 .*checkpoint \(step 0\)") as caught:
        train_distributed(job, tmp_path / "nan", RunOptions(devices=2, max_failures=2), progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "nan" / "result.json").exists()


def test_sharded_checkpoint_loads_into_one_process_and_resumes_there(tmp_path, small_corpus):
    """A sharded checkpoint (written here by a one-rank gloo group) is read without any process group:
    by ``load_weights`` (harness eval, lm-eval) and, weights and AdamW state, by a one-process resume."""
    import torch.distributed as dist

    job = Job(method="vanilla", budget=1e9, size="pico", train=TrainConfig(seq_len=16, batch_size=2))
    torch.manual_seed(0)
    model = registry.build("vanilla", "pico", {"vocab_size": 64})
    optimizer_model = registry.build("vanilla", "pico", {"vocab_size": 64})
    optimizer_model.load_state_dict(model.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        placement = Sharded(0, 1, torch.device("cpu"))
        sharded = placement.wrap(optimizer_model)
        optimizer = build_optimizer(sharded, job.train)
        ids = torch.randint(64, (2, 17))
        sharded(ids[:, :-1], ids[:, 1:]).loss.backward()
        optimizer.step()
        placement.save(tmp_path / "ckpt", sharded, optimizer, {"step": 1, "total_steps": 5}, last=False)
        expected = {k: v.full_tensor().clone() for k, v in sharded.state_dict().items()}
    finally:
        dist.destroy_process_group()
    assert checkpoint.load_state(tmp_path / "ckpt")["format"] == checkpoint.SHARDED
    assert not list((tmp_path / "ckpt").glob("*.distcp")) and not list((tmp_path / "ckpt").glob(".metadata"))
    checkpoint.load_weights(tmp_path / "ckpt", model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    plain_optimizer = build_optimizer(model, job.train)
    state = checkpoint.load(tmp_path / "ckpt", model, plain_optimizer)
    moments = plain_optimizer.state_dict()["state"]
    assert state["step"] == 1 and len(moments) == len(list(model.parameters()))
    assert all(float(entry["step"]) == 1.0 and entry["exp_avg"].abs().sum() > 0 for entry in moments.values())


def test_a_batch_that_does_not_split_over_the_devices_is_a_one_line_error(swept, tmp_path):
    job = swept["jobs"]["vanilla"]
    with pytest.raises(ConfigError, match=r"train.batch_size=2 .* not divisible by 3 devices") as caught:
        train_distributed(job, tmp_path / "never", RunOptions(devices=3))
    assert "\n" not in str(caught.value) and not (tmp_path / "never").exists()
    check_devices(job.train, 2)  # divisible: no error
    with pytest.raises(ConfigError, match="not divisible by 3 devices"):
        sweep(swept["request"], SweepOptions(out=str(tmp_path / "sweep"), progress=False, devices_per_job=3))
    assert not (tmp_path / "sweep").exists()


def test_reference_job_ids_do_not_depend_on_devices():
    """Devices are run options outside the hashed Job: every stored reference job keeps its id."""
    path = os.path.join(os.path.dirname(__file__), "..", "results", "reference", "runs.jsonl")
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    assert records and all(Job.from_dict(r["job"]).job_id() == r["job_id"] for r in records)


def test_study_file_sets_devices_per_job(tmp_path):
    text = 'budget = 1e11\nsizes = ["pico"]\ndevices_per_job = 4\nparallel = "fsdp"\n[[arms]]\nmethod = "vanilla"\n'
    (tmp_path / "s.toml").write_text(text)
    loaded = study.load(str(tmp_path / "s.toml"))
    assert (loaded.devices_per_job, loaded.parallel) == (4, "fsdp")
    (tmp_path / "bad.toml").write_text(text.replace('"fsdp"', '"zero3"'))
    with pytest.raises(StudyError, match=r"parallel = 'zero3'; choose ddp or fsdp"):
        study.load(str(tmp_path / "bad.toml"))


def test_plan_helpers_split_memory_and_hours_over_devices():
    gb = 1e9
    h100 = Hardware("h100", "table", 400e12, "", 80 * gb, 8)
    params = 1_000_000_000  # 16 GB of weights, gradients and AdamW moments
    total = 16 * gb + 64 * gb  # plus 64 GB of activations and logits on one device
    assert memory_per_device(total, params, 1) == total
    assert memory_per_device(total, params, 2, "ddp") == pytest.approx(16 * gb + 32 * gb)
    assert memory_per_device(total, params, 2, "fsdp") == pytest.approx(8 * gb + 32 * gb)
    assert suggest_devices(total, params, 80 * gb, batch_size=8) == (1, "ddp")
    assert suggest_devices(100 * gb, params, 80 * gb, batch_size=8) == (2, "ddp")
    states_bound = 16 * 5e9 + 10 * gb  # 5B parameters: DDP never fits 80 GB, FSDP on 2 does
    assert suggest_devices(states_bound, 5_000_000_000, 80 * gb, batch_size=8) == (2, "fsdp")
    assert suggest_devices(100 * gb, params, 80 * gb, batch_size=1) is None  # the micro-batch cannot split
    assert job_hours(400e12 * 3600, h100) == pytest.approx(1.0)
    assert job_hours(400e12 * 3600, h100, devices=4) == pytest.approx(1 / (4 * 0.9))


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; scripts/gpu_check.sh runs them)


@pytest.mark.cuda
@pytest.mark.parametrize("size", ["pico", "70m"])
@pytest.mark.parametrize("method", sorted(registry.plugins()))
def test_sdpa_runs_a_fused_kernel_for_every_method(method, size):
    """With only the flash and memory-efficient kernels allowed, SDPA raises instead of falling back to the
    math kernel; training (PonderLM-3's biased attention included) and deployed scoring must both run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = registry.build(method, size, {"vocab_size": 512}).cuda()
    ids = torch.randint(512, (2, 65), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        model.eval()
        scored = model.score(ids[:, :-1], ids[:, 1:])
    assert torch.isfinite(out.loss) and torch.isfinite(scored.logprobs).all()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_and_fsdp_on_two_gpus_match_one_gpu(small_corpus, ray_instance, tmp_path):
    """NCCL workers, one GPU each; bf16 autocast rounds differently per split, hence the looser tolerance."""
    ray_instance()
    job = Job(method="vanilla", budget=BUDGET, size="pico", data=DataConfig(source=small_corpus, vocab_size=512),
              train=TrainConfig(seq_len=32, batch_size=4, log_every=1, eval_tokens=1024))
    ref = train_job(job, tmp_path / "one", progress=False)
    for parallel in ("ddp", "fsdp"):
        result = train_distributed(job, tmp_path / parallel, RunOptions(devices=2, parallel=parallel))
        assert result["device"].startswith("cuda") and result["train_flops"] == ref["train_flops"]
        _close(_curve(tmp_path / parallel), _curve(tmp_path / "one"), rel=2e-2)
