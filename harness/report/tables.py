"""The comparison table a paper prints, as markdown, LaTeX or csv (``python -m harness table DIR``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from harness.core.errors import ReportError
from harness.report.runs import (
    CI_KEYS,
    DELTA,
    Runs,
    _caption,
    _groups,
    _missing,
    _si,
    aggregate,
    load_runs,
    lower_is_better,
)

TABLE_FILES = {"md": "table.md", "latex": "table.tex", "csv": "table.csv"}



@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str  # "text" | "params" | "flops" | "ppl" | "bpb" | "steps" | "score" | "count"
    ranked: bool  # mark the best value
    spread: bool = False  # print `mean ± h` (its `<key>_ci95` column: the 95% t half-width over seeds)


_FIXED = {"match", "budget", "method", "variant", "label", "size", "seed", "params", "infer_flops_per_token",
          "val_ppl", "val_bits_per_byte", "val_loss", "train_flops", "train_tokens", "mean_extra_steps",
          "consistency_gap", "jacobi_gap", "seeds", *(f"{key}_ci95" for key in CI_KEYS), DELTA, f"{DELTA}_n",
          f"{DELTA}_ci95"}


def _columns(part) -> list[Column]:
    columns = [Column("label", "Method", "text", False), Column("size", "Size", "text", False),
               Column("params", "Params", "params", False),
               Column("infer_flops_per_token", "Inference FLOPs/token", "flops", True, spread=True),
               Column("val_ppl", "Perplexity", "ppl", True, spread=True),
               Column("val_bits_per_byte", "Bits/byte", "bpb", True, spread=True)]
    if DELTA in part and part[DELTA].notna().any():
        columns.append(Column(DELTA, "Δ loss vs vanilla (paired)", "delta", False, spread=True))
    if part["mean_extra_steps"].notna().any():
        columns.append(Column("mean_extra_steps", "Mean extra steps", "steps", False))
    for key in sorted(c for c in part.columns if c not in _FIXED and part[c].notna().any()):
        kind = "ppl" if lower_is_better(key) else "score"
        columns.append(Column(key, key, kind, True))
    columns.append(Column("seeds", "Seeds", "count", False))
    return columns


def _best(part, column: Column) -> set[int]:
    values = part[column.key]
    if not column.ranked or values.notna().sum() < 2 or values.dropna().nunique() < 2:
        return set()  # nothing to single out when every row ties
    target = values.min() if column.kind in ("flops", "ppl", "bpb") else values.max()
    return {i for i, v in values.items() if v == target}


def _fmt(value: Any, column: Column, latex: bool = False) -> str:
    if _missing(value):
        return "--" if latex else "–"
    if column.kind == "text":
        return str(value)
    if column.kind in ("params", "flops"):
        return _si(float(value))
    if column.kind in ("ppl", "steps"):
        return f"{value:.2f}"
    if column.kind == "bpb":
        return f"{value:.3f}"
    if column.kind == "delta":
        return f"{value:+.3f}"
    if column.kind == "count":
        return str(int(value))
    return f"{100 * value:.1f}" if 0 <= value <= 1 else f"{value:.3g}"  # accuracies as percentages


def _spread(row, column: Column) -> float | None:
    """The 95% half-width to print beside the mean, or None: one seed, or FLOPs identical across seeds."""
    if not column.spread or row["seeds"] < 2:
        return None
    std, mean = row.get(f"{column.key}_ci95"), row[column.key]
    if _missing(std) or _missing(mean):
        return None
    if column.kind == "flops" and std <= 1e-9 * abs(mean):
        return None  # a method of fixed compute: the same measured FLOPs every seed
    return float(std)


def _cell(row, column: Column, best: bool, latex: bool = False) -> str:
    text = _fmt(row[column.key], column, latex)
    if latex:
        text = _latex_escape(text)
    if best:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    std = _spread(row, column)
    if std is not None:
        text += (r" $\pm$ " if latex else " ± ") + _fmt(std, column, latex).lstrip("+")
    if column.kind == "delta" and not _missing(row[column.key]):
        text += f" (n={int(row[f'{DELTA}_n'])})"
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("±", r"$\pm$")


def _failed_lines(runs: Runs) -> list[str]:
    lines = []
    for record in runs.failed:
        variant = (record.get("tags") or {}).get("variant")
        name = f"{record.get('method')}/{record.get('size')} seed {record.get('seed')}"
        name += f" [{variant}]" if variant else ""
        lines.append(f"{name}: {record.get('error')}")
    return lines


def table_markdown(runs: Runs) -> str:
    out: list[str] = []
    for (match, budget), part in _groups(aggregate(runs.ok)):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        out.append(f"*{_caption(match, budget, part)}*")
        out.append("")
        out.append("| " + " | ".join(c.header for c in columns) + " |")
        out.append("| " + " | ".join("---" if c.kind == "text" else "---:" for c in columns) + " |")
        for i, row in part.iterrows():
            out.append("| " + " | ".join(_cell(row, c, i in best[c.key]) for c in columns) + " |")
        out.append("")
    failed = _failed_lines(runs)
    if failed:
        out.append("Failed jobs (not in the table):")
        out.extend(f"- {line}" for line in failed)
        out.append("")
    return "\n".join(out)


def table_latex(runs: Runs) -> str:
    out: list[str] = ["% generated by `python -m harness table DIR --format latex`; needs \\usepackage{booktabs}"]
    for (match, budget), part in _groups(aggregate(runs.ok)):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\begin{tabular}{" + "".join("l" if c.kind == "text" else "r" for c in columns) + "}",
                r"\toprule", " & ".join(_latex_escape(c.header) for c in columns) + r" \\", r"\midrule"]
        for i, row in part.iterrows():
            out.append(" & ".join(_cell(row, c, i in best[c.key], latex=True) for c in columns) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(_caption(match, budget, part))}}}",
                r"\end{table}", ""]
    for line in _failed_lines(runs):
        out.append(f"% failed: {line}")
    return "\n".join(out) + "\n"


_CSV_FRONT = ["match", "budget", "method", "variant", "size", "params", "infer_flops_per_token",
              "infer_flops_per_token_ci95", "val_ppl", "val_ppl_ci95", "val_bits_per_byte", "val_bits_per_byte_ci95",
              DELTA, f"{DELTA}_ci95", f"{DELTA}_n", "mean_extra_steps", "seeds", "best"]


def table_csv(runs: Runs) -> str:
    import io

    import pandas as pd

    table = aggregate(runs.ok)
    parts = []
    for _, part in _groups(table):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        part = part.copy()
        part["best"] = [";".join(c.key for c in columns if i in best[c.key]) for i in part.index]
        parts.append(part)
    merged = pd.concat(parts, ignore_index=True)
    ordered = [c for c in _CSV_FRONT if c in merged.columns]
    ordered += [c for c in merged.columns if c not in _CSV_FRONT and c != "label"]
    buffer = io.StringIO()
    merged[ordered].to_csv(buffer, index=False, float_format="%.6g")
    return buffer.getvalue()


FORMATTERS = {"md": table_markdown, "latex": table_latex, "csv": table_csv}


def make_table(folder: str | os.PathLike, fmt: str = "md") -> str:
    if fmt not in FORMATTERS:
        raise ReportError(f"--format {fmt!r}: choose one of {', '.join(FORMATTERS)}")
    return FORMATTERS[fmt](load_runs(folder))
