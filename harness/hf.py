"""From and to the Hugging Face ecosystem: Llama checkpoints in (``--init-from``), LlamaForCausalLM folders out.

Import (``python -m harness train --method M --init-from PATH``)
    PATH is a local folder with ``config.json`` and ``*.safetensors`` (one file, or shards listed in
    ``model.safetensors.index.json``), or ``hf:<name>``, fetched with ``huggingface_hub.snapshot_download``
    into the hub cache (the cache is tried first, so a downloaded model works offline). The checkpoint's
    config sets the backbone's shape (:data:`SHAPE_FIELDS`); its ``tokenizer.json`` becomes the job's
    tokenizer. Every method has ``model.decoder`` (:class:`models.backbone.Decoder`), whose parameter
    names are transformers' LLaMA names without the ``model.`` prefix, so the import is a rename.
    Parameters the method adds (routers, gates, pause vectors, ...) keep their own initialisation unless
    the folder holds a tensor of that name (a folder written by :func:`export` for the same method).
    Tied embeddings are copied into the (untied) LM head; grouped-query attention maps as is.

Decision: an ``--init-from`` job sets ``ponder_init=False`` (unless ``--set ponder_init=...`` says
    otherwise). The checkpoint was trained in LLaMA's parametrisation (unscaled embeddings, init std
    ``initializer_range``), so keeping it is exact (stored embeddings equal the checkpoint's, bit for
    bit) and keeps the optimiser's step sizes meaningful: under ``ponder_init`` the stored embeddings
    would be the checkpoint's divided by sqrt(2.5 d) (about 1/70 at d=2048) and AdamW's steps, which are
    of the order of the learning rate in parameter units, would be ~70x larger relative to them. Added
    parameters then start at ``init_std`` = the checkpoint's ``initializer_range``. Loading into a
    model with ``ponder_init=True`` still works: the embedding scale is undone (stored embedding = HF
    embedding / ``embed_scale``), so logits equal transformers' either way.

Export (``python -m harness export DIR OUT``)
    :func:`export` writes ``config.json`` (a ``LlamaConfig``), ``model.safetensors`` (transformers' names,
    the embedding scale folded into ``model.embed_tokens.weight``, untied head), ``tokenizer.json`` with a
    ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, and ``generation_config.json``. A vanilla
    job is then a plain ``LlamaForCausalLM``. Any other method's folder holds the same backbone tensors
    plus the method's own tensors under their harness names, the method and its config under the
    ``ponder_harness`` key of ``config.json``, and a README.md saying that transformers alone cannot run
    it and that ``--init-from OUT`` loads it back (the method's config fields are restored from it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import typing
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from harness.core.config import ModelConfig, coerce
from harness.core.errors import CheckpointError, ConfigError
from harness.core.io import read_json, write_json_atomic
from harness.core.registry import Plugin
from harness.data.config import EOS_CANDIDATES

HUB_PREFIX = "hf:"
HARNESS_KEY = "ponder_harness"  # config.json key holding the method and its config in an export
INDEX_FILE = "model.safetensors.index.json"
# ModelConfig field -> the config.json key it comes from (rope_theta: see _rope_theta)
SHAPE_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
}
BACKBONE_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
#: backbone fields an export from the same method restores (they say how its own tensors are scaled at use)
PARAMETRISATION_FIELDS = frozenset({"ponder_init", "embed_scale_rule", "init_std"})
# files snapshot_download fetches for hf:<name> (no *.bin, *.pth, *.gguf, ...)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.md"]
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


# ============================================================================================= import


def resolve(spec: str) -> pathlib.Path:
    """The local folder of ``spec``: a path, or ``hf:<name>`` from the hub cache (downloaded if reachable)."""
    if spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX):]
        from huggingface_hub import snapshot_download

        try:
            return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:  # not cached yet: download below
            pass
        try:
            return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
        except Exception as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise CheckpointError(f"--init-from {spec}: {name!r} is neither in the Hugging Face hub cache nor "
                                  f"downloadable ({reason}); check the name and network access, or download "
                                  "the model elsewhere and pass its folder") from None
    path = pathlib.Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--init-from {spec}: no such folder; give a folder with config.json and "
                              "*.safetensors, or hf:<name>")
    return path


def normalise(spec: str) -> str:
    """How a job records ``spec``: ``hf:<name>`` as is, a folder as its absolute path (so resume works anywhere)."""
    return spec if spec.startswith(HUB_PREFIX) else str(resolve(spec).resolve())


def tokenizer_for(spec: str) -> str:
    """The ``DataConfig.tokenizer`` of an init-from job: the folder's tokenizer.json (or the hub name)."""
    folder = resolve(spec)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"--init-from {spec}: {folder} has no tokenizer.json (a sentencepiece "
                              "tokenizer.model is not read); save one with AutoTokenizer.save_pretrained, or "
                              "pass --set data.tokenizer=PATH")
    return spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else str(path.resolve())


def read_config(folder: pathlib.Path) -> dict[str, Any]:
    return read_json(folder / "config.json", "Hugging Face config")


def backbone_shape(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The :class:`ModelConfig` shape fields of a Llama ``config.json``; ConfigError naming a bad field."""
    model_type = raw.get("model_type")
    if model_type != "llama":
        raise ConfigError(f"{where}: model_type={model_type!r} is not a Llama checkpoint; --init-from reads "
                          "model_type 'llama' (LlamaForCausalLM) folders only")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(raw.get(key), int):
            raise ConfigError(f"{where}: field {key!r} is missing or not an integer ({raw.get(key)!r}); the "
                              "backbone needs it")
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(key, wanted) != wanted:
            raise ConfigError(f"{where}: field {key!r}={raw[key]!r} is not supported; the backbone is a "
                              f"plain Llama ({key}={wanted!r})")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != raw["hidden_size"]:
        raise ConfigError(f"{where}: field 'head_dim'={head_dim} differs from hidden_size/num_attention_heads="
                          f"{raw['hidden_size'] / heads:g}; the backbone needs head_dim = d_model / n_heads")
    return {"vocab_size": raw["vocab_size"], "d_model": raw["hidden_size"], "n_layers": raw["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": raw.get("num_key_value_heads") or heads,
            "d_ff": raw["intermediate_size"], "rope_theta": _rope_theta(raw, where),
            "norm_eps": float(raw.get("rms_norm_eps", 1e-6))}  # 1e-6: LlamaConfig's default


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (5); only plain RoPE is supported."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        field = "rope_parameters" if params else "rope_scaling"
        raise ConfigError(f"{where}: field {field!r} asks for RoPE type {rope_type!r}; the backbone implements "
                          "plain RoPE only (rope_type 'default')")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def model_config(plugin: Plugin, spec: str, overrides: dict[str, Any],
                 vocab_size: int | None = None) -> ModelConfig:
    """``plugin``'s config shaped like the checkpoint ``spec``; ``overrides`` may set anything but the shape.

    Defaults under the overrides: ``ponder_init=False`` and ``init_std`` = the checkpoint's
    ``initializer_range`` (see the module docstring), then the method fields saved by :func:`export`
    when the folder was exported from the same method, with its ``ponder_init`` and ``embed_scale_rule``
    (so the method's own tensors keep the scale they were trained under; the embedding is unfolded).
    ``vocab_size`` is the tokenizer's, which must fit.
    """
    folder = resolve(spec)
    raw = read_config(folder)
    where = f"--init-from {spec} (config.json)"
    shape = backbone_shape(raw, where)
    saved = raw.get(HARNESS_KEY) or {}
    # A folder exported from the same method also restores its parametrisation: the method's own tensors
    # (e.g. pause's vocabulary row) were trained under that embedding scale, which export does not fold.
    method_fields = {k: v for k, v in (saved.get("config") or {}).items()
                     if k not in BACKBONE_FIELDS or k in PARAMETRISATION_FIELDS} \
        if saved.get("method") == plugin.name else {}
    hints = typing.get_type_hints(plugin.config_class)
    for name, value in overrides.items():
        if name in shape and coerce(plugin.config_class, name, hints[name], value) != shape[name]:
            raise ConfigError(f"--set {name}={value} conflicts with --init-from: the checkpoint has {name}="
                              f"{shape[name]} ({SHAPE_FIELDS[name]}); drop the --set")
    if vocab_size is not None and vocab_size > shape["vocab_size"]:
        raise ConfigError(f"{where}: the job's tokenizer has {vocab_size} tokens but the checkpoint's vocab_size "
                          f"is {shape['vocab_size']}; use the checkpoint's own tokenizer (data.tokenizer)")
    defaults = {"ponder_init": False, "init_std": float(raw.get("initializer_range") or 0.02)}
    return plugin.make_config(None, {**defaults, **method_fields, **overrides, **shape})


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map") or {}
        return {name: folder / file for name, file in weight_map.items()}
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() \
        else sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights (pytorch_model.bin is not read; re-save "
                              "the model with save_pretrained, which writes safetensors)")
    where: dict[str, pathlib.Path] = {}
    for file in files:
        for name in _open(file).keys():  # noqa: SIM118 (safe_open is not a mapping)
            where[name] = file
    return where


def _open(file: pathlib.Path):
    if not file.exists():
        raise CheckpointError(f"weights file not found: {file} (listed in {INDEX_FILE})")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weights file {file} is corrupt ({' '.join(str(exc).split())[:120]})") from None


class _Reader:
    """Tensors of a checkpoint folder by name, each file opened once."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.where = _tensor_files(folder)
        self._handles: dict[pathlib.Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file].get_tensor(name)


def hf_name(decoder_key: str) -> str:
    """transformers' name of a :class:`~models.backbone.Decoder` parameter."""
    return decoder_key if decoder_key == "lm_head.weight" else f"model.{decoder_key}"


def llama_config(cfg: ModelConfig, max_positions: int = 2048, **extra: Any):
    """``transformers.LlamaConfig`` of the backbone ``cfg`` (untied head, plain RoPE, SDPA attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=max_positions, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **extra)


def load_into(model: torch.nn.Module, spec: str) -> dict[str, Any]:
    """Copy the checkpoint ``spec`` into ``model`` (any method; shaped by :func:`model_config`).

    Returns ``{"path", "loaded": tensors copied, "kept_own_init": the model's tensors the checkpoint
    lacks (the method's own)}``. A missing or misshapen backbone weight, or a backbone weight the model
    has no place for, is a CheckpointError naming it.
    """
    folder = resolve(spec)
    raw = read_config(folder)
    shape = backbone_shape(raw, f"--init-from {spec} (config.json)")
    cfg = model.decoder.cfg
    for name, value in shape.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"--init-from {spec}: the model has {name}={getattr(cfg, name)} but the checkpoint "
                              f"{SHAPE_FIELDS[name]}={value}; build the model with harness.hf.model_config")
    tied = bool(raw.get("tie_word_embeddings", False))
    reader = _Reader(folder)
    loaded, kept, used = 0, [], set()
    with torch.no_grad():
        for key, target in model.state_dict().items():
            if key.startswith("decoder."):
                inner = key[len("decoder."):]
                source = "model.embed_tokens.weight" if tied and inner == "lm_head.weight" else hf_name(inner)
                if source not in reader:
                    raise CheckpointError(f"--init-from {spec}: weight {source!r} is missing from the checkpoint; "
                                          "it is not a complete Llama of the shape its config.json gives")
            elif key in reader:
                source = key
            else:
                kept.append(key)
                continue
            tensor = reader.get(source)
            if tensor.shape != target.shape:
                raise CheckpointError(f"--init-from {spec}: weight {source!r} has shape {list(tensor.shape)}, the "
                                      f"model's {key} needs {list(target.shape)}")
            if key == "decoder.embed_tokens.weight" and cfg.embed_scale != 1.0:
                tensor = tensor.double() / cfg.embed_scale  # the model multiplies it back at lookup
            target.copy_(tensor.to(target.dtype))
            used.add(source)
            loaded += 1
    stray = sorted(n for n in reader.where if n not in used and n.startswith(("model.", "lm_head."))
                   and "rotary_emb" not in n and not (tied and n == "lm_head.weight"))
    if stray:
        raise CheckpointError(f"--init-from {spec}: the checkpoint holds {stray[0]!r}"
                              f"{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, which the backbone has "
                              "no place for; it is not a plain Llama of the shape its config.json gives")
    return {"path": spec, "loaded": loaded, "kept_own_init": kept}


# ============================================================================================= export


def export(model: torch.nn.Module, method: str, tokenizer_file: str | os.PathLike, out: str | os.PathLike,
           max_positions: int = 2048) -> pathlib.Path:
    """Write ``model`` (any method) as a Hugging Face Llama folder ``out`` (see the module docstring)."""
    from tokenizers import Tokenizer as _Tk

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.decoder.cfg
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key.startswith("decoder."):
            inner = key[len("decoder."):]
            if inner == "embed_tokens.weight" and cfg.embed_scale != 1.0:
                value = (value.double() * cfg.embed_scale).to(value.dtype)
            name = hf_name(inner)
        else:
            name = key  # a method's own tensor, under its harness name (never model.* or lm_head.*)
        tensors[name] = value.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    tk = _Tk.from_file(str(out / "tokenizer.json"))
    eos = next((t for t in EOS_CANDIDATES if tk.token_to_id(t) is not None), None)
    bos = next((t for t in BOS_CANDIDATES if tk.token_to_id(t) is not None), None)
    eos_id = None if eos is None else tk.token_to_id(eos)
    bos_id = None if bos is None else tk.token_to_id(bos)

    hf_cfg = llama_config(cfg, max_positions, initializer_range=cfg.init_std, bos_token_id=bos_id,
                          eos_token_id=eos_id, pad_token_id=eos_id)
    config = hf_cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"] if method == "vanilla" else [f"ponder_harness:{method}"]
    config["dtype"] = "float32"
    config[HARNESS_KEY] = {"method": method, "config": model.config.to_dict(),
                           "embed_scale_folded": cfg.embed_scale}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    write_json_atomic(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id,
                                                       "pad_token_id": eos_id})
    special = {"eos_token": eos, "bos_token": bos, "pad_token": eos}
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
        "add_bos_token": False, **{k: v for k, v in special.items() if v is not None}})
    if method != "vanilla":
        (out / "README.md").write_text(_readme(method, model, tensors))
    return out


def _readme(method: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    own = sorted(n for n in tensors if not n.startswith(("model.", "lm_head.")))
    params = sum(tensors[n].numel() for n in own)
    listed = ", ".join(f"`{n}`" for n in own[:12]) + (" ..." if len(own) > 12 else "") if own else "none"
    return (f"# A ponder-harness `{method}` model\n\n"
            f"This folder was written by `python -m harness export` from a `{method}` job. Its backbone is stored "
            "in the Hugging Face Llama layout (`model.*`, `lm_head.weight`, the embedding scale folded in), "
            f"and the method's own tensors ({listed}; {params:,} parameters) under their harness names in "
            "the same `model.safetensors`.\n\n"
            f"**transformers alone cannot run it**: `{method}` computes differently from a plain Llama (latent "
            "steps, routing, loops, pauses, ...), so `AutoModelForCausalLM.from_pretrained` would load only the "
            "backbone and compute something else. Load it back into the harness with\n\n"
            f"    python -m harness train --method {method} --init-from THIS_FOLDER --budget ... --out ...\n\n"
            "which restores the backbone, the method's tensors and its config fields (from the "
            f"`{HARNESS_KEY}` entry of config.json). {type(model).__name__} config: "
            f"`{json.dumps(model.config.to_dict(), default=str)}`\n")


__all__ = ["HARNESS_KEY", "HUB_PREFIX", "SHAPE_FIELDS", "backbone_shape", "export", "hf_name", "load_into",
           "model_config", "normalise", "read_config", "resolve", "tokenizer_for"]
