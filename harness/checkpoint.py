"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

Layout of a checkpoint folder::

    model.safetensors       model weights
    optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<state name>"
    state.json              {"method", "model_config", "step", "optimizer": {hyper-parameters}, ...}

A job sharded over several devices (FSDP, :mod:`harness.distributed`) writes its intermediate
checkpoints with ``torch.distributed.checkpoint`` instead: every rank its own shards (``*.distcp`` and
DCP's ``.metadata``, tensors only, no pickled objects) beside the same ``state.json``, which then says
``"format": "dcp"``. :func:`load` reads either layout into a plain or a sharded model (DCP reshards to
any number of ranks, or to none), so a job may resume on another number of devices; :func:`load_weights`
(``harness eval``, the lm-eval model) reads a sharded checkpoint directly. The last checkpoint of every
job is the safetensors layout (an FSDP job consolidates it on rank 0), without optimizer state, which
a finished job no longer needs.

Writes go to a temporary folder that replaces the old one in one rename, so a run killed while saving
keeps its previous checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.core.errors import CheckpointError
from harness.core.io import read_json, write_json_atomic

SHARDED = "dcp-safetensors"  # state.json "format" of a sharded checkpoint (absent: the safetensors layout)


def save(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any]) -> None:
    """Write the safetensors layout of a plain (unsharded) model from this process."""
    _write(pathlib.Path(folder), model.state_dict(), optimizer, state)


def _write(folder: pathlib.Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
           state: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    full_state = dict(state)
    if optimizer is not None:
        tensors, hyper = _optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        full_state["optimizer"] = hyper
    write_json_atomic(tmp / "state.json", full_state)
    _replace(tmp, folder)


def _replace(tmp: pathlib.Path, folder: pathlib.Path) -> None:
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# sharded checkpoints (FSDP): torch.distributed.checkpoint with its safetensors storage, no pickles


def save_sharded(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any]) -> None:
    """Collective (every rank calls it): each rank writes its shards of the model and the optimizer.

    DCP's own default format pickles its metadata; its Hugging Face storage writes safetensors files whose
    headers carry the shard offsets, so the checkpoint holds tensors and JSON only. Optimizer
    hyper-parameters go to state.json, as in the safetensors layout.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = pathlib.Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(_flatten(model_state, optim_state), storage_writer=dcp.HuggingFaceStorageWriter(
        str(tmp), save_distributed=True))
    if rank == 0:
        write_json_atomic(tmp / "state.json", {**state, "format": SHARDED,
                                               "optimizer": {"param_groups": _hyper(optim_state["param_groups"])}})
        _replace(tmp, folder)
    dist.barrier()  # nobody reads or rewrites the checkpoint before it is whole


def save_consolidated(folder: str | os.PathLike, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Collective: gather a sharded model's full weights on rank 0, which writes the safetensors layout
    (without optimizer state: for a job's last checkpoint, which ``harness eval`` and lm-eval read)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        _write(pathlib.Path(folder), weights, None, state)
    dist.barrier()


def load(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load either layout into ``model`` (plain or sharded) and ``optimizer`` (None: weights only); the state."""
    folder = pathlib.Path(folder)
    state = load_state(folder)
    if state.get("format") == SHARDED:
        _load_sharded(folder, model, optimizer, state)
    elif _sharded_model(model):
        _load_full_into_sharded(folder, model, optimizer, state)
    else:
        load_weights(folder, model)
        if optimizer is not None:
            load_optimizer(folder, optimizer, state["optimizer"])
    return state


def _sharded_model(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _flatten(model_state: dict[str, Any], optim_state: dict[str, Any] | None) -> dict[str, Any]:
    """One flat dict of tensors: ``model.<fqn>`` and ``optimizer.<fqn>.<state name>``."""
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for fqn, entry in (optim_state or {}).get("state", {}).items():
        for name, value in entry.items():
            flat[f"optimizer.{fqn}.{name}"] = value
    return flat


def _hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in groups]


def _load_sharded(folder: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  state: dict[str, Any]) -> None:
    """DCP reads the shards into whatever ``model`` is: sharded on any number of ranks, or plain (without
    a process group), so a sharded job resumes on other devices and ``harness eval`` reads it directly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
    flat = _flatten(model_state, optim_state)
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is what we want
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    except Exception as exc:  # DCP wraps every rank's failure in its own exception types
        raise CheckpointError(f"sharded checkpoint {folder} cannot be read into this model "
                              f"({str(exc).strip().splitlines()[-1][:200]}); delete the checkpoint folder "
                              "to retrain") from None
    model_state = {k: flat[f"model.{k}"] for k in model_state}
    if optim_state is None:
        set_model_state_dict(model, model_state)
        return
    loaded: dict[str, dict[str, Any]] = {}
    for fqn, entry in optim_state["state"].items():
        loaded[fqn] = {name: flat[f"optimizer.{fqn}.{name}"] for name in entry}
    groups = [dict(saved, params=current["params"])
              for saved, current in zip(state["optimizer"]["param_groups"], optim_state["param_groups"])]
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": loaded, "param_groups": groups})


def _load_full_into_sharded(folder: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                            state: dict[str, Any]) -> None:
    """The safetensors layout (written by one process or by DDP) into an FSDP model: every rank reads the
    full tensors and keeps its shards; optimizer entries are renamed from parameter index to name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, _load_tensors(folder / "model.safetensors", "model weights"), options=full)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"weights in {folder} do not fit the configured model "
                              f"({str(exc).strip().splitlines()[-1][:200]}); the checkpoint belongs to another "
                              "config") from None
    if optimizer is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(folder / "optimizer.safetensors", "optimizer state").items():
        index, name = key.split(".", 1)
        if int(index) >= len(order):
            raise CheckpointError("optimizer state does not match the model's parameters; delete the checkpoint")
        loaded.setdefault(order[int(index)], {})[name] = value
    groups = [dict(saved, params=[names[id(p)] for p in current["params"]])
              for saved, current in zip(state["optimizer"]["param_groups"], optimizer.param_groups)]
    set_optimizer_state_dict(model, optimizer, {"state": loaded, "param_groups": groups}, options=full)


# ---------------------------------------------------------------------------------------------------
# the safetensors layout


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    return read_json(pathlib.Path(folder) / "state.json", "checkpoint state")


def load_weights(folder: str | os.PathLike, model: torch.nn.Module) -> None:
    """Weights of either layout into a plain model (a sharded checkpoint is read through DCP, without
    a process group)."""
    folder = pathlib.Path(folder)
    if (folder / "state.json").exists() and load_state(folder).get("format") == SHARDED:
        _load_sharded(folder, model, None, {})
        return
    path = folder / "model.safetensors"
    tensors = _load_tensors(path, "model weights")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"weights in {path} do not fit the configured model ({first[-1].strip()}); "
                              "the checkpoint belongs to another config") from None


def load_optimizer(folder: str | os.PathLike, optimizer: torch.optim.Optimizer, hyper: dict[str, Any]) -> None:
    tensors = _load_tensors(pathlib.Path(folder) / "optimizer.safetensors", "optimizer state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    if state and max(state) >= len(params):
        raise CheckpointError("optimizer state does not match the model's parameters; delete the checkpoint")
    current = optimizer.state_dict()["param_groups"]  # holds the parameter indices
    groups = [dict(saved, params=cur["params"]) for saved, cur in zip(hyper["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {f"{index}.{name}": (value if torch.is_tensor(value) else torch.tensor(value)).contiguous().cpu()
               for index, entry in sd["state"].items() for name, value in entry.items()}
    return tensors, {"param_groups": _hyper(sd["param_groups"])}


def _load_tensors(path: pathlib.Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt ({exc}); delete the checkpoint folder to retrain") from None


__all__ = ["SHARDED", "CheckpointError", "load", "load_optimizer", "load_state", "load_weights", "read_json", "save",
           "save_consolidated", "save_sharded", "write_json_atomic"]
