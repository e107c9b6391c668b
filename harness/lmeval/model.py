"""EleutherAI lm-eval model ``harness``: a saved job evaluated through the method's deployed inference.

``HarnessLM`` (registered with lm-eval as ``harness``) loads a job folder written by
``python -m harness train`` (``checkpoint=DIR``: job.json, checkpoint/, tokenizer.json) and answers
lm-eval's three request types with the method's own inference code, never a re-implementation:

* ``loglikelihood`` / ``loglikelihood_rolling``: :meth:`LanguageModel.score` -- cached exact decoding,
  hard pruning, exact sequential latent steps, whatever the method deploys. Rows are sorted by length
  and right-padded within a batch (padding targets are -100: decoded but neither keys nor counted).
* ``generate_until``: greedy decoding with ``model.new_cache(B)`` + ``model.decode``: the prompt in one
  call, then one token per call, until a stop sequence, the end-of-text token or ``max_gen_toks``.
  Only prompts of equal token length share a batch, so every row keeps the positions it would have
  alone (exact for any method, whatever it does with positions); a finished row is fed as invalid
  (not a key, not counted) until its batch ends.

Decisions
---------
* Context length = the job's training ``seq_len``. A longer context is truncated from the left and the
  continuation kept whole, as lm-eval's HF model does with ``max_length``; a continuation longer than
  ``seq_len`` is scored in consecutive windows, each with as much preceding text as fits.
  ``loglikelihood_rolling`` uses lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``
  with ``max_seq_len = seq_len`` (disjoint windows, as lm-eval's HF model). Generation keeps the last
  ``seq_len`` prompt tokens and may then run past ``seq_len`` (beyond the training length) rather than
  cut the prompt down to make room.
* An empty context is conditioned on the end-of-text token (lm-eval's ``prefix_token_id``), as in
  training, where every document follows one.
* ``is_greedy`` needs the argmax of the very distributions ``score`` used, but ``ScoreOutput`` carries
  only the targets' log-probabilities. The adapter therefore observes the logits of the ``decode``
  calls ``score`` makes (for the duration of that call) instead of running the model a second time;
  a method whose ``score`` decodes in pieces that do not line up falls back to one extra decode pass.
* Compute: every model call runs inside the adapter's :class:`harness.core.compute.ComputeLedger`, so
  ``adapter.compute_summary()`` gives the FLOPs that really ran and the tokens processed (context
  included: the ledger's token count, as for ``infer_flops_per_token``);
  :func:`~harness.lmeval.runner.evaluate_downstream` reports ``flops_per_token`` per task from it.
* Sampling is not supported (``do_sample=True`` or ``temperature > 0`` is an error): the benchmark
  compares deployed greedy inference.

How lm-eval finds the model
---------------------------
lm-eval 0.4.13 looks ``--model NAME`` up in its in-process registry (``lm_eval.api.registry``); it has
no entry-point group or import hook for external models, so this module must be imported before lm-eval
resolves the name. ``harness-lm-eval`` (:mod:`harness.lmeval.runner`) is lm-eval's own command line (same
arguments) with the model registered::

    harness-lm-eval --model harness --model_args checkpoint=DIR \\
        --tasks harness_arc_easy,harness_piqa --include_path "$(python -m harness tasks --write)" \\
        --device cpu --batch_size 16 --num_fewshot 5

(``python -m harness tasks --write`` renders the offline task YAMLs and prints their folder; a job's
corpus perplexity task, written by ``python -m harness eval DIR --tasks corpus_ppl``, is given by path:
``--tasks DIR/lm_eval/harness_corpus_ppl.yaml``.) ``python -m harness eval DIR --tasks arc_easy,piqa
--num-fewshot 5`` does all of that through :func:`harness.lmeval.runner.evaluate_downstream` and stores the scores in
``DIR/result.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's built-in models: its registry loads them only while empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from harness.core import compute
from harness.core.errors import DownstreamError
from harness.data import Tokenizer
from harness.job import autocast_for, load_job, resolve_device
from models.base import IGNORE_INDEX

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model default
# lm-eval's default is 100000 resamples through a process pool (minutes per perplexity metric);
# 1000 resamples pin a standard error to a few percent of itself.
DEFAULT_BOOTSTRAP_ITERS = 1000
JOB_TASK_DIR = "lm_eval"  # inside a job folder: its corpus_ppl task and validation documents


@dataclass
class _Row:
    """One model input: ``tokens[:-1]`` is fed, ``tokens[1:]`` are the targets, the last ``n_scored``
    of which belong to request ``request``."""

    request: int
    tokens: list[int]
    n_scored: int


@dataclass
class _RowScore:
    logprob: float
    greedy: bool


def continuation_windows(tokens: Sequence[int], n_predict: int, max_len: int) -> list[tuple[list[int], int]]:
    """Rows scoring the last ``n_predict`` of ``tokens``, each feeding at most ``max_len`` tokens.

    Returns ``(row_tokens, n_scored)`` pairs. While the continuation fits (``n_predict <= max_len``)
    this is one row, ``tokens[-(max_len + 1):]``: the context truncated from the left, the continuation
    whole (lm-eval's HF model). A longer continuation is cut into consecutive spans of ``max_len``
    predictions, each preceded by as much of the text before it as fits.
    """
    if n_predict < 0 or n_predict > len(tokens) - 1:
        raise ValueError(f"cannot predict {n_predict} of {len(tokens)} tokens (the first one has no context)")
    rows = []
    start = len(tokens) - n_predict
    while start < len(tokens):
        end = min(start + max_len, len(tokens))
        rows.append((list(tokens[max(0, end - 1 - max_len):end]), end - start))
        start = end
    return rows


@contextlib.contextmanager
def _observe_greedy(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``argmax`` of the logits of every ``model.decode`` call made inside the block."""
    seen: list[torch.Tensor] = []
    decode = model.decode

    def observed(input_ids, cache, valid=None):
        out = decode(input_ids, cache, valid)
        seen.append(out.logits.argmax(dim=-1))
        return out

    model.decode = observed  # an instance attribute shadows the method for this block only
    try:
        yield seen
    finally:
        del model.decode


def _device_for(requested: str | None, job_device: str) -> torch.device:
    if requested is None or str(requested).strip() == "":
        return resolve_device(job_device)
    device = torch.device(str(requested))
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's command line passes --device cuda:0 by default; fall back like its HF model does
        log.warning("device %s is not available here; using cpu", requested)
        return torch.device("cpu")
    return device


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str):
        if value.startswith("auto"):  # lm-eval's "auto[:N]": no memory probing here, use the default
            log.info("batch_size=%s: using %d (the harness adapter does not probe memory)", value, DEFAULT_BATCH_SIZE)
            return DEFAULT_BATCH_SIZE
        try:
            value = int(value)
        except ValueError:
            raise DownstreamError(f"batch_size={value!r}: give a positive integer, e.g. 16") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DownstreamError(f"batch_size={value!r}: give a positive integer, e.g. 16")
    return value


@register_model("harness")
class HarnessLM(TemplateLM):
    """A harness job folder (``checkpoint=DIR``) as an lm-eval model, scored by its deployed inference.

    Model args: ``checkpoint`` (job folder, required), ``batch_size`` (default 16), ``device`` (default:
    the job's ``train.device``; an unavailable CUDA device falls back to cpu), ``max_gen_toks``
    (default 256, per-request ``max_gen_toks`` wins), ``progress`` (tqdm bars, default True).
    ``max_batch_size`` (from lm-eval's command line) is accepted and unused.
    """

    def __init__(self, checkpoint: str | pathlib.Path | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, max_batch_size: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, progress: bool = True) -> None:
        super().__init__()
        if checkpoint is None or str(checkpoint).strip() == "":
            raise DownstreamError("the harness lm-eval model needs a job folder: --model_args checkpoint=DIR")
        self.folder = pathlib.Path(str(checkpoint)).expanduser()
        self.job, model, _ = load_job(self.folder)
        self.tok = Tokenizer.load(self.folder / "tokenizer.json")
        if self.tok.vocab_size > model.config.vocab_size:
            raise DownstreamError(f"{self.folder}/tokenizer.json has {self.tok.vocab_size} tokens but the model "
                                  f"only {model.config.vocab_size}; the folder mixes two jobs, retrain it")
        self._device = _device_for(device, self.job.train.device)
        self.model = model.to(self._device).eval()
        self._autocast = lambda: autocast_for(self._device, self.job.train.precision)
        self.seq_len = int(self.job.train.seq_len)
        self.batch_size = _batch_size(batch_size)
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 0:
            raise DownstreamError(f"max_gen_toks={max_gen_toks!r}: give an integer >= 0")
        self.max_gen_toks = max_gen_toks
        self.progress = bool(progress)
        # what the adapter ran: FLOPs and processed tokens (ledger), plus the requests' own token counts
        self.ledger = compute.ComputeLedger()
        self.scored_tokens = 0  # continuation / rolling tokens whose log-probability was returned
        self.generated_tokens = 0
        self.extra_steps = 0.0  # latent / recursion steps over scored positions (adaptive methods)
        self.step_positions = 0

    # -- what lm-eval asks of a TemplateLM -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id  # training puts it before every document

    @property
    def max_length(self) -> int:
        return self.seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"harness-{self.tok.sha[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Merged by lm-eval into ``results["config"]``."""
        return {"harness_method": self.job.method, "harness_size": self.job.size,
                "harness_job_id": self.job.job_id(), "harness_seq_len": self.seq_len}

    # -- compute -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """No gradients, the job's precision, and every block call counted in this adapter's ledger."""
        with torch.no_grad(), self._autocast(), self.ledger:
            yield

    def compute_summary(self) -> dict[str, float]:
        """FLOPs that ran, tokens processed (context included), per token, and request-level counts."""
        totals = self.ledger.totals
        summary = {"flops": totals.forward_flops, "tokens": totals.tokens,
                   "flops_per_token": totals.per_token("forward_flops"),
                   "scored_tokens": float(self.scored_tokens), "generated_tokens": float(self.generated_tokens)}
        if self.step_positions:
            summary["mean_extra_steps"] = self.extra_steps / self.step_positions
        return summary

    # -- scoring -------------------------------------------------------------------------------

    def _score_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-probabilities, argmax tokens, extra steps) of a right-padded batch via ``model.score``."""
        with self._running():
            with _observe_greedy(self.model) as seen:
                out = self.model.score(inputs, targets)
            pieces = [p for p in seen if p.shape[0] == inputs.shape[0]]
            greedy = torch.cat(pieces, dim=1) if pieces else None
        if greedy is None or greedy.shape != targets.shape:
            # the method's score() decodes differently: one more pass, outside the ledger (bookkeeping)
            with torch.no_grad(), self._autocast():
                valid = targets != IGNORE_INDEX
                logits = self.model.decode(inputs, self.model.new_cache(inputs.shape[0]),
                                           None if bool(valid.all()) else valid).logits
            greedy = logits.argmax(dim=-1)
        return out.logprobs, greedy, out.steps

    def _score_rows(self, rows: list[_Row], desc: str, disable: bool = False) -> list[_RowScore]:
        """Score rows in batches of similar length (longest first: an out-of-memory shows up at once)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
        scores: list[_RowScore | None] = [None] * len(rows)
        n_batches = math.ceil(len(rows) / self.batch_size)
        with tqdm(total=n_batches, desc=desc, unit="batch", disable=disable or not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = max(len(rows[i].tokens) - 1 for i in chunk)
                inputs = torch.zeros(len(chunk), width, dtype=torch.long)
                targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
                for j, i in enumerate(chunk):
                    seq = torch.tensor(rows[i].tokens, dtype=torch.long)
                    inputs[j, :len(seq) - 1] = seq[:-1]
                    targets[j, :len(seq) - 1] = seq[1:]
                logprobs, greedy, steps = self._score_batch(inputs.to(self._device), targets.to(self._device))
                logprobs, greedy = logprobs.double().cpu(), greedy.cpu()
                for j, i in enumerate(chunk):
                    n, k = len(rows[i].tokens) - 1, rows[i].n_scored
                    span = slice(n - k, n)
                    scores[i] = _RowScore(float(logprobs[j, span].sum()),
                                          bool((greedy[j, span] == targets[j, span]).all()))
                    self.scored_tokens += k
                    if steps is not None:
                        self.extra_steps += float(steps[j, span].double().sum())
                        self.step_positions += k
                bar.update(1)
        return scores  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        rows: list[_Row] = []
        for index, (_, context, continuation) in enumerate(requests):
            for tokens, n_scored in continuation_windows(context + continuation, len(continuation), self.seq_len):
                rows.append(_Row(index, tokens, n_scored))
        results = [[0.0, True] for _ in requests]
        for row, score in zip(rows, self._score_rows(rows, "harness loglikelihood", disable_tqdm)):
            results[row.request][0] += score.logprob
            results[row.request][1] = results[row.request][1] and score.greedy
        answers = [(float(ll), bool(greedy)) for ll, greedy in results]
        for (pair, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood over disjoint windows of ``seq_len`` (lm-eval's rolling windows)."""
        rows: list[_Row] = []
        strings = [req.args[0] for req in requests]
        for index, string in enumerate(strings):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.seq_len, context_len=1)
            for context, predicted in map(lm_utils.make_disjoint_window, windows):
                rows.append(_Row(index, context + predicted, len(predicted)))
        totals = [0.0] * len(strings)
        for row, score in zip(rows, self._score_rows(rows, "harness loglikelihood_rolling", disable_tqdm)):
            totals[row.request] += score.logprob
        for string, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise DownstreamError(f"generation stop sequences must be a string or a list of strings, got {until!r}")
        max_new = kwargs.pop("max_gen_toks", self.max_gen_toks)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
            raise DownstreamError(f"max_gen_toks={max_new!r}: give an integer >= 0")
        do_sample = kwargs.pop("do_sample", False)
        temperature = kwargs.pop("temperature", 0.0)
        if do_sample or (temperature is not None and float(temperature) > 0):
            raise DownstreamError("the harness lm-eval model decodes greedily; set do_sample=False and "
                                  f"temperature=0 (got do_sample={do_sample}, temperature={temperature})")
        if kwargs:
            log.debug("ignoring generation settings that greedy decoding does not use: %s", sorted(kwargs))
        return [u for u in until if u], max_new

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first stop sequence."""
        prompts: list[list[int]] = []
        settings: list[tuple[list[str], int]] = []
        for req in requests:
            context, gen_kwargs = req.args
            ids = self.tok_encode(context) or [self.prefix_token_id]
            prompts.append(ids[-self.seq_len:])
            settings.append(self._generation_settings(gen_kwargs))
        # equal prompt lengths share a batch: every row keeps the positions it has alone
        by_length: dict[int, list[int]] = {}
        for i in sorted(range(len(requests)), key=lambda i: -len(prompts[i])):
            by_length.setdefault(len(prompts[i]), []).append(i)
        batches = [group[s:s + self.batch_size] for group in by_length.values()
                   for s in range(0, len(group), self.batch_size)]
        texts: list[str] = [""] * len(requests)
        with tqdm(total=len(batches), desc="harness generate_until", unit="batch",
                  disable=disable_tqdm or not self.progress) as bar:
            for batch in batches:
                out = self._greedy([prompts[i] for i in batch], [settings[i] for i in batch])
                for i, text in zip(batch, out):
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(1)
        return texts

    def _greedy(self, prompts: list[list[int]], settings: list[tuple[list[str], int]]) -> list[str]:
        """Greedy decoding of equal-length prompts with the method's cache, one token per decode call."""
        batch = len(prompts)
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [max_new == 0 for _, max_new in settings]
        if all(done):
            return [""] * batch
        with self._running():
            cache = self.model.new_cache(batch)
            ids = torch.tensor(prompts, dtype=torch.long, device=self._device)
            logits = self.model.decode(ids, cache).logits[:, -1]
            compute.record_tokens(ids.numel())
            while not all(done):
                next_ids = logits.argmax(dim=-1).tolist()
                for b in range(batch):
                    if done[b]:
                        continue
                    stops, max_new = settings[b]
                    if next_ids[b] == self.eot_token_id:
                        done[b] = True
                        continue
                    generated[b].append(next_ids[b])
                    text = self.tok_decode(generated[b])
                    done[b] = len(generated[b]) >= max_new or any(stop in text for stop in stops)
                if all(done):
                    break
                active = torch.tensor([not d for d in done], device=self._device)
                feed = torch.tensor(next_ids, dtype=torch.long, device=self._device)[:, None]
                logits = self.model.decode(feed, cache, None if bool(active.all()) else active[:, None]).logits[:, -1]
                compute.record_tokens(int(active.sum()))
        self.generated_tokens += sum(len(g) for g in generated)
        return [_cut_at_stops(self.tok_decode(g), stops) for g, (stops, _) in zip(generated, settings)]


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest stop sequence (lm-eval's HF model splits on each in turn: the same)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


__all__ = ["DEFAULT_BATCH_SIZE", "HarnessLM", "continuation_windows"]
