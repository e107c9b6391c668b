"""Plugins register by decorator or entry point; configs fail clearly on bad values."""

import json
import subprocess
import sys

import pytest

from harness.core import registry
from harness.core.config import SIZES, ConfigError, ModelConfig
from tests.plugin_support import install_example_plugin


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_list_json_has_name_summary_config():
    out = run_cli("list", "--json")
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)
    vanilla = next(i for i in items if i["name"] == "vanilla")
    assert vanilla["summary"] and "d_model" in vanilla["config"]
    assert vanilla["config"]["d_model"]["type"] == "int"


def test_third_party_plugin_appears_in_list(tmp_path):
    env = install_example_plugin(tmp_path / "site")
    out = run_cli("list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    items = {i["name"]: i for i in json.loads(out.stdout)}
    assert items["wide_head"]["source"] == "harness_example_plugin"
    assert "embed_mix" in items["wide_head"]["config"]
    text = run_cli("list", env=env).stdout
    assert "wide_head:" in text and "embed_mix" in text


@pytest.mark.parametrize("field,value,needle", [
    ("d_model", -8, "d_model"),
    ("n_layers", 0, "n_layers"),
    ("n_heads", 5, "n_heads"),  # 64 is not divisible by 5
    ("n_kv_heads", 3, "n_kv_heads"),
    ("vocab_size", -1, "vocab_size"),
])
def test_bad_config_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{field: value})


def test_unknown_method_and_field_and_size():
    with pytest.raises(registry.UnknownMethodError, match="unknown method 'nope'.*vanilla"):
        registry.get("nope")
    with pytest.raises(ConfigError, match="unknown field.*d_modle"):
        registry.build("vanilla", overrides={"d_modle": 3})
    with pytest.raises(ConfigError, match="unknown size"):
        registry.build("vanilla", size="huge")
    with pytest.raises(ConfigError, match="expected int"):
        registry.build("vanilla", overrides={"d_model": "wide"})


def test_cli_string_overrides_are_coerced():
    model = registry.build("vanilla", size="pico", overrides={"n_layers": "3", "ponder_init": "false"})
    assert model.config.n_layers == 3 and model.config.ponder_init is False


def test_size_ladder_spans_cpu_to_pythia():
    small = registry.build("vanilla", size="pico", overrides={"vocab_size": 512})
    assert small.num_params() < 1_000_000  # CPU rungs train in minutes (pico: 3 layers of width 128)
    expected = {"70m": 70e6, "160m": 160e6, "410m": 410e6, "1b": 1.0e9, "1.4b": 1.4e9, "2.8b": 2.8e9}
    for name, params in expected.items():
        size = SIZES[name]
        cfg = ModelConfig.for_size(name, vocab_size=50304)
        blocks = cfg.n_layers * (4 * size.d_model ** 2 + 3 * size.d_model * size.d_ff)
        total = blocks + 2 * 50304 * size.d_model
        assert 0.6 * params < total < 1.4 * params, (name, total)
