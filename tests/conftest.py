import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

# One tokenizer/shard cache for the whole session (subprocesses inherit it), never the user's.
if "HARNESS_CACHE" not in os.environ:
    import tempfile

    os.environ["HARNESS_CACHE"] = tempfile.mkdtemp(prefix="harness-test-cache-")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A ~300 KB slice of the embedded corpus as a folder of .txt files: fast to tokenise."""
    from harness.data import DataConfig, load_documents

    train, val = load_documents(DataConfig())
    folder = tmp_path_factory.mktemp("small_corpus")
    docs = train[::40][:60] + val[:6]
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return str(folder)

# Test models are tiny: per-op overhead dominates, and one thread is several times faster than two.
torch.set_num_threads(1)
