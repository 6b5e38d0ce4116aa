"""The method registry: one entry per KD method name.

A method module calls :func:`register` once at import time; :mod:`kd_engine.methods` imports
every method module, so importing it fills the registry. The registry holds only static
definitions (no per-run state), so a worker may run many jobs one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kd_engine.methods.base import Method, MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, its pydantic config class and a factory."""

    name: str
    config_cls: type[MethodConfig]
    factory: Callable[[MethodConfig], Method]


_REGISTRY: dict[str, MethodEntry] = {}


def register(
    name: str, config_cls: type[MethodConfig], factory: Callable[[MethodConfig], Method]
) -> None:
    """Register a method under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = MethodEntry(name=name, config_cls=config_cls, factory=factory)


def get(name: str) -> MethodEntry:
    """Return the entry for ``name``.

    Raises:
        KeyError: no such method; the message lists the names that exist.
    """
    import kd_engine.methods  # noqa: F401  (registers the built-in methods; cached after once)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(names())}") from None


def names() -> list[str]:
    """Return the registered method names, sorted (every method module is imported first)."""
    import kd_engine.methods  # noqa: F401  (registers the built-in methods; cached after once)

    return sorted(_REGISTRY)


def build(config: MethodConfig) -> Method:
    """Build the method object for a validated config."""
    return get(config.name).factory(config)
