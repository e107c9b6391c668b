"""The kit for plugin authors: the README's example method, installed as a package, passes
``python -m harness check``; a broken method fails it with one line per check saying what to fix."""

import os
import re
import subprocess
import sys

import pytest
import torch

from harness import check
from harness.cli import main
from harness.core import compute, registry
from harness.core.registry import register
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.train import train_job
from models.base import DecodeOutput, LanguageModel
from tests.plugin_support import EXAMPLE

README = EXAMPLE.parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Adding a baseline" section."""
    section = README.read_text().split("## Adding a baseline", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's 'Adding a baseline' section has no python block"
    return blocks[0]


@pytest.fixture
def readme_package(tmp_path, monkeypatch):
    """The README example as an installed package: its module plus a dist-info with the entry point."""
    code = readme_example()
    assert "..." not in code and "def new_cache" in code and "def decode" in code
    assert "def analytic_flops_per_token" in code
    package = tmp_path / "site" / "my_readme_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "my_method.py").write_text(code)
    dist = tmp_path / "site" / "my_readme_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-readme-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[harness.plugins]\nmy_method = my_readme_plugin.my_method\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path / "site"
    registry._PLUGINS.pop("my_method", None)
    for name in [m for m in sys.modules if m.startswith("my_readme_plugin")]:
        del sys.modules[name]


def test_readme_example_is_complete_and_passes_every_check(readme_package, tmp_path, small_corpus):
    import my_readme_plugin.my_method  # noqa: F401  (registers "my_method", as the entry point would)

    assert [str(c) for c in check.cases(["my_method"])] == ["my_method", "my_method-one_pass"]
    assert check.run_checks("my_method") == []
    # and it trains and evaluates through the harness without a FLOPs warning
    train = TrainConfig(seq_len=32, batch_size=4, eval_tokens=512, checkpoint_every=1000)
    probe = registry.build("my_method", size="pico", overrides={"vocab_size": 512})
    budget = 10 * train.batch_size * train.seq_len * probe.train_flops_per_token(train.seq_len)
    job = Job(method="my_method", budget=budget, size="pico", data=DataConfig(source=small_corpus, vocab_size=512),
              train=train)
    result = train_job(job, tmp_path / "job", progress=False)
    assert result["train_steps"] == 10 and "flops_warning" not in result


def test_check_command_finds_the_installed_readme_plugin(readme_package):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(readme_package),
                                                                    os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "harness", "check", "my_method"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "check: 13 of 13 contract checks passed (my_method)" in out.stdout


class _Leaky(LanguageModel):
    """Vanilla whose decode forgets its cache and whose analytic count misses the head."""

    def decode(self, input_ids, cache, valid=None):
        return DecodeOutput(self.decoder(input_ids, valid=valid))  # no cache: earlier tokens are forgotten

    def analytic_flops_per_token(self, seq_len, training=False):
        return 0.5 * super().analytic_flops_per_token(seq_len, training)


@pytest.fixture
def leaky():
    register("leaky_for_test")(_Leaky)
    yield "leaky_for_test"
    registry._PLUGINS.pop("leaky_for_test", None)


def test_broken_method_fails_with_one_line_per_check(leaky, capsys):
    assert main(["check", leaky]) == 1
    captured = capsys.readouterr()
    failed = captured.err.strip().splitlines()
    assert failed and all(line.startswith(f"FAIL {leaky}: ") and "; fix: " in line for line in failed), failed
    by_check = {line.split(": ")[1]: line for line in failed}
    assert {"cached_decoding", "inference_flops", "training"} <= set(by_check)
    assert "decoding 4 tokens, 5 single tokens, then 2 with one cache differs" in by_check["cached_decoding"]
    assert "cache's length as the position offset" in by_check["cached_decoding"]
    assert "FLOPs differ from decode_flops(steps): measured" in by_check["inference_flops"]
    assert f"check: 3 of 7 contract checks passed ({leaky})" in captured.out


def test_unknown_method_is_one_line(capsys):
    assert main(["check", "no_such_method"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'no_such_method'" in err[0]


def test_checks_raise_assertion_errors_for_pytest(leaky):
    with pytest.raises(AssertionError, match="fix: "):
        check.check_inference_flops(leaky, {})
    check.check_declarations(leaky, {})  # what is right stays right


def test_train_warns_when_measured_flops_exceed_the_analytic_count(leaky, tmp_path, small_corpus, capsys):
    train = ["--set", "train.seq_len=32", "--set", "train.batch_size=4", "--set", "train.eval_tokens=512"]
    probe = registry.build(leaky, size="pico", overrides={"vocab_size": 512})
    budget = 5 * 4 * 32 * probe.train_flops_per_token(32)
    argv = ["train", "--method", leaky, "--size", "pico", "--budget", repr(budget), "--out", str(tmp_path / "j"),
            "--no-progress", "--set", f"data.source={small_corpus}", "--set", "data.vocab_size=512", *train]
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    # its training count is halved too: warned after the first steps, then both in the final warning
    assert len(err) == 2 and "measured training" in err[0] and "after 3 step(s) is +100.0% off" in err[0]
    assert "+100.0% off its analytic count" in err[1] and "harness check leaky_for_test" in err[1]
    assert "measured training" in err[1]
    saved = (tmp_path / "j" / "result.json").read_text()
    assert '"flops_warning": "leaky_for_test: measured inference' in saved


def test_vanilla_measures_its_analytic_count_exactly():
    model = check.build("vanilla")
    with compute.measure() as ledger, torch.no_grad():
        model.score(torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10)))
    assert ledger.totals.forward_flops == 20 * model.analytic_flops_per_token(10)
