"""Studies as data (harness/plan/study.py): the shipped studies plan offline, bad files fail in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from harness.commands.plan import add_request_arguments, request_from_args
from harness.core.errors import StudyError
from harness.plan import make_plan, study

MINIMAL = """
protocol = "tokens"
budget = 1e11
sizes = ["pico"]
set = ["data.vocab_size=512"]

[[arms]]
method = "vanilla"
seeds = 2

[[arms]]
method = "ponderlm3"
values = { latent_steps = 2 }
vary = { compute_penalty = [0.1, 1.0] }
"""


def write(tmp_path, text: str, name: str = "s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name", study.available())
def test_every_shipped_study_loads_and_names_its_arms(name):
    loaded = study.load(name)
    assert loaded.arms and loaded.name == name
    assert loaded.protocol in ("tokens", "train-flops")


def test_shipped_studies_include_the_three_the_project_promises():
    assert {"paper", "quick", "paper-410m"} <= set(study.available())


def test_paper_study_compares_the_papers_arms_at_matched_tokens():
    paper = study.load("paper")
    assert paper.protocol == "tokens"
    arms = {(a.method, a.values.get("latent_steps")) for a in paper.arms}
    assert ("ponderlm2", "3") in arms and ("ponderlm2", "1") in arms
    # PonderLM-3's Pareto curve: the pre-declared penalty here, the others in paper-penalties on the same protocol
    penalties = {a.values["compute_penalty"] for a in paper.arms if a.method == "ponderlm3"}
    curve = study.load("paper-penalties")
    penalties |= {a.values["compute_penalty"] for a in curve.arms if a.method == "ponderlm3"}
    assert len(penalties) >= 3
    assert (curve.tokens, curve.overrides, curve.compile) == (paper.tokens, paper.overrides, paper.compile)
    assert {"looped", "pause", "pondering", "mor", "adaponder"} <= {a.method for a in paper.arms}
    vanilla_sizes = {s for a in paper.arms if a.method == "vanilla" for s in (a.sizes or paper.sizes or [])}
    assert len(vanilla_sizes) >= 3
    # 3 paired seeds on vanilla (every size), PonderLM-2 K=1 and K=3 and PonderLM-3 at the pre-declared penalty
    headline = [a for a in paper.arms if a.method in ("vanilla", "ponderlm2", "ponderlm3")]
    assert all((a.seeds or paper.seeds) >= 3 for a in headline)


def test_paper_410m_plans_offline_and_names_its_hub_sources():
    plan = make_plan(study.load("paper-410m").request())
    assert {j.size for j in plan.jobs} == {"410m"}
    assert {j.steps for j in plan.jobs} == {50_000}
    assert {j.batch_size * j.grad_accum * j.seq_len for j in plan.jobs} == {256 * 2048}
    hub = [n for n in plan.notes if n.startswith("needs the hub")]
    assert hub and "gngdb/subset_the_pile_deduplicated" in hub[0] and "pile-val-backup" in hub[0]
    assert "gpt-neox-20b" in hub[0]


def test_a_study_expands_vary_into_arms_and_keeps_per_arm_seeds(tmp_path):
    loaded = study.load(str(write(tmp_path, MINIMAL)))
    labels = [a.label for a in loaded.arms]
    assert labels == ["", "latent_steps=2,compute_penalty=0.1", "latent_steps=2,compute_penalty=1.0"]
    plan = make_plan(loaded.request(gpu="h100"))
    per_arm = {}
    for j in plan.jobs:
        per_arm.setdefault((j.method, j.variant), set()).add(j.seed)
    assert per_arm[("vanilla", "")] == {0, 1}
    assert per_arm[("ponderlm3", "latent_steps=2,compute_penalty=0.1")] == {0}
    assert len({j.tokens for j in plan.jobs}) == 1  # the tokens protocol: every job sees the same tokens


def test_command_line_flags_win_over_the_study(tmp_path):
    loaded = study.load(str(write(tmp_path, MINIMAL)))
    request = request_from_args(args("--seeds", "3", "--methods", "vanilla", "--budget", "2e11",
                                     "--set", "train.lr=1e-3"), loaded)
    assert request.budget == 2e11
    assert [a.method for a in request.arms] == ["vanilla"] and request.arms[0].seeds == 3
    assert request.overrides[-1] == "train.lr=1e-3"
    with pytest.raises(Exception, match="--vary does not combine with --study"):
        request_from_args(args("--vary", "ponderlm3:compute_penalty=1"), loaded)


@pytest.mark.parametrize("text, message", [
    ("protocol = 'tokens'\nbudget = 1e11\nbudjet = 3\n[[arms]]\nmethod = 'vanilla'\n", "unknown field.*budjet"),
    ("budget = 1e11\n[[arms]]\nmethod = 'vanilla'\nseed = 2\n", r"arms\[0\].*unknown field.*seed"),
    ("budget = 1e11\n[[arms]]\nmethod = 'nope'\n", "unknown method 'nope'"),
    ("budget = 1e11\n[[arms]]\nmethod = 'ponderlm3'\nvalues = { compute_penalty = -1 }\n", "compute_penalty"),
    ("budget = 1e11\n[[arms]]\nmethod = 'ponderlm3'\nvalues = { latnt_steps = 2 }\n", "latnt_steps"),
    ("budget = 'lots'\n[[arms]]\nmethod = 'vanilla'\n", "budget = 'lots': expected float"),
    ("protocol = 'vibes'\nbudget = 1e11\n[[arms]]\nmethod = 'vanilla'\n", "protocol = 'vibes'"),
    ("budget = 1e11\n", "at least one \\[\\[arms\\]\\]"),
    ("budget = 1e11\ntokens = 5\n[[arms]]\nmethod = 'vanilla'\n", "exactly one of budget"),
    ("budget = 1e11\n[[arms]]\nmethod = 'vanilla'\nseeds = 0\n", "seeds = 0"),
    ("budget = 1e11\n[[arms\nmethod = 'vanilla'\n", "not valid TOML"),
])
def test_a_bad_study_file_is_one_line_naming_the_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(StudyError, match=message) as info:
        study.load(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_study_names_the_shipped_ones():
    with pytest.raises(StudyError, match="unknown study 'nope'.*paper"):
        study.load("nope")


def test_plan_command_on_a_bad_study_prints_one_line(tmp_path):
    path = write(tmp_path, "budget = 1e11\n[[arms]]\nmethod = 'vanilla'\nwat = 1\n", "bad.toml")
    done = subprocess.run([sys.executable, "-m", "harness", "plan", "--study", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.toml" in lines[0] and "wat" in lines[0]
