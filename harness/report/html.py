"""``DIR/report.html``: one self-contained page for a study (``python -m harness report DIR``; every sweep at its end).

The page holds, in this order: the study's description and protocol (``DIR/study.toml``, the copy a sweep keeps),
the preconditions and claims with their intervals (:func:`harness.claims.evaluate_preconditions` and
:func:`~harness.claims.evaluate_claims`: the same verdicts as claims.md, nothing recomputed here), the figures
(:mod:`harness.report.plots`, as PNG data URIs), the comparison table with sortable columns
(:mod:`harness.report.tables`' columns and cells), the per-token step analysis of the adaptive jobs (their
records' ``token_analysis``) and one row per job linking the files in its folder (``jobs/<id>/result.json``,
``metrics.jsonl``, the TensorBoard events, ...; links are relative, so the page works wherever the folder is
copied). No network: CSS and a few lines of JavaScript (column sorting) are inline. The markup is a Jinja2
template (``templates/report.html.j2``), autoescaped; claims' evidence, markdown in claims.md, is rendered with
markdown-it (raw HTML off).
"""

from __future__ import annotations

import base64
import os
import pathlib
import sys
from typing import Any

from harness.claims import (
    PREMISES,
    curve_lines,
    evaluate_claims,
    evaluate_preconditions,
    is_pipeline_check,
    load_arms,
    pruning_lines,
)
from harness.core.io import write_bytes_atomic
from harness.report.plots import BPB_PNG, CURVES_PNG, PARETO_PNG, PRECONDITIONS_PNG, TRAIN_PNG, render_pngs
from harness.report.runs import Runs, _caption, _groups, _missing, _si, _size_rank, aggregate, load_runs
from harness.report.style import display_name, method_colour
from harness.report.tables import _best, _cell, _columns, _failed_lines
from harness.results import FAILED, OK, ResultsStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPORT_HTML = "report.html"
TEMPLATE = "report.html.j2"
JOB_FILES = ("result.json", "metrics.jsonl", "job.json", "tokens.npz", "steps_vs_nll.png", "token_steps.md",
             "tensorboard", "wandb")
FIGURE_TEXT = {
    PARETO_PNG: ("Perplexity against measured inference FLOPs",
                 "Means over seeds with 95% t intervals; lines: each method's Pareto frontier through its means, "
                 "dashed: the frontier of every mean."),
    BPB_PNG: ("Bits per byte against measured inference FLOPs", "The tokenizer-independent metric; as above."),
    TRAIN_PNG: ("Perplexity against measured training FLOPs", "Where each job's training budget went."),
    CURVES_PNG: ("Learning curves", "Parallel validation loss during training, mean over seeds and 95% t band."),
    PRECONDITIONS_PNG: ("Preconditions along training",
                        "Paired differences of the preconditions' arms on the learning curves; below 0 the "
                        "precondition holds at that point."),
}
_VERDICT_CLASS = (("supported", "ok"), ("contradicted", "bad"), ("not testable", "na"), ("indicative", "weak"),
                  ("inconclusive", "unsure"))


def _markdown(lines: list[str]) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render("\n".join(lines))


def verdict_class(text: str) -> str:
    """The CSS class of a verdict's badge."""
    return next((css for word, css in _VERDICT_CLASS if text.startswith(word)), "unsure")


def study_context(folder: pathlib.Path) -> dict[str, Any] | None:
    """The study's description, protocol and arms from ``study.toml``; None when the folder has none."""
    path = folder / "study.toml"
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        study = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {"text": text, "error": f"study.toml does not parse: {exc}", "protocol": [], "arms": []}
    keys = ("protocol", "tokens", "budget", "reference_size", "sizes", "seeds", "tasks", "set", "compile",
            "devices_per_job", "pipeline_check")
    protocol = [(k, _plain(study[k])) for k in keys if k in study]
    arms = [{"method": a.get("method", "?"), "label": a.get("label", ""),
             "details": "; ".join(f"{k} = {_plain(v)}" for k, v in a.items() if k not in ("method", "label"))}
            for a in study.get("arms", [])]
    return {"text": text, "description": study.get("description", ""), "protocol": protocol, "arms": arms,
            "error": None}


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    if isinstance(value, float) and value >= 1e4:
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def claims_context(folder: pathlib.Path) -> dict[str, Any]:
    """The verdicts of claims.md, as page sections (the rules are harness.claims')."""
    arms = load_arms(folder)
    preconditions = evaluate_preconditions(arms)
    verdicts = evaluate_claims(arms, preconditions)

    def section(v, precondition: bool) -> dict[str, Any]:
        return {"claim": v.claim, "verdict": v.display(), "css": verdict_class(v.verdict), "n": v.n,
                "statement": v.statement, "decision": v.decision, "precondition": precondition,
                "premises": ", ".join(PREMISES.get(v.claim, ())), "evidence": _markdown(v.evidence)}

    along, pruning = curve_lines(arms), pruning_lines(arms)
    return {"preconditions": [section(v, True) for v in preconditions],
            "claims": [section(v, False) for v in verdicts],
            "along": _markdown(along) if along else "", "pruning": _markdown(pruning) if pruning else ""}


def _sort_key(value: Any) -> str:
    if _missing(value):
        return ""
    return f"{value:.10g}" if isinstance(value, (int, float)) else str(value)


def tables_context(runs: Runs) -> list[dict[str, Any]]:
    """One sortable table per (match, budget): headers, and cells with their text, sort key and best mark."""
    out = []
    for (match, budget), part in _groups(aggregate(runs.ok)):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        rows = []
        for i, row in part.iterrows():
            cells = [{"text": _cell(row, c, False), "sort": _sort_key(row[c.key]), "best": i in best[c.key],
                      "numeric": c.kind != "text"} for c in columns]
            rows.append({"cells": cells, "colour": method_colour(row["method"])})
        out.append({"caption": _caption(match, budget, part), "headers": [c.header for c in columns],
                    "numeric": [c.kind != "text" for c in columns], "rows": rows, "match": match})
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if _missing(value) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.{digits}f}"


def token_context(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-token step analysis of every job that has one (adaptive methods: a sweep runs it for them)."""
    out = []
    for r in records:
        analysis = r.get("token_analysis")
        if not analysis:
            continue
        histogram = {int(k): int(v) for k, v in (analysis.get("step_histogram") or {}).items()}
        total = sum(histogram.values()) or 1
        bars = [{"steps": k, "count": v, "share": 100.0 * v / total} for k, v in sorted(histogram.items())]
        out.append({"name": display_name(r.get("method"), (r.get("tags") or {}).get("variant")), "size": r.get("size"),
                    "seed": r.get("seed", 0), "colour": method_colour(r.get("method")), "job_id": r.get("job_id"),
                    "mean_steps": _fmt(r.get("mean_extra_steps")),
                    "rho": _fmt(analysis.get("spearman_steps_nll")),
                    "rho_p": _pvalue(analysis.get("spearman_steps_nll_pvalue")),
                    "rare": _fmt(analysis.get("rare_mean_steps")),
                    "frequent": _fmt(analysis.get("frequent_mean_steps")),
                    "rare_p": _pvalue(analysis.get("rare_vs_frequent_pvalue")), "bars": bars})
    return sorted(out, key=lambda t: (t["name"], _size_rank(t["size"]), t["seed"]))


def _pvalue(value: Any) -> str:
    if _missing(value) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.2g}" if value >= 1e-3 else "< 0.001"


def jobs_context(store: ResultsStore, base: pathlib.Path) -> list[dict[str, Any]]:
    """One row per job of runs.jsonl (its latest record), with links (relative to ``base``, the page's folder) to
    the files its folder holds."""
    rows = []
    for job_id, r in store.latest().items():
        job_dir = store.job_dir(job_id)
        links = [{"name": name + ("/" if (job_dir / name).is_dir() else ""),
                  "href": pathlib.Path(os.path.relpath((job_dir / name).resolve(), base)).as_posix()}
                 for name in JOB_FILES if (job_dir / name).exists()]
        variant = (r.get("tags") or {}).get("variant")
        ppl = r.get("val_ppl")
        rows.append({"job_id": job_id, "name": display_name(r.get("method") or "?", variant), "size": r.get("size"),
                     "seed": r.get("seed", 0), "status": r.get("status"),
                     "colour": method_colour(r.get("method") or ""),
                     "val_loss": _fmt(r.get("val_loss"), 4), "val_ppl": _fmt(ppl, 2),
                     "flops": _si(r["infer_flops_per_token"]) if isinstance(r.get("infer_flops_per_token"),
                                                                             (int, float)) else "–",
                     "seconds": _fmt(r.get("wall_seconds"), 0), "error": r.get("error") or "", "links": links,
                     "sort": (r.get("method") or "", variant or "", _size_rank(r.get("size") or ""), r.get("seed", 0))})
    return sorted(rows, key=lambda row: row["sort"])


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(folder: str | os.PathLike, runs: Runs | None = None, pngs: dict[str, bytes] | None = None,
                base: str | os.PathLike | None = None) -> str:
    """The page's text for a sweep folder (``runs`` and ``pngs``: already loaded and drawn, else done here;
    ``base``: the folder the page will be in, default ``folder``: its links to job files are relative to it)."""
    import jinja2

    folder = pathlib.Path(folder)
    runs = runs if runs is not None else load_runs(folder)
    pngs = pngs if pngs is not None else render_pngs(runs)
    store = ResultsStore(folder)
    latest = store.latest()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(pathlib.Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    figures = [{"title": FIGURE_TEXT.get(name, (name, ""))[0], "caption": FIGURE_TEXT.get(name, ("", ""))[1],
                "file": name, "src": _data_uri(data)} for name, data in pngs.items()]
    methods = sorted({r.get("method") for r in runs.records if r.get("method")})
    context = {
        "title": folder.resolve().name, "study": study_context(folder),
        "pipeline_check": is_pipeline_check(folder), "claims": claims_context(folder), "figures": figures,
        "tables": tables_context(runs), "tokens": token_context(runs.records),
        "jobs": jobs_context(store, pathlib.Path(base or folder).resolve()),
        "failed": _failed_lines(runs), "skipped": store.skipped_note(),
        "counts": {"ok": sum(r.get("status") == OK for r in latest.values()),
                   "failed": sum(r.get("status") == FAILED for r in latest.values()), "jobs": len(latest)},
        "legend": [{"method": m, "colour": method_colour(m)} for m in methods],
    }
    return env.get_template(TEMPLATE).render(**context)


def write_html(folder: str | os.PathLike, out: str | os.PathLike | None = None, runs: Runs | None = None,
               pngs: dict[str, bytes] | None = None) -> pathlib.Path:
    """Write ``report.html`` (into ``folder``, or to the file ``out``) atomically; its path."""
    path = pathlib.Path(out) if out else pathlib.Path(folder) / REPORT_HTML
    write_bytes_atomic(path, render_html(folder, runs, pngs, base=path.parent).encode("utf-8"))
    return path


__all__ = ["JOB_FILES", "REPORT_HTML", "render_html", "verdict_class", "write_html"]
