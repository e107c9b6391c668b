"""The paper-scale plan: the Pythia rungs train each method with its reference recipe, the plan shows it, and a
rung where a method's config is invalid is skipped with one line (issue 17, "Paper-scale configs").

The reference values are those of the official PonderLM-2 code (LUMIA-Group/PonderLM-2): llama_config/410m and
1.4b/config.json (rms_norm_eps 0.1) and scripts/train_{ponderlm2,loop,pause,ponderlm,vanilla}_llama_*.sh (AdamW
betas 0.9/0.95, warmup_ratio 0.02, cosine_with_min_lr to 0.1, lr 3e-4 at 410m and 2e-4 at 1.4b, weight decay
0.1 or 0.01 per method). Every count is taken on the meta device: these tests build no real model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harness.core import registry
from harness.core.config import SIZES, ModelConfig
from harness.core.errors import PlanError, StudyError
from harness.job import TrainConfig
from harness.plan import format_plan, make_plan, study
from harness.plan.planning import PlanRequest
from harness.sweep import SweepOptions, sweep

# scripts/train_*_llama_*.sh of the PonderLM-2 repository (PonderLM-3 takes PonderLM-2's recipe)
SCRIPT_WEIGHT_DECAY = {"vanilla": 0.01, "pondering": 0.01, "ponderlm2": 0.1, "ponderlm3": 0.1, "looped": 0.1,
                       "pause": 0.1}
SCRIPT_LR = {"410m": 3e-4, "1.4b": 2e-4}


def _plan(**request):
    return make_plan(PlanRequest(**{"budget": 1e20, "gpu": "h100", **request}))


def _recipes(plan):
    return {(r["method"], r["size"]): r for r in plan.recipes()}


def test_pythia_rungs_train_every_method_with_its_reference_recipe():
    plan = _plan(methods=sorted(SCRIPT_WEIGHT_DECAY), sizes=sorted(SCRIPT_LR))
    recipes = _recipes(plan)
    assert set(recipes) == {(m, s) for m in SCRIPT_WEIGHT_DECAY for s in SCRIPT_LR}
    for (method, size), r in recipes.items():
        assert r["lr"] == SCRIPT_LR[size] and r["warmup_fraction"] == 0.02 and r["min_lr_ratio"] == 0.1
        assert (r["beta1"], r["beta2"]) == (0.9, 0.95) and r["norm_eps"] == 0.1
        assert (r["weight_decay"], r["weight_decay_from"]) == (SCRIPT_WEIGHT_DECAY[method], "method"), method
    for j in plan.jobs:  # what the job trains with, not only what the table says
        assert j.job.train.weight_decay == SCRIPT_WEIGHT_DECAY[j.method] and j.job.train.warmup_fraction == 0.02
        config = registry.get(j.method).make_config(j.size, j.job.model)
        assert config.norm_eps == 0.1 == j.norm_eps


def test_set_wins_over_the_method_and_the_scale():
    plan = _plan(methods=["vanilla", "ponderlm2"], sizes=["410m"],
                 overrides=["train.weight_decay=0.05", "ponderlm2:train.weight_decay=0.2", "norm_eps=1e-5"])
    recipes = _recipes(plan)
    assert (recipes["vanilla", "410m"]["weight_decay"], recipes["vanilla", "410m"]["weight_decay_from"]) == (0.05,
                                                                                                             "--set")
    assert recipes["ponderlm2", "410m"]["weight_decay"] == 0.2
    assert {r["norm_eps"] for r in recipes.values()} == {1e-5}


def test_a_method_without_a_reference_gets_the_scale_default(monkeypatch):
    monkeypatch.setattr(registry.get("ponderlm2").cls, "reference_weight_decay", None)
    r = _recipes(_plan(methods=["ponderlm2"], sizes=["410m"]))["ponderlm2", "410m"]
    assert (r["weight_decay"], r["weight_decay_from"]) == (0.01, "scale")


def test_cpu_rungs_keep_their_defaults_for_every_method():
    plan = _plan(budget=1e12, methods=["vanilla", "ponderlm2"], sizes=["pico"])
    for r in plan.recipes():
        assert (r["weight_decay"], r["weight_decay_from"]) == (TrainConfig().weight_decay, "scale")
        assert r["norm_eps"] == ModelConfig().norm_eps and r["warmup_fraction"] == TrainConfig().warmup_fraction
    assert all("norm_eps" not in j.job.model for j in plan.jobs)


@pytest.mark.parametrize("name", sorted(registry.plugins()))
def test_every_method_declares_a_usable_reference_weight_decay(name):
    value = registry.get(name).cls.reference_weight_decay
    assert value is None or (isinstance(value, float) and 0 <= value < 1 and math.isfinite(value)), value


def test_the_plan_prints_the_recipe_per_method_and_rung():
    lines = format_plan(_plan(methods=["vanilla", "ponderlm2"], sizes=["410m", "1.4b"])).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("recipe:")) + 2  # after its header
    rows = [line.split() for line in lines[start:lines.index("", start)]]
    table = {(row[0], row[1]): row for row in rows}
    assert len(table) == 4
    assert table["ponderlm2", "410m"][2:] == ["0.0003", "2%", "0.1", "0.9,", "0.95", "0.1", "(method)", "0.1"]
    assert table["vanilla", "1.4b"][2:] == ["0.0002", "2%", "0.1", "0.9,", "0.95", "0.01", "(method)", "0.1"]


def test_plan_json_shows_the_reference_settings_per_method():
    out = subprocess.run([sys.executable, "-m", "harness", "plan", "--budget", "1e20", "--json", "--gpu", "h100",
                          "--methods", "vanilla,ponderlm2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["recipes"] and {r["method"] for r in plan["recipes"]} == {"vanilla", "ponderlm2"}
    for r in plan["recipes"]:
        assert r["norm_eps"] == 0.1 and r["weight_decay"] == SCRIPT_WEIGHT_DECAY[r["method"]]
        assert (r["beta1"], r["beta2"], r["warmup_fraction"], r["min_lr_ratio"]) == (0.9, 0.95, 0.02, 0.1)
    assert all(j["norm_eps"] == 0.1 and j["job"]["model"]["norm_eps"] == 0.1 for j in plan["jobs"])


# ---------------------------------------------------------------------------------------------------
# a rung where a method's config is invalid


INVALID_AT_70M = ["n_kv_heads=16"]  # must divide n_heads: 8 at 70m, 16 at 410m


def test_a_rung_where_the_config_is_invalid_is_skipped_with_one_line():
    plan = _plan(methods=["vanilla"], sizes=["70m", "410m"], overrides=INVALID_AT_70M)
    assert [j.size for j in plan.jobs] == ["410m"]
    assert len(plan.skipped) == 1
    line = plan.skipped[0]
    assert line.startswith("vanilla at 70m: ") and "n_kv_heads" in line and "\n" not in line
    assert f"skipped {line}" in format_plan(plan).splitlines()


def test_the_skip_names_the_variant_and_the_rest_of_the_plan_stands():
    plan = _plan(methods=["vanilla", "ponderlm2"], sizes=["70m", "410m"], vary=["ponderlm2:n_kv_heads=8,16"])
    assert {(j.method, j.variant, j.size) for j in plan.jobs} == {
        ("vanilla", "", "70m"), ("vanilla", "", "410m"), ("ponderlm2", "n_kv_heads=8", "70m"),
        ("ponderlm2", "n_kv_heads=8", "410m"), ("ponderlm2", "n_kv_heads=16", "410m")}
    assert len(plan.skipped) == 1 and plan.skipped[0].startswith("ponderlm2 [n_kv_heads=16] at 70m: ")


def test_nothing_valid_anywhere_is_one_plan_error_naming_the_reason():
    with pytest.raises(PlanError, match="nothing to run.*vanilla at 70m.*n_kv_heads"):
        _plan(methods=["vanilla"], sizes=["70m"], overrides=INVALID_AT_70M)


def test_a_sweep_skips_the_invalid_rung_too(tmp_path, capsys):
    request = PlanRequest(budget=1e20, methods=["vanilla"], sizes=["70m", "410m"], overrides=INVALID_AT_70M,
                          gpu="h100")
    outcome = sweep(request, SweepOptions(out=str(tmp_path / "out"), dry_run=True, progress=False))
    assert [j.size for j in outcome.plan.jobs] == ["410m"]
    assert any(line.startswith("skipped vanilla at 70m: ") for line in capsys.readouterr().out.splitlines())


def test_mor_holds_a_third_of_the_middle_layers_and_is_skipped_where_it_cannot():
    # Middle-Cycle sharing at R=3 (mixture_of_recursions, model/sharing_strategy/llama.py): the shared block holds
    # (L-2)/R layers. At 2.8b (L=32) that drops the MLPs and norms of 20 of vanilla's 30 middle layers (expert-choice
    # keeps an attention per recursion, as the reference: baselines/mor.py); 410m (L=24) cannot split.
    plan = _plan(methods=["vanilla", "mor"], sizes=["410m", "2.8b"], vary=["mor:recursions=3"])
    jobs = {(j.method, j.size): j for j in plan.jobs}
    assert set(jobs) == {("vanilla", "410m"), ("vanilla", "2.8b"), ("mor", "2.8b")}
    assert len(plan.skipped) == 1 and plan.skipped[0].startswith("mor [recursions=3] at 410m: ")
    vanilla, mor = jobs["vanilla", "2.8b"].non_embedding_params, jobs["mor", "2.8b"].non_embedding_params
    assert mor <= 0.6 * vanilla
    d, d_ff = SIZES["2.8b"].d_model, SIZES["2.8b"].d_ff
    shared = 3 * d * d_ff + 2 * d  # what recursions share: the SwiGLU MLP and the two RMSNorms
    routers = mor - (vanilla - 20 * shared)
    assert 0 <= routers <= 3 * (d + 1)  # the rest is MoR's routers: at most Linear(d, 1) per recursion


def test_a_study_arm_invalid_only_at_some_rungs_loads_and_the_plan_skips_those(tmp_path):
    path = tmp_path / "rungs.toml"
    text = ('protocol = "train-flops"\nbudget = 1e20\nsizes = ["410m", "2.8b"]\ngpu = "h100"\n'
            '[[arms]]\nmethod = "vanilla"\n[[arms]]\nmethod = "mor"\nvalues = { recursions = %s }\n')
    path.write_text(text % 3)
    plan = make_plan(study.load(str(path)).request())
    assert {(j.method, j.size) for j in plan.jobs} == {("vanilla", "410m"), ("vanilla", "2.8b"), ("mor", "2.8b")}
    assert [line.split(":")[0] for line in plan.skipped] == ["mor [recursions=3] at 410m"]
    path.write_text(text % 0)  # invalid at every rung: still the study's one-line error
    with pytest.raises(StudyError, match="rungs.toml.*recursions"):
        study.load(str(path))
