"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

Layout of a checkpoint folder::

    model.safetensors       model weights
    optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<state name>"
    state.json              {"method", "model_config", "step", "optimizer": {hyper-parameters}, ...}

Writes go to a temporary folder that replaces the old one in one rename, so a run killed while saving
keeps its previous checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.core.errors import CheckpointError
from harness.core.io import read_json, write_json_atomic


def save(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any]) -> None:
    folder = pathlib.Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    full_state = dict(state)
    if optimizer is not None:
        tensors, hyper = _optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        full_state["optimizer"] = hyper
    write_json_atomic(tmp / "state.json", full_state)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    return read_json(pathlib.Path(folder) / "state.json", "checkpoint state")


def load_weights(folder: str | os.PathLike, model: torch.nn.Module) -> None:
    path = pathlib.Path(folder) / "model.safetensors"
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
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _load_tensors(path: pathlib.Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt ({exc}); delete the checkpoint folder to retrain") from None


__all__ = ["CheckpointError", "load_optimizer", "load_state", "load_weights", "read_json", "save",
           "write_json_atomic"]
