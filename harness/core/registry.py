"""The plugin registry: methods register by decorator (in-tree) or entry point (third-party).

In-tree plugins are the modules of the ``baselines`` and ``models`` packages: a new file there that
uses ``@register`` is found without editing the harness. A third-party package declares

    [project.entry-points."harness.plugins"]
    my_method = "my_package.my_module"          # a module that uses @register, or
    my_method = "my_package.my_module:MyModel"   # a LanguageModel subclass, registered under that name

and appears in ``python -m harness list`` once installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from harness.core.config import ModelConfig
from harness.core.errors import ConfigError, UnknownMethodError

ENTRY_POINT_GROUP = "harness.plugins"
IN_TREE_PACKAGES = ("models", "baselines")


@dataclass(frozen=True)
class Plugin:
    name: str
    cls: type
    summary: str
    source: str  # "in-tree" or the distribution that provides it

    @property
    def config_class(self) -> type[ModelConfig]:
        return self.cls.Config

    def make_config(self, size: str | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
        overrides = dict(overrides or {})
        if size is None:
            return self.config_class.from_dict(overrides)
        return self.config_class.for_size(size, **overrides)

    def build(self, config: ModelConfig):
        return self.cls(config)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "source": self.source,
                "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
                "config": self.config_class.describe_fields()}


_PLUGINS: dict[str, Plugin] = {}
_discovered = False
_load_errors: dict[str, str] = {}

T = TypeVar("T", bound=type)


def register(name: str, *, summary: str | None = None) -> Callable[[T], T]:
    """Class decorator: ``@register("my_method")`` on a LanguageModel subclass with a ``Config``."""

    def decorator(cls: T) -> T:
        _add(name, cls, summary, _source_of(cls))
        return cls

    return decorator


def _add(name: str, cls: type, summary: str | None, source: str) -> None:
    if not name.isidentifier():
        raise ConfigError(f"plugin name {name!r} must be an identifier (letters, digits, underscore)")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, ModelConfig)):
        raise ConfigError(f"plugin {name!r}: {cls.__name__}.Config must subclass harness.core.config.ModelConfig")
    existing = _PLUGINS.get(name)
    if existing is not None and existing.cls is not cls:
        raise ConfigError(f"plugin name {name!r} is registered twice ({existing.cls.__module__} and "
                          f"{cls.__module__}); rename one of them")
    doc = summary or (inspect.getdoc(cls) or config.summary).strip().splitlines()[0]
    _PLUGINS[name] = Plugin(name, cls, doc, source)


def _source_of(cls: type) -> str:
    top = cls.__module__.split(".")[0]
    return "in-tree" if top in IN_TREE_PACKAGES else top


def discover(force: bool = False) -> None:
    """Import every in-tree plugin module and every installed entry point (once)."""
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    for package_name in IN_TREE_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                module = f"{package_name}.{info.name}"
                _load(info.name, module, functools.partial(importlib.import_module, module))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = _load(ep.name, ep.value, ep.load)
        if obj is None:
            continue
        if inspect.isclass(obj) and not any(p.cls is obj for p in _PLUGINS.values()):
            dist = ep.dist.name if ep.dist is not None else ep.value.split(".")[0]
            _add(ep.name, obj, None, dist)


def _load(name: str, where: str, load: Callable[[], Any]) -> Any:
    """Import one plugin; a broken plugin is reported, and must not take the others down."""
    try:
        return load()
    except Exception as exc:
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"warning: plugin {name!r} ({where}) failed to load: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def plugins() -> dict[str, Plugin]:
    discover()
    return dict(sorted(_PLUGINS.items()))


def get(name: str) -> Plugin:
    discover()
    if name not in _PLUGINS:
        hint = f" (it failed to load: {_load_errors[name]})" if name in _load_errors else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint}; registered methods: "
                                 f"{', '.join(sorted(_PLUGINS))} (see `python -m harness list`)")
    return _PLUGINS[name]


def build(name: str, size: str | None = None, overrides: dict[str, Any] | None = None):
    plugin = get(name)
    return plugin.build(plugin.make_config(size, overrides))


__all__ = ["ENTRY_POINT_GROUP", "Plugin", "UnknownMethodError", "build", "discover", "get", "plugins", "register"]
