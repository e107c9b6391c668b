"""``python -m harness export DIR OUT``: a trained job as a Hugging Face Llama folder (harness/hf.py).

A vanilla job becomes a plain ``LlamaForCausalLM`` (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.
Any other method's folder holds the backbone in the same layout plus the method's own tensors, and a
README.md saying that transformers alone cannot run it and that ``--init-from OUT`` loads it back.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

from harness import checkpoint, hf
from harness.core import registry
from harness.core.errors import CheckpointError, ConfigError
from harness.core.io import check_writable, make_folder, read_json, write_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a job folder written by `python -m harness train`")
    parser.add_argument("out", help="the folder to write: new or empty (created), outside the job folder")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that holds files (those of the same name are replaced)")


def load_trained(folder: pathlib.Path):
    """(method, model on CPU with the checkpoint's weights, tokenizer.json path) of a job folder.

    The model is rebuilt from the config the checkpoint records, so neither the data nor an
    ``--init-from`` source has to be at hand.
    """
    if not folder.is_dir():
        raise CheckpointError(f"job folder not found: {folder}")
    job = read_json(folder / "job.json", "job description")
    state = checkpoint.load_state(folder / "checkpoint")
    if state.get("step") != state.get("total_steps"):
        print(f"note: {folder} is not finished (step {state.get('step')} of {state.get('total_steps')}); "
              "exporting its last checkpoint", file=sys.stderr)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{tokenizer_file} not found; run the job again (python -m harness train) to write it")
    plugin = registry.get(state.get("method", job.get("method")))
    model = plugin.build(plugin.config_class.from_dict(state["model_config"]))
    checkpoint.load_weights(folder / "checkpoint", model)
    return plugin.name, model.eval(), tokenizer_file, job


def check_destination(folder: pathlib.Path, out: pathlib.Path, force: bool) -> None:
    """A ConfigError, before anything is written, for an OUT inside the job folder (export never writes
    there) or one holding files without ``--force`` (exporting into it would merge two models' files)."""
    job, target = folder.resolve(), out.resolve()
    if target == job or job in target.parents:
        raise ConfigError(f"export folder {out} is inside the job folder {folder}; choose a folder outside it "
                          "(the job folder keeps only what training wrote)")
    if target.is_dir() and not force and any(target.iterdir()):
        raise ConfigError(f"export folder {out} is not empty; choose a new or empty folder, or pass --force to "
                          "write into it (files of the same name are replaced)")


def run(args: argparse.Namespace) -> int:
    folder, out = pathlib.Path(args.folder), pathlib.Path(args.out)
    method, model, tokenizer_file, job = load_trained(folder)
    check_destination(folder, out, args.force)
    seq_len = int((job.get("train") or {}).get("seq_len", 0))
    created = make_folder(out, "export folder")
    try:
        check_writable(out, "export folder", "choose a writable folder")
        out = hf.export(model, method, tokenizer_file, out, max_positions=max(2048, seq_len))
    except (OSError, ConfigError) as exc:
        if created is not None:  # a refused export leaves no folder of its own behind
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(exc, "the export", "free space or choose another folder") from None
        raise
    files = sorted(p.name for p in out.iterdir())
    runnable = "a LlamaForCausalLM" if method == "vanilla" else f"harness-only ({method}; see README.md)"
    print(json.dumps({"out": str(out), "method": method, "transformers": runnable, "files": files}, indent=2))
    return 0
