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
import sys

from harness import checkpoint, hf
from harness.core import registry
from harness.core.errors import CheckpointError
from harness.core.io import read_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a job folder written by `python -m harness train`")
    parser.add_argument("out", help="the folder to write (created; files in it are replaced)")


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


def run(args: argparse.Namespace) -> int:
    method, model, tokenizer_file, job = load_trained(pathlib.Path(args.folder))
    seq_len = int((job.get("train") or {}).get("seq_len", 0))
    out = hf.export(model, method, tokenizer_file, args.out, max_positions=max(2048, seq_len))
    files = sorted(p.name for p in out.iterdir())
    runnable = "a LlamaForCausalLM" if method == "vanilla" else f"harness-only ({method}; see README.md)"
    print(json.dumps({"out": str(out), "method": method, "transformers": runnable, "files": files}, indent=2))
    return 0
