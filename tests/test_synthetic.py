"""The depth probe's data and metrics: ``synthetic:phop`` (harness/data/synthetic.py) and the metrics by
difficulty (harness/evaluate.py): a brute-force solver confirms every answer, the labels sit on the answers
only, generation is deterministic with disjoint training and validation streams, and the per-h metrics of a
hand-built case."""

from __future__ import annotations

import numpy as np
import pytest

from harness.core.errors import DataError
from harness.data import DataConfig, load_corpus, synthetic
from harness.data.cache import synthetic_corpus
from harness.evaluate import difficulty_metrics


def brute_hop(x: list[int], h: int) -> int | None:
    """hop_h(L) straight from the definition, by a different route than the generator's: the whole find
    table first, by scanning every earlier position."""
    L = len(x)
    find = [0] * (L + 1)
    for i in range(1, L + 1):
        js = [j for j in range(1, i) if x[j - 1] == x[i - 1]]
        find[i] = max(js) + 1 if js else 0
    p = L
    for _ in range(h):
        p = find[p]
        if p == 0:
            return None
    return x[p - 1]


SPEC = synthetic.parse("synthetic:phop:hops=4,length=10,alphabet=6,items=3,block=64,filler=random,seed=7")
ALPHABET = np.arange(100, 106)
START, QUERIES = 99, np.arange(90, 94)


def stream(part=0, spec=SPEC, blocks=200):
    return synthetic.generate(spec, part, blocks, None, 128, ALPHABET, START, QUERIES)


def items_of(s: synthetic.Stream, spec=SPEC):
    """(h, symbols, answer, answer position) of every item, found from the markers alone."""
    out = []
    for pos in np.flatnonzero(np.isin(s.tokens, QUERIES)):
        h = int(np.flatnonzero(s.tokens[pos] == QUERIES)[0]) + 1
        start = pos - spec.length - 1
        assert s.tokens[start] == START
        x = [int(np.flatnonzero(t == ALPHABET)[0]) for t in s.tokens[start + 1:pos]]
        out.append((h, x, int(np.flatnonzero(s.tokens[pos + 1] == ALPHABET)[0]), pos + 1))
    return out


def test_brute_force_solver_confirms_every_answer():
    found = items_of(stream())
    assert len(found) == 200 * SPEC.items
    for h, x, answer, _ in found:
        assert brute_hop(x, h) == answer == synthetic.hop(x, h)
        assert all(a != b for a, b in zip(x, x[1:]))  # no equal neighbours: every hop moves


def test_definition_on_a_hand_case():
    # x = a b c a b (1-based): find(5) = 3 (after the b at 2), find(3) = 0 -> hop_1 = c, hop_2 undefined
    x = [0, 1, 2, 0, 1]
    assert synthetic.find(x, 5) == 3 and synthetic.find(x, 3) == 0
    assert synthetic.hop(x, 1) == 2 and synthetic.hop(x, 2) is None
    # x = a b a b: find(4) = 3 -> x_3 = a; find(3) = 2 -> x_2 = b
    assert synthetic.hop([0, 1, 0, 1], 1) == 0 and synthetic.hop([0, 1, 0, 1], 2) == 1


def test_difficulty_labels_sit_on_answers_only():
    s = stream()
    found = items_of(s)
    labelled = np.flatnonzero(s.difficulty)
    assert sorted(labelled.tolist()) == sorted(pos for *_, pos in found)
    for h, _, _, pos in found:
        assert s.difficulty[pos] == h
    counts = np.bincount(s.difficulty, minlength=SPEC.hops + 1)[1:]
    assert counts.max() - counts.min() <= 1  # items cycle through h
    # no item crosses a block boundary
    for *_, pos in found:
        assert (pos - SPEC.item_tokens + 1) // SPEC.block == pos // SPEC.block


def test_deterministic_and_disjoint_train_and_validation():
    a, b = stream(0), stream(0)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.difficulty, b.difficulty)
    train = {tuple(x) for _, x, _, _ in items_of(stream(0))}
    val = {tuple(x) for _, x, _, _ in items_of(stream(1))}
    assert len(train & val) <= 0.01 * len(val)  # independent streams: only chance coincidences
    assert not np.array_equal(stream(1).tokens, a.tokens)
    other_seed = synthetic.parse("synthetic:phop:hops=4,length=10,alphabet=6,items=3,block=64,filler=random,seed=8")
    assert not np.array_equal(stream(0, other_seed).tokens, a.tokens)


MSUM = synthetic.parse("synthetic:msum:hops=5,modulus=3,items=6,block=64,filler=random,seed=3")
MSUM_QUERIES = np.arange(90, 95)


def msum_items(s: synthetic.Stream):
    """(h, digits, answer, answer position) of every running-sum item, found from the markers alone; the
    marker Q_h must name the number of digits."""
    out = []
    for pos in np.flatnonzero(np.isin(s.tokens, MSUM_QUERIES)):
        start = pos - 1
        while s.tokens[start] != START:
            start -= 1
        digits = [int(np.flatnonzero(t == ALPHABET)[0]) for t in s.tokens[start + 1:pos]]
        assert s.tokens[pos] == MSUM_QUERIES[len(digits) - 1]
        out.append((len(digits), digits, int(np.flatnonzero(s.tokens[pos + 1] == ALPHABET)[0]), pos + 1))
    return out


def test_running_sum_items_are_solved_by_brute_force_and_labelled():
    s = synthetic.generate(MSUM, 0, 300, None, 128, ALPHABET[:3], START, MSUM_QUERIES)
    found = msum_items(s)
    assert len(found) == 300 * MSUM.items
    for h, digits, answer, pos in found:
        assert 1 <= h <= MSUM.hops and all(0 <= d < 3 for d in digits)
        total = 0
        for d in digits:  # the running sum, one term at a time
            total = (total + d) % 3
        assert answer == total and s.difficulty[pos] == h
        assert (pos - h - 2) // MSUM.block == pos // MSUM.block  # the item lies inside one block
    assert sorted(np.flatnonzero(s.difficulty).tolist()) == [pos for *_, pos in found]
    counts = np.bincount(s.difficulty, minlength=MSUM.hops + 1)[1:]
    assert counts.min() == counts.max() == 300 * MSUM.items // MSUM.hops  # items cycle through h
    # answers are near uniform over the residues (no shortcut by frequency)
    answers = np.bincount([a for *_, a, _ in found], minlength=3) / len(found)
    assert np.abs(answers - 1 / 3).max() < 0.03
    assert np.array_equal(s.tokens, synthetic.generate(MSUM, 0, 300, None, 128, ALPHABET[:3], START,
                                                       MSUM_QUERIES).tokens)


def test_running_sum_by_hand():
    rng = np.random.default_rng(0)
    for h in range(1, 6):
        x, a = synthetic.make_sum_item(rng, h, 2)
        assert len(x) == h and a == int(x.sum()) % 2
    spec = synthetic.parse("synthetic:msum:hops=6,modulus=2,items=10")
    assert spec.item_tokens == 9 and spec.symbols == 2 and spec.item_length(1) == 4


@pytest.mark.parametrize("source", ["synthetic:nope", "synthetic:phop:hops=9", "synthetic:phop:items=20",
                                    "synthetic:msum:modulus=1", "synthetic:msum:hops=8,items=20,block=128",
                                    "synthetic:phop:length=x", "synthetic:phop:colour=red",
                                    "synthetic:phop:filler=noise"])
def test_bad_sources_fail_in_one_line(source):
    with pytest.raises(DataError, match="synthetic"):
        DataConfig(source=source)


def test_a_corpus_carries_validation_difficulty(small_corpus):
    base = load_corpus(DataConfig(source=small_corpus, vocab_size=512))
    cfg = DataConfig(source="synthetic:phop:hops=3,length=8,items=2,block=64,tokens=20000", vocab_size=512)
    corpus = synthetic_corpus(cfg, base)
    assert len(corpus.train) >= 20000 and corpus.val_difficulty is not None
    assert len(corpus.val_difficulty) == len(corpus.val) and corpus.val.dtype == base.val.dtype
    assert set(np.unique(corpus.val_difficulty)) == {0, 1, 2, 3}
    again = synthetic_corpus(cfg, base)
    assert np.array_equal(again.train, corpus.train) and corpus.meta["content_sha"] == again.meta["content_sha"]
    # text filler: the answers decode to the reserved bytes, the filler to the corpus's text
    alphabet, start, queries = synthetic.reserved_ids(corpus.tokenizer, synthetic.parse(cfg.source))
    answers = np.asarray(corpus.val)[corpus.val_difficulty > 0]
    assert np.isin(answers, alphabet).all()
    assert not np.isin(np.asarray(base.train), np.concatenate([alphabet, queries, [start]])).any()


def test_metrics_by_difficulty_on_a_hand_built_case():
    #            filler filler  h=1   h=1   h=2   h=2   filler
    difficulty = np.array([0, 0, 1, 1, 2, 2, 0])
    records = {"token": np.array([5, 6, 7, 8, 9, 9, 1]), "greedy": np.array([5, 0, 7, 0, 9, 9, 1]),
               "nll": np.array([1.0, 2.0, 0.5, 1.5, 0.2, 0.4, 3.0], dtype=np.float32),
               "steps": np.array([0, 0, 1, 2, 3, 3, 1], dtype=np.int16)}
    m = difficulty_metrics(difficulty, records, True, 1e6)
    assert m["difficulty"]["0"] == pytest.approx({"n": 3, "accuracy": 2 / 3, "nll": 2.0, "mean_steps": 1 / 3})
    assert m["difficulty"]["1"] == pytest.approx({"n": 2, "accuracy": 0.5, "nll": 1.0, "mean_steps": 1.5})
    assert m["difficulty"]["2"] == pytest.approx({"n": 2, "accuracy": 1.0, "nll": 0.3, "mean_steps": 3.0})
    assert m["deepest_h_accuracy"] == 1.0 and m["difficulty_max_h"] == 2
    assert m["spearman_steps_h"] == pytest.approx(np.corrcoef([1, 2, 3.5, 3.5], [1.5, 1.5, 3.5, 3.5])[0, 1])
    fixed = difficulty_metrics(difficulty, records, False, 1e6)
    assert "mean_steps" not in fixed["difficulty"]["1"] and "spearman_steps_h" not in fixed


def test_a_job_on_synthetic_data_reports_accuracy_by_difficulty(small_corpus, tmp_path, monkeypatch):
    """End to end: a short PonderLM-3 job on a p-hop source carries the metrics, from the deployed greedy tokens."""
    import torch

    from harness.job import Job, TrainConfig
    from harness.train import train_job

    base = load_corpus(DataConfig(source=small_corpus, vocab_size=512))
    source = "synthetic:phop:hops=2,length=6,items=2,block=32,tokens=4000"
    monkeypatch.setattr("harness.train.load_corpus", lambda cfg: synthetic_corpus(cfg, base))
    torch.set_num_threads(1)
    job = Job(method="ponderlm3", budget=2.7e10, size="pico", model={"latent_steps": 2},  # 4 steps
              data=DataConfig(source=source, vocab_size=512),
              train=TrainConfig(seq_len=32, batch_size=4, eval_tokens=640, curve_points=0))
    result = train_job(job, tmp_path / "job", progress=False, tracker="none")
    by_h = result["difficulty"]
    assert set(by_h) == {"0", "1", "2"} and result["difficulty_max_h"] == 2
    assert result["deepest_h_accuracy"] == by_h["2"]["accuracy"]
    records = np.load(tmp_path / "job" / "tokens.npz")
    answers = records["difficulty"] == 2
    assert by_h["2"]["n"] == int(answers.sum()) > 0
    assert by_h["2"]["accuracy"] == pytest.approx((records["greedy"] == records["token"])[answers].mean())
    assert all("mean_steps" in row for row in by_h.values())
