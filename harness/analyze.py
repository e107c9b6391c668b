"""``python -m harness analyze DIR [--top N] [--bins N] [--groups N] [--out DIR2] [--json]``.

Where an adaptive job spends its latent steps, as PonderLM-3's token analysis shows it: steps against
token NLL, the most frequent tokens' steps, and rare against frequent tokens.

Input: the per-token evaluation records that ``train``/``eval`` write to ``DIR/tokens.npz`` --
``token`` (the id of the *predicted* token, i.e. the target), ``nll`` (its negative log-likelihood
under deployed inference) and ``steps`` (extra latent steps taken at the position that predicted it;
0 for non-adaptive methods) -- and ``DIR/tokenizer.json`` to print tokens as text (ids are shown
without it). Steps and NLL are therefore paired per prediction: "this token was predicted with k
steps and cost this many nats".

Output (in DIR, or ``--out``):

* ``steps_vs_nll.png`` -- left: mean extra steps per equal-count NLL quantile bin, with a 95%
  confidence band (t interval of the mean) and a +-1 std band; right: mean extra steps per
  token-frequency group, rarest to most frequent, with the same bands;
* ``token_steps.md`` -- the most frequent tokens (decoded text, count, mean steps, mean NLL) and the
  rare-versus-frequent comparison, as printed;
* ``analysis.json`` -- everything above plus the Spearman correlation of steps with NLL and with
  token frequency (``scipy.stats.spearmanr``), the step histogram and the per-bin numbers.

Decisions: frequency is counted on the evaluation records themselves (the text analysed), so the
analysis needs nothing but the job folder. Frequency groups hold whole token types: types are sorted
from rarest to most frequent and cut into ``--groups`` groups of about equal numbers of occurrences
(a type goes to the group its middle occurrence falls in), so "rare" is the rarest 1/groups of the
text and "frequent" the most frequent 1/groups. Their steps are compared by a two-sided Mann-Whitney
U test. When steps do not vary (a fixed-step method, or a PonderLM-3 whose tail masses never fell
under the prune threshold) a correlation with steps is undefined: the report says so instead of
printing NaN.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.core.errors import AnalysisError
from harness.core.io import write_json_atomic
from harness.data import Tokenizer

RECORDS_FILE = "tokens.npz"
PLOT_FILE = "steps_vs_nll.png"
TABLE_FILE = "token_steps.md"
SUMMARY_FILE = "analysis.json"
RECORD_FIELDS = ("token", "nll", "steps")


@dataclass
class TokenRecords:
    """Per-prediction evaluation records of one job (1-D arrays of equal length)."""

    token: np.ndarray  # int64 id of the predicted token
    nll: np.ndarray  # float64 nats
    steps: np.ndarray  # int64 extra latent steps

    def __len__(self) -> int:
        return len(self.token)


def load_records(path: str | pathlib.Path) -> TokenRecords:
    """Read and check ``tokens.npz`` (``path`` is the file or the job folder holding it)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.exists():
        folder = path.parent
        hint = (f"evaluate the job first (python -m harness eval {folder})" if (folder / "checkpoint").is_dir()
                else "give a job folder written by `python -m harness train`")
        raise AnalysisError(f"per-token records not found: {path}; {hint}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in RECORD_FIELDS if name not in data.files]
            if missing:
                raise AnalysisError(f"{path} lacks the array(s) {', '.join(missing)} "
                                    f"(has {', '.join(data.files) or 'none'}); "
                                    f"re-evaluate the job (python -m harness eval {path.parent})")
            arrays = {name: np.asarray(data[name]).reshape(-1) for name in RECORD_FIELDS}
    except AnalysisError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError) as exc:
        raise AnalysisError(f"{path} is corrupt ({type(exc).__name__}: {exc}); delete it and re-evaluate the job "
                            f"(python -m harness eval {path.parent})") from None
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise AnalysisError(f"{path} is inconsistent: arrays of different lengths {lengths}; re-evaluate the job")
    if lengths["token"] == 0:
        raise AnalysisError(f"{path} holds no records; re-evaluate the job with train.eval_tokens > 0")
    for name in ("token", "steps"):
        if not np.issubdtype(arrays[name].dtype, np.integer):
            raise AnalysisError(f"{path}: '{name}' has dtype {arrays[name].dtype}, expected integers; "
                                "re-evaluate the job")
    nll = arrays["nll"].astype(np.float64)
    bad = int((~np.isfinite(nll)).sum())
    if bad:
        raise AnalysisError(f"{path}: {bad} of {len(nll)} NLL values are not finite; re-evaluate the job")
    if (arrays["steps"] < 0).any() or (arrays["token"] < 0).any():
        raise AnalysisError(f"{path}: negative token ids or step counts; re-evaluate the job")
    return TokenRecords(arrays["token"].astype(np.int64), nll, arrays["steps"].astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# statistics


def _mean_band(values: np.ndarray) -> dict[str, float]:
    """Mean, std, and the half-width of the 95% t confidence interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
    return {"count": int(n), "mean": mean, "std": std, "ci95": half}


def spearman(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> dict[str, Any]:
    """Spearman's rho and p-value, or ``rho: None`` and the reason when one side is constant."""
    from scipy import stats

    for values, name in ((x, x_name), (y, y_name)):
        if len(values) < 3:
            return {"rho": None, "pvalue": None, "reason": f"only {len(values)} records"}
        if np.all(values == values[0]):
            return {"rho": None, "pvalue": None,
                    "reason": f"{name} has the same value ({_plain(values[0])}) for every token, so it cannot "
                              f"co-vary with {y_name if name == x_name else x_name}"}
    result = stats.spearmanr(x, y)
    return {"rho": float(result.statistic), "pvalue": float(result.pvalue), "reason": None}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def nll_bins(records: TokenRecords, n_bins: int) -> list[dict[str, float]]:
    """Equal-count bins of the records sorted by NLL (ties split by position), with mean steps."""
    order = np.argsort(records.nll, kind="stable")
    rows = []
    for chunk in np.array_split(order, min(n_bins, len(order))):
        nll, steps = records.nll[chunk], records.steps[chunk].astype(np.float64)
        rows.append({"nll_min": float(nll.min()), "nll_max": float(nll.max()), "nll_mean": float(nll.mean()),
                     **{f"steps_{k}": v for k, v in _mean_band(steps).items()}})
    return rows


def frequency_groups(records: TokenRecords, n_groups: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Group index of every record (0 = rarest) and one summary row per non-empty group.

    Whole token types per group: types sorted rarest first (ties by id), each assigned to the group
    its middle occurrence falls in, so groups hold about equal numbers of occurrences.
    """
    types, inverse, counts = np.unique(records.token, return_inverse=True, return_counts=True)
    order = np.lexsort((types, counts))  # ascending count, then id
    cumulative = np.cumsum(counts[order])
    middle = (cumulative - counts[order] / 2.0) / cumulative[-1]
    group_of_type = np.empty(len(types), dtype=np.int64)
    group_of_type[order] = np.minimum((middle * n_groups).astype(np.int64), n_groups - 1)
    group = group_of_type[inverse]
    rows = []
    for g in range(n_groups):
        members = group == g
        if not members.any():
            continue
        type_counts = counts[group_of_type == g]
        rows.append({"group": g, "types": int((group_of_type == g).sum()), "occurrences": int(members.sum()),
                     "share": float(members.mean()), "min_count": int(type_counts.min()),
                     "max_count": int(type_counts.max()), "nll_mean": float(records.nll[members].mean()),
                     **{f"steps_{k}": v for k, v in _mean_band(records.steps[members].astype(np.float64)).items()}})
    return group, rows


def rare_vs_frequent(records: TokenRecords, group: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rarest group against the most frequent one: mean steps, mean NLL, Mann-Whitney U on steps."""
    from scipy import stats

    if len(rows) < 2:
        return {"rare": rows[0] if rows else None, "frequent": None, "steps_difference": None, "pvalue": None,
                "reason": "fewer than two frequency groups (too few distinct tokens)"}
    rare, frequent = rows[0], rows[-1]
    rare_steps = records.steps[group == rare["group"]]
    frequent_steps = records.steps[group == frequent["group"]]
    out = {"rare": rare, "frequent": frequent,
           "steps_difference": rare["steps_mean"] - frequent["steps_mean"],
           "nll_difference": rare["nll_mean"] - frequent["nll_mean"], "pvalue": None, "reason": None}
    both = np.concatenate([rare_steps, frequent_steps])
    if np.all(both == both[0]):
        out["reason"] = f"steps are constant ({_plain(both[0])}) in both groups: no difference to test"
    else:
        out["pvalue"] = float(stats.mannwhitneyu(rare_steps, frequent_steps, alternative="two-sided").pvalue)
    return out


def top_tokens(records: TokenRecords, top: int, decode) -> list[dict[str, Any]]:
    """The ``top`` most frequent predicted tokens (ties by id) with their mean steps and NLL."""
    types, inverse, counts = np.unique(records.token, return_inverse=True, return_counts=True)
    steps_sum = np.bincount(inverse, weights=records.steps.astype(np.float64))
    nll_sum = np.bincount(inverse, weights=records.nll)
    order = np.lexsort((types, -counts))[:top]
    return [{"token": int(types[i]), "text": decode(int(types[i])), "count": int(counts[i]),
             "share": float(counts[i] / len(records)), "steps_mean": float(steps_sum[i] / counts[i]),
             "nll_mean": float(nll_sum[i] / counts[i])} for i in order]


# ---------------------------------------------------------------------------------------------------
# text and figure


def _token_decoder(folder: pathlib.Path):
    """id -> printable text via the job's tokenizer (escaped whitespace), or ``<id N>`` without one."""
    path = folder / "tokenizer.json"
    if not path.exists():
        print(f"warning: {path} not found; tokens are shown as ids", file=sys.stderr)
        return lambda i: f"<id {i}>", False
    tokenizer = Tokenizer.load(path)
    return lambda i: _printable(tokenizer.decode([i])), True


_VISIBLE = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _printable(text: str) -> str:
    """Make spaces, newlines and control characters visible (a token is often just a space or newline)."""
    shown = "".join(_VISIBLE.get(ch) or (ch.encode("unicode_escape").decode("ascii")
                                         if unicodedata.category(ch).startswith("C") else ch) for ch in text)
    return shown or "(empty)"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "\\`")


def markdown_report(summary: dict[str, Any]) -> str:
    """The printed report: correlation, top-token table and rare-versus-frequent comparison."""
    lines = [f"# Token analysis: {summary['job']}", "",
             f"{summary['n_tokens']:,} predicted tokens, {summary['n_types']:,} distinct; mean extra steps "
             f"{summary['mean_steps']:.3f} (max {summary['max_steps']}).", "",
             *([summary["note"], ""] if summary.get("note") else []),
             "Spearman correlation of steps with token NLL: " + _describe_rho(summary["spearman_steps_nll"]),
             "Spearman correlation of steps with token frequency: "
             + _describe_rho(summary["spearman_steps_frequency"]), "",
             f"## The {len(summary['top_tokens'])} most frequent tokens", "",
             "| rank | token | id | count | share | mean steps | mean NLL |",
             "| ---: | :--- | ---: | ---: | ---: | ---: | ---: |"]
    for rank, row in enumerate(summary["top_tokens"], 1):
        lines.append(f"| {rank} | `{_markdown_cell(row['text'])}` | {row['token']} | {row['count']:,} | "
                     f"{row['share']:.2%} | {row['steps_mean']:.3f} | {row['nll_mean']:.3f} |")
    comparison = summary["rare_vs_frequent"]
    lines += ["", f"## Rare against frequent tokens (rarest and most frequent 1/{summary['groups']} of the text)", ""]
    if comparison["frequent"] is None:
        lines.append(comparison["reason"])
    else:
        lines += ["| group | types | occurrences | count per type | mean steps (95% CI) | mean NLL |",
                  "| :--- | ---: | ---: | :--- | :--- | ---: |"]
        for label in ("rare", "frequent"):
            g = comparison[label]
            lines.append(f"| {label} | {g['types']:,} | {g['occurrences']:,} | {_count_range(g)} | "
                         f"{g['steps_mean']:.3f} \u00b1 {g['steps_ci95']:.3f} | {g['nll_mean']:.3f} |")
        lines.append("")
        difference = (f"rare tokens take {comparison['steps_difference']:+.3f} extra steps on average relative "
                      f"to frequent ones and cost {comparison['nll_difference']:+.3f} nats more")
        test = (f"Mann-Whitney U {_p(comparison['pvalue'])}" if comparison["pvalue"] is not None
                else comparison["reason"])
        lines.append(f"{difference}; {test}.")
    return "\n".join(lines) + "\n"


def _count_range(group: dict[str, Any]) -> str:
    low, high = group["min_count"], group["max_count"]
    return str(low) if low == high else f"{low}-{high}"


def _describe_rho(result: dict[str, Any]) -> str:
    if result["rho"] is None:
        return f"undefined ({result['reason']})."
    return f"rho = {result['rho']:+.4f} ({_p(result['pvalue'])})."


def _p(pvalue: float) -> str:
    """p-values underflow to 0 for large samples; say so rather than print p = 0."""
    return "p < 1e-300" if pvalue == 0 else f"p = {pvalue:.2g}"


def _short_rho(result: dict[str, Any]) -> str:
    if result["rho"] is None:
        return "Spearman undefined: constant steps" if "steps" in (result["reason"] or "") else "Spearman undefined"
    return f"Spearman \u03c1 = {result['rho']:+.3f}, {_p(result['pvalue'])}"


def plot(summary: dict[str, Any], path: pathlib.Path) -> None:
    """Two panels: mean steps per NLL quantile bin, mean steps per frequency group (95% CI, +-1 std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    blue = sns.color_palette()[0]

    def bands(ax, x, rows):
        mean = np.array([r["steps_mean"] for r in rows])
        std = np.array([r["steps_std"] for r in rows])
        ci = np.array([r["steps_ci95"] for r in rows])
        ax.fill_between(x, mean - std, mean + std, color=blue, alpha=0.12, linewidth=0, label="\u00b11 std")
        ax.fill_between(x, mean - ci, mean + ci, color=blue, alpha=0.35, linewidth=0, label="95% CI of the mean")
        ax.plot(x, mean, "o-", color=blue, label="mean extra steps")
        top = max(summary["max_steps"], summary.get("latent_steps") or 0)
        ax.set_ylim(-0.05 * max(top, 1), max(top, 1) * 1.08)
        ax.legend(loc="best", fontsize="small")

    bins = summary["nll_bins"]
    bands(left, [b["nll_mean"] for b in bins], bins)
    left.set_xlabel(f"token NLL (nats; mean of each of {len(bins)} equal-count quantile bins)")
    left.set_ylabel("extra latent steps")
    left.set_title(f"Steps vs token NLL ({_short_rho(summary['spearman_steps_nll'])})", fontsize="medium")

    groups = summary["frequency_groups"]
    x = np.arange(1, len(groups) + 1)
    bands(right, x, groups)
    right.set_xticks(x, [_count_range(g) for g in groups], rotation=45, ha="right", fontsize="small")
    right.set_xlabel("frequency group, rarest \u2192 most frequent\n(occurrences per token type)")
    right.set_title(f"Steps vs token frequency ({_short_rho(summary['spearman_steps_frequency'])})",
                    fontsize="medium")
    fig.suptitle(f"{summary['job']}: where the latent steps go ({summary['n_tokens']:,} tokens)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# the analysis


def _job_context(folder: pathlib.Path) -> dict[str, Any]:
    """Method, size and K from result.json (or job.json) when present; the analysis needs neither."""
    for name in ("result.json", "job.json"):
        path = folder / name
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            config = data.get("config") or data.get("model") or {}
            return {"method": data.get("method"), "size": data.get("size"),
                    "latent_steps": config.get("latent_steps")}
    return {"method": None, "size": None, "latent_steps": None}


def _adaptivity_note(records: TokenRecords, context: dict[str, Any]) -> str | None:
    """A line for the report when steps do not vary, saying what that means for the job."""
    if records.steps.min() != records.steps.max():
        return None
    k, steps = context.get("latent_steps"), int(records.steps[0])
    if k and steps == k:
        return (f"Every token took all K={k} latent steps: no tail mass w fell below the prune threshold, so the "
                "deployed model did not adapt (train longer or raise compute_penalty to see pruning).")
    return f"Every token took {steps} extra step(s): this job's steps do not depend on the token."


def analyze(folder: str | pathlib.Path, top: int = 20, bins: int = 10, groups: int = 10,
            out: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Analyse the records of job ``folder``; write the plot, table and summary; return the summary."""
    for name, value, low in (("--top", top, 1), ("--bins", bins, 1), ("--groups", groups, 2)):
        if value < low:
            raise AnalysisError(f"{name}={value}: must be >= {low}")
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"job folder not found: {folder}")
    records = load_records(folder)
    context = _job_context(folder)
    if not records.steps.any():  # no step to set against NLL or frequency: a plot and table would be empty talk
        method = f"{context['method']} job" if context["method"] else "job"
        raise AnalysisError(f"nothing to analyse in {folder}: every one of its {len(records):,} tokens took 0 extra "
                            f"steps (a {method} without extra steps, or one that pruned them all); analyze an "
                            "adaptive job such as ponderlm3 or mor; nothing was written")
    out = pathlib.Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    decode, decoded = _token_decoder(folder)
    counts_per_record = np.unique(records.token, return_inverse=True, return_counts=True)
    frequency = counts_per_record[2][counts_per_record[1]]
    group, group_rows = frequency_groups(records, groups)
    histogram = np.bincount(records.steps)
    label = " ".join(str(part) for part in (context["method"], context["size"]) if part) or folder.name
    summary: dict[str, Any] = {
        "job": label,
        "folder": str(folder), **context, "n_tokens": len(records),
        "n_types": int(len(counts_per_record[0])), "tokens_decoded": decoded,
        "mean_steps": float(records.steps.mean()), "max_steps": int(records.steps.max()),
        "mean_nll": float(records.nll.mean()),
        "step_histogram": {str(k): int(v) for k, v in enumerate(histogram) if v},
        "spearman_steps_nll": spearman(records.steps, records.nll, "steps", "NLL"),
        "spearman_steps_frequency": spearman(records.steps, frequency, "steps", "token frequency"),
        "nll_bins": nll_bins(records, bins), "groups": groups, "frequency_groups": group_rows,
        "rare_vs_frequent": rare_vs_frequent(records, group, group_rows),
        "top_tokens": top_tokens(records, top, decode),
        "files": {"plot": str(out / PLOT_FILE), "table": str(out / TABLE_FILE), "summary": str(out / SUMMARY_FILE)},
    }
    summary["note"] = _adaptivity_note(records, context)
    plot(summary, out / PLOT_FILE)
    (out / TABLE_FILE).write_text(markdown_report(summary))
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


__all__ = ["TokenRecords", "analyze", "frequency_groups", "load_records",
           "markdown_report", "nll_bins", "plot", "rare_vs_frequent", "spearman", "top_tokens"]
