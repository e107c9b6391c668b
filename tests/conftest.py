import logging
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


@pytest.fixture
def single_thread():
    """Tiny models are dispatch-bound: one thread is faster and immune to a busy machine (use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# Ray Train's controller polls its workers every 2 s and watches for preemption; a test job is seconds long
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
RAY_CPUS = 4  # logical: two jobs of two one-CPU workers at once (tests/test_distributed.py), on any core count


def _start_ray():
    import ray

    if not ray.is_initialized():  # a test that kills Ray (test_sweep.py's dead raylet) leaves none behind
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return ray


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session (starting one takes seconds on 2 cores): a function that
    returns the ``ray`` module with the instance running, starting it again if a test shut it down."""
    _start_ray()
    yield _start_ray
    import ray

    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped without one (scripts/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
