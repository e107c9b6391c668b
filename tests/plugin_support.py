"""Make the example plugin package importable with its entry point, as `pip install` would."""

import os
import pathlib
import sys

EXAMPLE = pathlib.Path(__file__).parent / "plugin_example"


def install_example_plugin(site: pathlib.Path) -> dict[str, str]:
    """Write a dist-info for tests/plugin_example into ``site``; return env vars that activate it.

    importlib.metadata discovers entry points from ``*.dist-info`` folders on sys.path, which is
    exactly what pip leaves behind, without mutating the test environment.
    """
    dist = site / "harness_example_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-example-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[harness.plugins]\nwide_head = harness_example_plugin.wide_head\n")
    paths = [str(site), str(EXAMPLE / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def activate_in_process(site: pathlib.Path, monkeypatch) -> None:
    env = install_example_plugin(site)
    for p in reversed(env["PYTHONPATH"].split(os.pathsep)):
        monkeypatch.syspath_prepend(p)
    import importlib

    importlib.invalidate_caches()
    from harness.core import registry

    registry.discover(force=True)
    sys.modules.setdefault("harness_example_plugin", __import__("harness_example_plugin"))
