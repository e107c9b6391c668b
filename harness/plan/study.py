"""Studies as data: a TOML file names an experiment's arms, sizes, budget, protocol, seeds and tasks.

``python -m harness sweep --study NAME`` (or ``plan --study NAME``) runs one. NAME is a file of
``harness/studies/`` (``python -m harness sweep --study list`` shows them) or a path to a ``.toml``
file. The experiment is data and the code is generic, as in lm-eval's task YAMLs and torchtitan's
train configs; a sweep keeps a copy of the file in its output folder, so a table can always say what
produced it (docs/design.md, "Studies and claims").

Schema (every key optional unless marked)::

    description = "one paragraph"
    protocol = "tokens"          # "tokens": every job trains on the same tokens (the papers' protocol);
                                 # "train-flops": every job trains with the same FLOPs
    budget = 2e12                # training FLOPs (required unless `tokens` is given)
    tokens = 26_214_400_000      # tokens protocol only: training tokens per job, instead of a budget
    reference_size = "micro"     # tokens protocol: the rung whose vanilla the budget buys tokens for
    sizes = ["micro"]            # default rungs of every arm (default: the ladder rule)
    seeds = 1                    # default seeds of every arm
    set = ["data.vocab_size=2048", "train.lr=3e-3"]   # --set pairs for every job
    tasks = ["arc_easy"]         # downstream tasks after training
    task_limit = 100             # documents per task
    num_fewshot = 0
    gpu = "h100"                 # estimate on this GPU (plans offline for a cluster)
    devices_per_job = 8          # train each job on 8 devices through Ray Train (harness/distributed.py)
    parallel = "fsdp"            # with devices_per_job: "ddp" (default) or "fsdp"; neither changes a job's id
    compile = true               # train the blocks through torch.compile (sweep --compile); no job's id changes
    pipeline_check = true        # the study shows the pipeline, not evidence: its claims.md opens by saying so

    [[arms]]                     # one per line of the comparison (at least one)
    method = "ponderlm3"         # required: a registered method
    label = "K=3"                # the variant's name in tables (default: from `values`)
    values = { latent_steps = 3 }          # model-config fields of this arm
    vary = { compute_penalty = [0.1, 1] }  # one arm per combination, label extended
    seeds = 3
    sizes = ["micro", "tiny"]

Command-line flags still work with a study: ``--budget``, ``--match``, ``--sizes``, ``--seeds``,
``--devices-per-job`` and ``--parallel`` replace the study's value, ``--set`` adds to its pairs (and
wins), ``--methods`` keeps only those arms; ``sweep --compile`` compiles even where the study does not.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from harness.core import registry
from harness.core.config import SIZES
from harness.core.errors import ConfigError, StudyError
from harness.distributed import PARALLEL
from harness.plan.planning import MATCH_MODES, Arm, PlanRequest, vanilla_train_flops_per_token

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STUDY_SUFFIX = ".toml"
_TOP_KEYS = {"description", "protocol", "budget", "tokens", "reference_size", "sizes", "seeds", "set", "tasks",
             "task_limit", "num_fewshot", "gpu", "devices_per_job", "parallel", "compile", "pipeline_check", "arms"}
_ARM_KEYS = {"method", "label", "values", "vary", "seeds", "sizes"}


@dataclass
class Study:
    """A loaded, validated study file."""

    name: str
    path: pathlib.Path
    text: str  # the file as read: the sweep keeps a copy
    description: str
    protocol: str
    budget: float | None
    tokens: int | None
    reference_size: str | None
    sizes: list[str] | None
    seeds: int
    overrides: list[str]
    tasks: list[str]
    task_limit: int | None
    num_fewshot: int
    gpu: str | None
    arms: list[Arm] = field(default_factory=list)
    devices_per_job: int = 1  # run options of the sweep, never part of a job (its id does not depend on them)
    parallel: str = "ddp"
    compile: bool = False  # the sweep's --compile (harness.train.train_job's compile_blocks)
    pipeline_check: bool = False  # read by harness.claims from the sweep's copy of the file

    def request(self, *, budget: float | None = None, match: str | None = None, sizes: list[str] | None = None,
                seeds: int | None = None, overrides: list[str] | None = None, methods: list[str] | None = None,
                devices_per_job: int | None = None, parallel: str | None = None, **extra: Any) -> PlanRequest:
        """The plan request this study makes, with command-line values winning (see the module docstring)."""
        if seeds is not None and seeds < 1:
            raise StudyError(f"--seeds {seeds}: must be at least 1 (seeds 0..N-1 per arm)")
        present = {arm.method for arm in self.arms}
        for method in [m for m in methods or [] if m not in present]:  # never dropped silently
            registry.get(method)  # an unknown name: UnknownMethodError listing the registered ones
            raise StudyError(f"--methods {method}: {self.path} has no arm of {method!r} (its arms: "
                             f"{', '.join(sorted(present))}); drop it from --methods or add an arm to the study")
        arms = [arm for arm in self.arms if not methods or arm.method in methods]
        if not arms:
            raise StudyError(f"{self.path}: --methods {','.join(methods or [])} keeps none of its arms "
                             f"({', '.join(sorted({a.method for a in self.arms}))})")
        if seeds is not None:
            arms = [dataclasses.replace(arm, seeds=seeds) for arm in arms]
        protocol = match or self.protocol
        pairs = self.overrides + list(overrides or [])
        reference = self.reference_size if protocol == "tokens" else None
        if reference is None and protocol == "tokens" and (sizes or self.sizes):
            reference = (sizes or self.sizes)[0]
        if budget is None:
            budget = self.budget
        if budget is None:  # tokens given: the budget is what those tokens cost vanilla at the reference rung
            if reference is None:
                raise StudyError(f"{self.path}: tokens = {self.tokens} needs reference_size (or sizes)")
            budget = self.tokens * vanilla_train_flops_per_token(reference, pairs)
        extra.setdefault("gpu", self.gpu)  # extra: rungs and the hardware estimate's settings
        return PlanRequest(budget=budget, sizes=sizes or self.sizes, match=protocol, seeds=seeds or self.seeds,
                           overrides=pairs, arms=arms, reference_size=reference,
                           devices_per_job=self.devices_per_job if devices_per_job is None else devices_per_job,
                           parallel=parallel or self.parallel,
                           **extra)


def study_folder() -> pathlib.Path:
    return pathlib.Path(str(resources.files("harness").joinpath("studies")))


def available() -> list[str]:
    return sorted(p.stem for p in study_folder().glob(f"*{STUDY_SUFFIX}"))


def find(name: str) -> pathlib.Path:
    """A study's file: ``NAME`` in harness/studies, or a path to a ``.toml`` file."""
    path = pathlib.Path(name).expanduser()
    if path.suffix == STUDY_SUFFIX or path.exists():
        if not path.is_file():
            raise StudyError(f"study file not found: {path}")
        return path
    path = study_folder() / f"{name}{STUDY_SUFFIX}"
    if not path.is_file():
        raise StudyError(f"unknown study {name!r}; shipped studies: {', '.join(available())} "
                         "(or give a path to a .toml file)")
    return path


def load(name: str) -> Study:
    """Read and validate a study; a bad file is a one-line :class:`StudyError` naming the file and field."""
    path = find(name)
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML ({exc})") from None
    try:
        return _parse(raw, path, text)
    except StudyError:
        raise
    except ConfigError as exc:  # an unknown method or a bad model-config value: say where it came from
        raise StudyError(f"{path}: {exc}") from None


def _parse(raw: dict[str, Any], path: pathlib.Path, text: str) -> Study:
    where = str(path)
    _known(raw, _TOP_KEYS, where)
    protocol = _get(raw, "protocol", str, where, "tokens")
    if protocol not in MATCH_MODES:
        raise StudyError(f"{where}: protocol = {protocol!r}; choose one of {', '.join(MATCH_MODES)}")
    budget = _get(raw, "budget", float, where, None)
    tokens = _get(raw, "tokens", int, where, None)
    if (budget is None) == (tokens is None):
        raise StudyError(f"{where}: give exactly one of budget (training FLOPs) or tokens")
    if tokens is not None and protocol != "tokens":
        raise StudyError(f"{where}: tokens = {tokens} needs protocol = \"tokens\"")
    for name, value in (("budget", budget), ("tokens", tokens)):
        if value is not None and not value > 0:
            raise StudyError(f"{where}: {name} = {value}: must be positive")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise StudyError(f"{where}: needs at least one [[arms]] table (method = \"...\")")
    seeds = _get(raw, "seeds", int, where, 1)
    if seeds < 1:
        raise StudyError(f"{where}: seeds = {seeds}: must be >= 1")
    devices = _get(raw, "devices_per_job", int, where, 1)
    if devices < 1:
        raise StudyError(f"{where}: devices_per_job = {devices}: must be >= 1")
    parallel = _get(raw, "parallel", str, where, "ddp")
    if parallel not in PARALLEL:
        raise StudyError(f"{where}: parallel = {parallel!r}; choose {' or '.join(PARALLEL)}")
    study = Study(
        name=path.stem, path=path, text=text, description=_get(raw, "description", str, where, ""),
        protocol=protocol, budget=budget, tokens=tokens,
        reference_size=_get(raw, "reference_size", str, where, None), sizes=_str_list(raw, "sizes", where),
        seeds=seeds, overrides=_str_list(raw, "set", where) or [], tasks=_str_list(raw, "tasks", where) or [],
        task_limit=_get(raw, "task_limit", int, where, None), num_fewshot=_get(raw, "num_fewshot", int, where, 0),
        gpu=_get(raw, "gpu", str, where, None), devices_per_job=devices, parallel=parallel,
        compile=_get(raw, "compile", bool, where, False),
        pipeline_check=_get(raw, "pipeline_check", bool, where, False))
    for i, arm in enumerate(arms_raw):
        study.arms.extend(_arms(arm, f"{where}: arms[{i}]", study.sizes))
    return study


def _arms(raw: Any, where: str, study_sizes: list[str] | None) -> list[Arm]:
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: must be a table")
    _known(raw, _ARM_KEYS, where)
    method = _get(raw, "method", str, where, None)
    if method is None:
        raise StudyError(f"{where}: needs method = \"NAME\" (python -m harness list)")
    plugin = registry.get(method)
    values = raw.get("values", {})
    vary = raw.get("vary", {})
    for key, table in (("values", values), ("vary", vary)):
        if not isinstance(table, dict):
            raise StudyError(f"{where}.{key}: must be a table of model-config fields")
    for name, options in vary.items():
        if not isinstance(options, list) or not options:
            raise StudyError(f"{where}.vary.{name}: must be a non-empty list of values")
    seeds = _get(raw, "seeds", int, where, None)
    if seeds is not None and seeds < 1:
        raise StudyError(f"{where}.seeds = {seeds}: must be >= 1")
    label = _get(raw, "label", str, where, "")
    sizes = _str_list(raw, "sizes", where)
    check_size = (sizes or study_sizes or [None])[0]
    arms = []
    names = list(vary)
    for combo in itertools.product(*(vary[n] for n in names)):
        arm_values = {**values, **dict(zip(names, combo))}
        _check_values(plugin, check_size, {k: _plain(v) for k, v in arm_values.items()})
        auto = ",".join(f"{k}={_plain(v)}" for k, v in arm_values.items())
        text = ",".join([label] + [f"{n}={_plain(v)}" for n, v in zip(names, combo)]) if label else auto
        arms.append(Arm(method, {k: _plain(v) for k, v in arm_values.items()}, text, seeds, sizes))
    return arms


def _check_values(plugin: registry.Plugin, size: str | None, values: dict[str, str]) -> None:
    """A bad field or value fails now. Values valid at some rung of the ladder (MoR's recursions: (L-2)/R
    whole) are left to the plan, which skips the rungs where they are not, one line each."""
    try:
        plugin.make_config(size, values)
    except ConfigError:
        for other in SIZES:
            try:
                plugin.make_config(other, values)
                return
            except ConfigError:
                continue
        raise


def _plain(value: Any) -> str:
    """A TOML value as the string a ``--set`` would carry (configs coerce it to the field's type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_plain(v) for v in value)
    return str(value)


def _known(raw: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise StudyError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(keys))}")


def _get(raw: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StudyError(f"{where}: {key} = {value!r}: expected {kind.__name__}")
    return value


def _str_list(raw: dict[str, Any], key: str, where: str) -> list[str] | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where}: {key} = {value!r}: expected a list of strings")
    return list(value)


__all__ = ["Study", "available", "find", "load", "study_folder"]
