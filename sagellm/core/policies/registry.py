"""A registry of policy classes by name, and loading a class by dotted path (standard library only)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any


class PolicyError(ValueError):
    """A policy cannot be found, loaded or built, or it broke its contract; the message names the
    config field (e.g. `scheduler.policy`) and what is allowed."""


class Registry:
    """Policy classes of one kind (`kind`, e.g. "scheduling") by name.

    Contract: `register(name)` is a class decorator that records the class and sets its `name`;
    `resolve(spec, field)` returns the class registered as `spec`, or the class a dotted path
    `package.module:Class` names (imported then), checked to have every method in `required`;
    `create(spec, field, args)` builds it with keyword `args`. Errors are `PolicyError`s naming
    `field`. Side effect of `resolve` with a dotted path: imports that module.
    """

    def __init__(self, kind: str, required: tuple[str, ...]) -> None:
        self.kind = kind
        self.required = required
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self._classes:
                raise PolicyError(f"{self.kind} policy {name!r} is registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls
        return add

    def names(self) -> list[str]:
        return sorted(self._classes)

    def resolve(self, spec: Any, field: str) -> type:
        if not isinstance(spec, str) or not spec:
            raise PolicyError(f"{field}: expected a policy name or 'package.module:Class', got {spec!r}")
        if spec in self._classes:
            return self._classes[spec]
        if ":" not in spec:
            raise PolicyError(f"{field}: unknown {self.kind} policy {spec!r}; registered: {self.names()}, "
                              "or give a class of your own as 'package.module:Class'")
        module_name, _, class_name = spec.partition(":")
        try:
            module = _import(module_name)
        except Exception as exc:  # ImportError, or whatever the module raises while it loads
            raise PolicyError(f"{field}: cannot import module {module_name!r} of {spec!r}: "
                              f"{type(exc).__name__}: {exc}") from None
        cls = getattr(module, class_name, None)
        if not inspect.isclass(cls):
            raise PolicyError(f"{field}: module {module_name!r} has no class {class_name!r}")
        missing = [m for m in self.required if not callable(getattr(cls, m, None))]
        if missing:
            raise PolicyError(f"{field}: class {spec!r} is not a {self.kind} policy: it has no method "
                              f"{', '.join(missing)} (required: {', '.join(self.required)})")
        return cls

    def create(self, spec: Any, field: str, args: Mapping[str, Any] | None = None) -> Any:
        cls = self.resolve(spec, field)
        if args is not None and not isinstance(args, Mapping):
            raise PolicyError(f"{field}_args: expected a mapping of keyword arguments, got {args!r}")
        try:
            return cls(**dict(args or {}))
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"{field}_args: {spec!r} cannot be built with {dict(args or {})!r}: {exc}") from None


def _import(module_name: str) -> Any:
    """Import `module_name`; if it is not found on the path, look in the current directory too, as
    `python -m` would (a researcher runs `sagellm` from the folder that holds their policies)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name) or os.getcwd() in sys.path:
            raise
    sys.path.append(os.getcwd())
    return importlib.import_module(module_name)
