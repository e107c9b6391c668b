"""Sweeps: the planner's budget matching, the kill-safe results store, and Ray runs that survive kills.

Ray starts once for the test session (slow on 2 cores; tests/conftest.py, ``ray_instance``); the sweeps use the
pico rung on a small corpus with 32-token sequences, so each job trains in a few seconds.
"""

import contextlib
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness.job import Job
from harness.plan import planning
from harness.results import ResultsStore, failed_record, ok_record
from harness.sweep import SweepOptions, sweep

TINY = ["data.vocab_size=512", "train.seq_len=32", "train.batch_size=4", "train.checkpoint_every=5",
        "train.log_every=5", "train.eval_tokens=1024"]
# one extra loop or pause (not the default 3): twice the steps at the budgets below (21 at 2e10 at pico), so the kill
# tests find a job mid-run and a diverging job has the steps to reach nan
LOOPED_STEPS, PAUSE_STEPS = "looped:loops=1", "pause:pause_tokens=1"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _request(corpus, methods, budget, *extra):
    return planning.PlanRequest(budget=budget, methods=methods, sizes=["pico"],
                                overrides=[f"data.source={corpus}", *TINY, *extra])


@pytest.fixture
def ray_local(ray_instance):
    return ray_instance()  # the session's instance (tests/conftest.py)


def _read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_state(folder):
    """(method, checkpoint step, worker pid) of a job folder, None for what is not written yet."""
    job, state, worker = (_read(folder / "job.json"), _read(folder / "checkpoint" / "state.json"),
                          _read(folder / "worker.json"))
    return ((job or {}).get("method"), (state or {}).get("step"), (worker or {}).get("pid"))


def _alive(pid):
    """Running and not a zombie (a killed worker stays in /proc until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# the planner


def test_plan_1e20_matches_the_budget_within_two_percent():
    out = cli("plan", "--budget", "1e20", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    jobs = plan["jobs"]
    assert {j["method"] for j in jobs} >= {"vanilla", "ponderlm2", "ponderlm3"}
    for j in jobs:
        assert abs(j["train_flops"] / 1e20 - 1) < 0.02, j
        assert j["tokens"] == j["steps"] * j["batch_size"] * j["grad_accum"] * j["seq_len"]
        assert j["train_flops"] == pytest.approx(j["tokens"] * j["train_flops_per_token"])
        assert j["size"] in ("70m", "160m", "410m", "1b", "1.4b", "2.8b")
        assert j["job"]["train"]["seq_len"] == 2048 and j["job"]["tags"]["match"] == "train-flops"
        assert j["hours"] > 0 and j["memory_bytes"] > 16 * j["params"]
    # a method that costs more per token is given smaller rungs by the IsoFLOP rule
    biggest = {m: max(j["params"] for j in jobs if j["method"] == m) for m in ("vanilla", "ponderlm3")}
    assert biggest["ponderlm3"] < biggest["vanilla"]
    assert plan["device_hours"] == pytest.approx(sum(j["hours"] for j in jobs))


def test_plan_tokens_mode_gives_every_method_vanillas_tokens():
    request = planning.PlanRequest(budget=1e20, methods=["vanilla", "ponderlm2", "looped"], match="tokens", gpu="h100")
    plan = planning.make_plan(request)
    by_size = {}
    for j in plan.jobs:
        by_size.setdefault(j.size, {})[j.method] = j
    assert len(by_size) == planning.DEFAULT_RUNGS
    for jobs in by_size.values():
        vanilla = jobs["vanilla"]
        assert abs(vanilla.train_flops / 1e20 - 1) < 0.02
        for j in jobs.values():
            assert j.tokens == vanilla.tokens and j.job.tags["match"] == "tokens"
            # the trainer's rounding gives back exactly the planned steps
            per_step = j.train_flops_per_token * j.batch_size * j.grad_accum * j.seq_len
            assert round(j.job.budget / per_step) == j.steps
        assert jobs["ponderlm2"].train_flops > 2 * vanilla.train_flops
    assert "h100" in plan.hardware.basis and "MFU 0.4" in plan.hardware.basis


def test_plan_small_budget_shrinks_batch_to_stay_within_two_percent():
    # 6.5e11 still buys PonderLM-3 (K=3) at nano 25 single-sequence steps, which is what the rule needs
    plan = planning.make_plan(planning.PlanRequest(budget=6.5e11, methods=["vanilla", "ponderlm3"],
                                                   sizes=["pico", "nano"], gpu="a100"))
    for j in plan.jobs:
        assert j.steps >= planning.MIN_STEPS and abs(j.budget_error) < 0.02, j
    shrunk = [j for j in plan.jobs if j.batch_size < 16]
    assert shrunk and all(j.job.train.batch_size == j.batch_size for j in shrunk)


def test_plan_errors_are_one_line(tmp_path):
    with pytest.raises(planning.PlanError, match="mixes CPU and Pythia"):
        planning.make_plan(planning.PlanRequest(budget=1e12, sizes=["pico", "70m"], gpu="h100"))
    with pytest.raises(planning.ConfigError, match="unknown method 'nope'"):
        planning.make_plan(planning.PlanRequest(budget=1e12, methods=["nope"], gpu="h100"))
    with pytest.raises(planning.PlanError, match="nothing to run"):
        planning.make_plan(planning.PlanRequest(budget=10.0, methods=["vanilla"], sizes=["pico"], gpu="h100"))
    out = cli("sweep", "--budget", "1e20", "--methods", "vanilla", "--out", str(tmp_path / "never"))
    assert out.returncode == 2 and "--yes" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "never").exists()  # stopped before anything ran


def test_vary_adds_a_job_per_value():
    plan = planning.make_plan(planning.PlanRequest(
        budget=1e12, methods=["ponderlm3"], sizes=["pico"], vary=["ponderlm3:compute_penalty=0.001,0.1"], gpu="l4"))
    assert [j.job.model["compute_penalty"] for j in plan.jobs] == ["0.001", "0.1"]
    assert len({j.job_id for j in plan.jobs}) == 2 and plan.jobs[0].variant == "compute_penalty=0.001"


# ---------------------------------------------------------------------------------------------------
# the results store


def _job(method="vanilla", seed=0):
    return Job(method=method, budget=1e9, size="pico", seed=seed)


def test_store_skips_torn_lines_and_duplicates(tmp_path):
    store = ResultsStore(tmp_path)
    first = ok_record(_job(), {"val_ppl": 10.0})
    assert store.append(first)
    assert not store.append(first)  # the same finished job is never stored twice
    with open(store.path, "ab") as handle:  # a kill in the middle of a write
        handle.write(b'{"job_id": "abc", "status": "o')
    assert [r["job_id"] for r in store.records()] == [first["job_id"]] and store.skipped_lines == 1
    second = failed_record(_job(seed=1), "RuntimeError: boom")
    assert store.append(second)  # ends the torn line first, so this record stays whole
    assert [r["job_id"] for r in store.records()] == [first["job_id"], second["job_id"]]
    assert store.finished_ids() == {first["job_id"]}
    retried = ok_record(_job(seed=1), {"val_ppl": 9.0})
    assert store.append(retried) and store.latest()[retried["job_id"]]["status"] == "ok"
    with_scores = ok_record(_job(), {"val_ppl": 10.0, "downstream": {"piqa": {"acc": 0.5}}})
    assert store.append(with_scores)  # adds downstream scores: stored, and it wins
    assert store.latest()[first["job_id"]]["downstream"]["piqa"]["acc"] == 0.5
    assert not store.append(ok_record(_job(), {"val_ppl": 10.0}))
    nan = ok_record(_job(seed=2), {"val_ppl": float("nan")})
    store.append(nan)
    assert store.latest()[nan["job_id"]]["val_ppl"] is None  # strict JSON: NaN stored as null


APPEND_MANY = """
import sys
from harness.results import ResultsStore
store = ResultsStore(sys.argv[1])
for i in range(40):
    store.append({"job_id": f"{sys.argv[2]}-{i}", "status": "ok", "payload": "x" * 5000})
"""


def test_store_appends_from_parallel_processes_stay_whole(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", APPEND_MANY, str(tmp_path), str(w)]) for w in range(3)]
    assert all(p.wait(60) == 0 for p in procs)
    store = ResultsStore(tmp_path)
    ids = [r["job_id"] for r in store.records()]
    assert len(ids) == 120 == len(set(ids)) and store.skipped_lines == 0


# ---------------------------------------------------------------------------------------------------
# Ray


def test_killed_worker_resumes_and_every_job_is_recorded_once(tmp_path, small_corpus, ray_local):
    out = tmp_path / "sweep"
    request = _request(small_corpus, ["vanilla", "looped"], 2e10, LOOPED_STEPS)
    victim = {}

    def kill_looped_mid_job():
        deadline = time.time() + 300
        while time.time() < deadline:
            for folder in (out / "jobs").glob("*"):
                method, step, pid = _job_state(folder)
                if method == "looped" and step is not None and step >= 10 and pid:
                    os.kill(pid, signal.SIGKILL)
                    victim.update(job_id=folder.name, step=step)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_looped_mid_job, daemon=True)
    killer.start()
    outcome = sweep(request, SweepOptions(out=str(out), progress=False, reports=False, retries=2))
    killer.join(5)
    assert victim, "the looped job finished before the test could kill it"
    assert (outcome.ok, outcome.failed, outcome.skipped) == (2, 0, 0)
    records = ResultsStore(out).records()
    assert sorted(r["job_id"] for r in records) == sorted(j.job_id for j in outcome.plan.jobs)  # once each
    resumed = next(r for r in records if r["job_id"] == victim["job_id"])
    assert resumed["attempt"] == 2 and resumed["resumed_from_step"] >= victim["step"]
    planned = next(j for j in outcome.plan.jobs if j.job_id == victim["job_id"])
    assert resumed["train_steps"] == planned.steps and abs(resumed["train_flops"] / 2e10 - 1) < 0.02
    lines = [json.loads(line) for line in (out / "jobs" / victim["job_id"] / "metrics.jsonl").open()]
    steps = [line["step"] for line in lines if "loss" in line]  # training lines (curve points share their steps)
    assert steps == sorted(set(steps))  # the resumed run continued the curve, no step twice

    before = (out / "runs.jsonl").read_bytes()
    again = sweep(request, SweepOptions(out=str(out), progress=False, reports=False))
    assert (again.skipped, again.ran) == (2, 0)
    assert (out / "runs.jsonl").read_bytes() == before


def test_failed_jobs_are_recorded_and_the_others_finish(tmp_path, small_corpus, ray_local):
    out = tmp_path / "sweep"
    # looped diverges (a user error: recorded at once); every worker that runs pause is killed
    # (a crash: retried once, then recorded); vanilla must finish regardless
    request = _request(small_corpus, ["vanilla", "looped", "pause"], 6.6e9, "looped:train.lr=1e9", LOOPED_STEPS,
                       PAUSE_STEPS)
    stop, killed = threading.Event(), set()

    def kill_every_pause_worker():
        while not stop.is_set():
            for folder in (out / "jobs").glob("*"):
                method, _, pid = _job_state(folder)
                if method == "pause" and pid and pid not in killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_every_pause_worker, daemon=True)
    killer.start()
    try:
        # lambada's perplexity stderr is bootstrapped by lm-eval: in a Ray worker it must not fork
        outcome = sweep(request, SweepOptions(out=str(out), progress=False, retries=1, tasks=["lambada"],
                                              task_limit=4))
    finally:
        stop.set()
        killer.join(5)
    assert (outcome.ok, outcome.failed) == (1, 2)
    latest = {r["method"]: r for r in ResultsStore(out).latest().values()}
    assert latest["vanilla"]["status"] == "ok" and "downstream_error" not in latest["vanilla"]
    assert latest["vanilla"]["downstream"]["lambada"]["n_docs"] == 4
    assert latest["looped"]["status"] == "failed"
    assert latest["looped"]["error"].startswith("TrainingError: looped: loss became nan")
    assert latest["pause"]["status"] == "failed" and len(killed) == 2  # first try and one retry
    assert "Worker" in latest["pause"]["error"] and "\n" not in latest["pause"]["error"]
    table = (out / "table.md").read_text()
    assert "Failed jobs" in table and "loss became nan" in table and "| vanilla | pico |" in table
    assert "lambada acc" in table
    assert (out / "pareto_inference_flops.png").stat().st_size > 10_000


def test_sweep_killed_with_sigkill_loses_nothing_and_resumes(tmp_path, small_corpus, ray_local):
    out = tmp_path / "sweep"
    args = ["sweep", "--budget", "2e10", "--methods", "vanilla,looped", "--sizes", "pico", "--out", str(out),
            "--cpus", "1", "--no-progress", "--set", f"data.source={small_corpus}",
            *[f"--set={s}" for s in (*TINY, LOOPED_STEPS)]]
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline, stage = time.time() + 300, None
    try:
        # one CPU: the jobs run one after the other; kill once the first is stored and the second has
        # written a checkpoint
        while time.time() < deadline and proc.poll() is None:
            finished = ResultsStore(out).finished_ids() if (out / "runs.jsonl").exists() else set()
            running = [f for f in (out / "jobs").glob("*") if f.name not in finished and (_job_state(f)[1] or 0) >= 5]
            if finished and running:
                stage = (finished, running[0].name)
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert stage, "the sweep ended before it could be killed"
    finished, interrupted = stage
    # Ray's workers are not in the driver's process group and outlive it for a while (the job lock
    # makes a rerun wait for them); kill this one too, as a machine going down would
    worker = _job_state(out / "jobs" / interrupted)[2]
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, signal.SIGKILL)
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not (out / "jobs" / interrupted / "result.json").exists()

    outcome = sweep(_request(small_corpus, ["vanilla", "looped"], 2e10, LOOPED_STEPS),
                    SweepOptions(out=str(out), progress=False, reports=False))
    assert (outcome.skipped, outcome.ok) == (1, 1)
    records = ResultsStore(out).records()
    assert sorted(r["job_id"] for r in records) == sorted(j.job_id for j in outcome.plan.jobs)
    resumed = next(r for r in records if r["job_id"] == interrupted)
    assert resumed["resumed_from_step"] >= 5


def _child(parent, name):
    """Pid of a live child process of ``parent`` whose name starts with ``name``, or None."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(stat) as handle:
                text = handle.read()
            comm, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if comm.startswith(name) and int(fields[1]) == parent and fields[0] != "Z":
                return int(stat.split("/")[2])
    return None


def test_dead_raylet_costs_no_retries_and_every_job_resumes(tmp_path, small_corpus, capsys):
    """Killing the local Ray's dashboard agent takes its raylet down (they share fate, and the agent
    starts even without the dashboard) and fails the tasks with LocalRayletDiedError; the sweep restarts
    Ray and resumes the jobs instead of recording them failed."""
    import ray

    if ray.is_initialized():  # this test kills the instance: the sweep must start (and own) its own
        ray.shutdown()
    out = tmp_path / "sweep"
    request = _request(small_corpus, ["vanilla", "looped"], 2e10, LOOPED_STEPS)
    victim = {}

    def kill_raylet_mid_job():
        deadline = time.time() + 300
        while time.time() < deadline:
            raylet = _child(os.getpid(), "raylet")
            agent = raylet and _child(raylet, "ray::Dashboard")
            running = {f.name: _job_state(f)[1] for f in (out / "jobs").glob("*")
                       if (_job_state(f)[1] or 0) >= 5 and not (f / "result.json").exists()}
            if agent and running:
                os.kill(agent, signal.SIGKILL)
                victim.update(raylet=raylet, steps=running)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_raylet_mid_job, daemon=True)
    killer.start()
    started = time.time()
    # one CPU: the second job waits in Ray's queue when the raylet dies, and so is failed by Ray
    outcome = sweep(request, SweepOptions(out=str(out), cpus=1, progress=True, reports=False, retries=1))
    killer.join(5)
    elapsed = time.time() - started
    assert victim, "the jobs finished before the test could kill the raylet"
    assert not _alive(victim["raylet"])  # the agent took it down
    assert "restarting it and resuming" in capsys.readouterr().err
    assert (outcome.ok, outcome.failed, outcome.skipped) == (2, 0, 0)
    records = ResultsStore(out).records()
    assert [r["status"] for r in records] == ["ok", "ok"]  # no failed rows, each job once
    assert sorted(r["job_id"] for r in records) == sorted(j.job_id for j in outcome.plan.jobs)
    for job_id, step in victim["steps"].items():
        record = next(r for r in records if r["job_id"] == job_id)
        if record["attempt"] > 1:  # run again after the restart: from its checkpoint, not step 0
            assert record["resumed_from_step"] >= step, record
    assert not ray.is_initialized()  # the sweep shut down the instance it restarted
    assert elapsed < 120


def test_third_party_plugin_is_swept_without_harness_changes(tmp_path, small_corpus):
    """The example package (tests/plugin_example), visible only through its entry point, is planned,
    trained on Ray and reported like an in-tree method."""
    from tests.plugin_support import install_example_plugin

    env = install_example_plugin(tmp_path / "site")
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "sweep", "--budget", "6.6e9", "--methods", "wide_head,vanilla",
         "--sizes", "pico", "--out", str(out), "--cpus", "2", "--no-progress",
         "--set", f"data.source={small_corpus}", *[f"--set={s}" for s in TINY]],
        capture_output=True, text=True, timeout=600, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = {r["method"]: r for r in ResultsStore(out).records()}
    assert records["wide_head"]["status"] == "ok" and records["vanilla"]["status"] == "ok"
    assert records["wide_head"]["val_ppl"] > 1
    assert "wide_head" in (out / "table.md").read_text()


# ---------------------------------------------------------------------------------------------------
# --compile: a run option of the sweep (flag or study key), handed to every job's train_job


def test_compile_reaches_every_job_from_the_flag_or_the_study(tmp_path, monkeypatch):
    import argparse

    import harness.sweep as sweep_module
    from harness.commands import sweep as sweep_command
    from harness.core.errors import ConfigError
    from harness.plan import study

    # the evidence studies compile (#15 measured 1.2-1.3x per step); quick stays eager: compiling would cost
    # more than its 30 steps
    assert study.load("paper").compile and study.load("paper-penalties").compile and not study.load("quick").compile
    path = tmp_path / "compiled.toml"
    path.write_text('budget = 1e12\nsizes = ["pico"]\ncompile = true\n[[arms]]\nmethod = "vanilla"\n')
    assert study.load(str(path)).compile
    seen = []
    monkeypatch.setattr(sweep_command, "sweep", lambda request, options: seen.append(options) or
                        sweep_module.SweepOutcome(None))
    parser = argparse.ArgumentParser()
    sweep_command.add_arguments(parser)
    for argv in (["--study", str(path)], ["--budget", "1e12", "--compile"], ["--budget", "1e12"]):
        sweep_command.run(parser.parse_args([*argv, "--dry-run", "--out", str(tmp_path / "out")]))
    assert [options.compile_blocks for options in seen] == [True, True, False]

    calls = []  # the Ray task: execute_job hands the option to train_job (a failing one: nothing trains)

    def train_job(job, folder, **kwargs):
        calls.append(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(sweep_module, "train_job", train_job)
    job = Job(method="vanilla", budget=1e9, size="pico")
    for compile_blocks in (True, False):
        record = sweep_module.execute_job(job.to_dict(), str(tmp_path / "store"), "token", [], 0, None, 1,
                                          compile_blocks=compile_blocks)
        assert record["status"] != "ok"
    assert [kwargs["compile_blocks"] for kwargs in calls] == [True, False]


# ---------------------------------------------------------------------------------------------------
# faults of the output folder and the progress bar (issue 24)


def test_an_output_folder_fault_in_a_task_is_returned_as_an_outage_not_retried(tmp_path, monkeypatch):
    import harness.sweep as sweep_module

    job, root = Job(method="vanilla", budget=1e9, size="pico"), tmp_path / "store"
    faults = [(OSError(errno.ENOSPC, "No space left on device"), True),  # a write to a file already open
              (PermissionError(errno.EACCES, "Permission denied", str(root / "jobs" / "x" / "metrics.jsonl")), True),
              (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "corpus" / "a.txt")), False)]
    for raised, outage in faults:
        def train_job(job, folder, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(sweep_module, "train_job", train_job)
        if outage:  # returned: Ray would retry a raised one at once, into the same fault
            record = sweep_module.execute_job(job.to_dict(), str(root), "token", [], 0, None, 1)
            assert record["status"] == sweep_module.OUTAGE and raised.strerror in record["error"]
        else:  # not the output folder's: the job's own failure, retried and recorded as before
            with pytest.raises(PermissionError):
                sweep_module.execute_job(job.to_dict(), str(root), "token", [], 0, None, 1)
    assert not (root / "runs.jsonl").exists()


def test_a_runs_file_that_cannot_be_written_is_an_outage_with_a_summary(tmp_path, monkeypatch, capsys):
    import argparse

    import harness.sweep as sweep_module
    from harness.commands import sweep as sweep_command

    (tmp_path / "runs.jsonl").mkdir()  # every read and append of it fails
    outcome = sweep_module.SweepOutcome(plan=None)
    record = failed_record(Job(method="vanilla", budget=1e9, size="pico"), "x")
    bar = type("Bar", (), {"write": lambda *a, **k: None, "update": lambda *a: None})()
    assert sweep_module._collect(record, ResultsStore(tmp_path), outcome, bar) is False
    assert "runs.jsonl" in outcome.outage and "IsADirectoryError" in outcome.outage and outcome.ran == 0
    # the command: one line naming it, then the summary, exit 1
    outcome.not_run = 2
    monkeypatch.setattr(sweep_command, "sweep", lambda request, options: outcome)
    parser = argparse.ArgumentParser()
    sweep_command.add_arguments(parser)
    assert sweep_command.run(parser.parse_args(["--budget", "1e12", "--out", str(tmp_path)])) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("error: the output folder failed (")]
    assert "sweep: 0 ok, 0 failed, 0 already done, 2 not run" in captured.out


def test_sweep_stops_launching_on_an_output_folder_outage_and_a_rerun_resumes(tmp_path, small_corpus, ray_local,
                                                                             capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "jobs").write_text("in the way")  # no job folder can be made: a lasting fault of the output folder
    request = _request(small_corpus, ["vanilla", "looped"], 6.6e9, LOOPED_STEPS)
    started = time.time()
    outcome = sweep(request, SweepOptions(out=str(out), progress=True, retries=2))
    assert time.time() - started < 120
    assert outcome.outage and str(out / "jobs") in outcome.outage
    assert (outcome.ok, outcome.failed, outcome.not_run) == (0, 0, 2)
    assert not (out / "runs.jsonl").exists() and not (out / "table.md").exists()  # nothing recorded as failed
    assert "the output folder failed" in capsys.readouterr().err
    (out / "jobs").unlink()
    again = sweep(request, SweepOptions(out=str(out), progress=False, reports=False))
    assert (again.ok, again.failed, again.outage) == (2, 0, None)


def test_progress_counts_live_workers_only_and_never_more_than_the_slots(tmp_path):
    import socket
    import types

    from harness.sweep import WORKER_FILE, _running

    store = ResultsStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    pending = {}
    for i, pid in enumerate([os.getpid(), dead.pid, os.getpid()]):  # the dead one's job waits for its retry
        job_id = Job(method="vanilla", budget=1e9 * (i + 1), size="pico").job_id()
        store.job_dir(job_id).mkdir(parents=True)
        (store.job_dir(job_id) / WORKER_FILE).write_text(
            json.dumps({"pid": pid, "host": socket.gethostname(), "token": "t"}))
        pending[i] = types.SimpleNamespace(job_id=job_id)
    assert _running(pending, store, "t", 4) == 2
    assert _running(pending, store, "t", 1) == 1
    assert _running(pending, store, "another sweep", 4) == 0


def test_dead_gcs_restarts_ray_resumes_every_job_and_leaves_no_agents(tmp_path, small_corpus, capsys):
    """Killing the local Ray's GCS (its head process): Ray's client would end the driver after 60 s with no
    summary; the sweep sees it, restarts Ray as after a dead raylet, resumes the jobs, and ends the agents the
    old raylet started (they would outlive it by a minute or two)."""
    import ray

    if ray.is_initialized():  # this test kills the instance: the sweep must start (and own) its own
        ray.shutdown()
    out = tmp_path / "sweep"
    request = _request(small_corpus, ["vanilla", "looped"], 2e10, LOOPED_STEPS)
    victim = {}

    def kill_gcs_mid_job():
        deadline = time.time() + 300
        while time.time() < deadline:
            gcs, raylet = _child(os.getpid(), "gcs_server"), _child(os.getpid(), "raylet")
            agents = [pid for pid in (raylet and _child(raylet, "ray::Dashboard"),
                                      raylet and _child(raylet, "ray::RuntimeEnv")) if pid]
            running = {f.name: _job_state(f)[1] for f in (out / "jobs").glob("*")
                       if (_job_state(f)[1] or 0) >= 5 and not (f / "result.json").exists()}
            if gcs and agents and running:
                os.kill(gcs, signal.SIGKILL)
                victim.update(gcs=gcs, agents=agents, steps=running)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_gcs_mid_job, daemon=True)
    killer.start()
    outcome = sweep(request, SweepOptions(out=str(out), cpus=1, progress=True, reports=False, retries=1))
    killer.join(5)
    assert victim, "the jobs finished before the test could kill the GCS"
    assert "GCS" in capsys.readouterr().err
    assert (outcome.ok, outcome.failed, outcome.skipped) == (2, 0, 0)
    records = ResultsStore(out).records()
    assert sorted(r["job_id"] for r in records) == sorted(j.job_id for j in outcome.plan.jobs)
    assert all(r["status"] == "ok" for r in records)
    for job_id, step in victim["steps"].items():
        record = next(r for r in records if r["job_id"] == job_id)
        if record["attempt"] > 1:
            assert record["resumed_from_step"] >= step, record
    assert not any(_alive(pid) for pid in victim["agents"])
    assert not ray.is_initialized()


def test_agents_left_by_a_killed_driver_are_ended_before_ray_starts():
    """An agent whose parent is no raylet (its driver was SIGKILLed, the raylet gone) is ended; one whose parent
    is a raylet belongs to a running instance and is left alone."""
    from harness.sweep import end_orphaned_agents

    orphan = subprocess.Popen(["bash", "-c", "exec -a ray::DashboardAgent sleep 60"])
    owned = subprocess.Popen(["bash", "-c", "exec -a raylet bash -c 'exec -a ray::RuntimeEnvAgent sleep 60 & wait'"])
    try:
        def renamed(pid, name):
            with contextlib.suppress(OSError, TypeError):
                return open(f"/proc/{pid}/cmdline", "rb").read().startswith(name)
            return False

        agent, deadline = None, time.time() + 10
        while time.time() < deadline and not (renamed(orphan.pid, b"ray::DashboardAgent") and renamed(agent, b"ray::")):
            agent = _child(owned.pid, "sleep")  # the owned agent, started by its "raylet"
            time.sleep(0.05)
        assert renamed(agent, b"ray::RuntimeEnvAgent")
        ended = end_orphaned_agents()
        assert orphan.pid in ended and agent not in ended
        assert orphan.wait(10) == -signal.SIGKILL
        assert _alive(agent)
    finally:
        for proc in (orphan, owned):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(agent, signal.SIGKILL)
