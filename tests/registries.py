"""Parametrizing a test over every registered policy of a kind and a user's own by dotted path."""

from __future__ import annotations

from typing import Any


def every_policy(registry: Any, user_spec: str, user_args: dict | None) -> tuple[list[tuple[str, Any]], list[str]]:
    """(spec, args) for each name in `registry` (no args) and for `user_spec` with `user_args`, and
    their test ids (the class name for a dotted path); a newly registered policy is covered without
    writing a test."""
    entries = [(name, None) for name in registry.names()] + [(user_spec, user_args)]
    return entries, [spec.split(":")[-1] for spec, _ in entries]
