"""The plan for jobs on several devices (issue 12, item 3): it suggests ``--devices-per-job``/``--parallel`` for
jobs that do not fit one device, and its hours and memory columns follow N (harness/plan/hardware.py)."""

import argparse
import json
import re

import pytest

from harness.commands import plan as plan_command
from harness.commands import sweep as sweep_command
from harness.core.errors import ConfigError
from harness.plan import planning, study
from harness.plan.hardware import SCALING_EFFICIENCY, STATE_BYTES_PER_PARAM
from harness.sweep import SweepOptions, sweep

H100_BYTES = 80e9
METHODS = ["vanilla", "ponderlm2", "ponderlm3"]  # ponderlm3/410m needs ~340 GB on one H100 at 1e20
SUGGESTION = re.compile(r"--devices-per-job (\d+) --parallel (ddp|fsdp)")


@pytest.fixture(scope="module")
def one_device():
    return planning.make_plan(planning.PlanRequest(budget=1e20, methods=METHODS, gpu="h100"))


def _per_job_notes(plan):
    return [n for n in plan.notes if " needs ~" in n]


def test_jobs_over_80gb_get_a_devices_suggestion_and_the_others_none(one_device):
    too_big = {f"{j.method}/{j.size}" for j in one_device.jobs if j.memory_bytes > H100_BYTES}
    assert too_big and len(too_big) < len(one_device.jobs)  # both kinds, or the test shows nothing
    notes = _per_job_notes(one_device)
    assert {n.split(" needs")[0] for n in notes} == too_big
    for note in notes:
        assert SUGGESTION.search(note), note


def test_following_the_sweep_suggestion_fits_every_job(one_device):
    summary = [n for n in one_device.notes if "sweep with --devices-per-job" in n]
    assert len(summary) == 1
    devices, parallel = SUGGESTION.search(summary[0]).groups()
    devices = int(devices)
    # the largest per-job suggestion at least: a sweep runs every job on one N
    assert devices >= max(int(SUGGESTION.search(n).group(1)) for n in _per_job_notes(one_device))
    request = planning.PlanRequest(budget=1e20, methods=METHODS, gpu="h100", devices_per_job=devices,
                                   parallel=parallel)
    followed = planning.make_plan(request, one_device.hardware)
    assert all(j.memory_bytes <= H100_BYTES for j in followed.jobs)
    assert not _per_job_notes(followed) and not [n for n in followed.notes if "sweep with" in n]


def test_eight_devices_divide_the_hours_and_fsdp_shrinks_the_memory(one_device):
    request = planning.PlanRequest(budget=1e20, methods=METHODS, gpu="h100", devices_per_job=8, parallel="fsdp")
    eight = planning.make_plan(request, one_device.hardware)
    by_id = {j.job_id: j for j in one_device.jobs}
    assert {j.job_id for j in eight.jobs} == set(by_id)  # N is not part of a job
    for j in eight.jobs:
        one = by_id[j.job_id]
        assert j.hours == pytest.approx(one.hours / (8 * SCALING_EFFICIENCY))
        states = STATE_BYTES_PER_PARAM * j.params
        embeddings = j.params - j.non_embedding_params  # FSDP's root stays gathered with its gradients
        expected = states / 8 + 8.0 * embeddings + (one.memory_bytes - states) / 8
        assert j.memory_bytes == pytest.approx(expected) and j.memory_bytes < one.memory_bytes
    assert eight.device_hours == pytest.approx(one_device.device_hours / SCALING_EFFICIENCY)
    # 8 assumed GPUs hold one job of 8 at a time: the wall time is the sum of the jobs' hours
    assert eight.concurrent_jobs == 1 and eight.wall_hours == pytest.approx(sum(j.hours for j in eight.jobs))
    assert one_device.concurrent_jobs == 8 and one_device.device_hours == pytest.approx(
        sum(j.hours for j in one_device.jobs))
    shown = eight.to_dict()
    assert (shown["devices_per_job"], shown["parallel"]) == (8, "fsdp")
    assert "devices_per_job" not in one_device.to_dict()
    text = planning.format_plan(eight)
    assert "each job on 8 devices (fsdp)" in text and "memory/device (fsdp)" in text


def test_ddp_keeps_the_states_on_every_device(one_device):
    request = planning.PlanRequest(budget=1e20, methods=["vanilla"], gpu="h100", devices_per_job=2)
    two = planning.make_plan(request, one_device.hardware)
    by_id = {j.job_id: j for j in one_device.jobs}
    for j in two.jobs:
        states = STATE_BYTES_PER_PARAM * j.params
        assert j.memory_bytes == pytest.approx(states + (by_id[j.job_id].memory_bytes - states) / 2)


def test_a_batch_that_does_not_split_is_named_in_the_plan():
    plan = planning.make_plan(planning.PlanRequest(budget=1e12, methods=["vanilla"], sizes=["pico"], gpu="h100",
                                                   devices_per_job=3))
    assert any("vanilla/pico" in n and "not divisible by 3" in n for n in plan.notes)


@pytest.mark.parametrize("values, words", [({"devices_per_job": 0}, "--devices-per-job 0"),
                                           ({"parallel": "tp"}, "--parallel 'tp'")])
def test_bad_devices_are_one_line_errors(values, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as caught:
        planning.PlanRequest(budget=1e12, **values)
    assert "\n" not in str(caught.value)


def _parse(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("module", [plan_command, sweep_command])
def test_plan_and_sweep_take_the_flags(module):
    args = _parse(module, "--budget", "1e12", "--devices-per-job", "4", "--parallel", "fsdp")
    request = plan_command.request_from_args(args)
    assert (request.devices_per_job, request.parallel) == (4, "fsdp")
    default = plan_command.request_from_args(_parse(module, "--budget", "1e12"))
    assert (default.devices_per_job, default.parallel) == (1, "ddp")
    with pytest.raises(ConfigError, match="--devices-per-job 0"):
        plan_command.request_from_args(_parse(module, "--budget", "1e12", "--devices-per-job", "0"))


STUDY = 'budget = 1e12\nsizes = ["pico"]\ngpu = "h100"\ndevices_per_job = 4\nparallel = "fsdp"\n' \
        '[[arms]]\nmethod = "vanilla"\n'


def test_a_study_passes_its_devices_and_the_flags_win(tmp_path):
    path = tmp_path / "multi.toml"
    path.write_text(STUDY)
    loaded = study.load(str(path))
    request = plan_command.request_from_args(_parse(plan_command, "--study", str(path)), loaded)
    assert (request.devices_per_job, request.parallel) == (4, "fsdp")
    plan = planning.make_plan(request)
    assert plan.to_dict()["devices_per_job"] == 4
    flagged = plan_command.request_from_args(
        _parse(plan_command, "--study", str(path), "--devices-per-job", "2", "--parallel", "ddp"), loaded)
    assert (flagged.devices_per_job, flagged.parallel) == (2, "ddp")


def test_sweep_command_runs_with_the_requests_devices(tmp_path, monkeypatch):
    path = tmp_path / "multi.toml"
    path.write_text(STUDY)
    seen = {}

    def fake_sweep(request, options):
        seen.update(request=request, options=options)

    monkeypatch.setattr(sweep_command, "sweep", fake_sweep)
    args = _parse(sweep_command, "--study", str(path), "--parallel", "ddp", "--dry-run", "--out", str(tmp_path / "o"))
    assert sweep_command.run(args) == 0
    assert (seen["options"].devices_per_job, seen["options"].parallel) == (4, "ddp")


def test_a_dry_sweep_plans_on_its_devices(tmp_path, capsys):
    request = planning.PlanRequest(budget=1e12, methods=["vanilla"], sizes=["pico"], gpu="h100")
    outcome = sweep(request, SweepOptions(out=str(tmp_path / "s"), dry_run=True, progress=False, devices_per_job=2,
                                          parallel="fsdp"))
    assert (outcome.plan.request.devices_per_job, outcome.plan.request.parallel) == (2, "fsdp")
    assert "each job on 2 devices (fsdp)" in capsys.readouterr().out
    assert json.loads(json.dumps(outcome.plan.to_dict(), default=str))["devices_per_job"] == 2
