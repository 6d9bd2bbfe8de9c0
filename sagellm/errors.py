"""The error every piece of bad user input becomes, and a bounded way to show a bad value.

Configs, workload specs, trace files, model files and requests each raise a subclass of
`InputError` (itself a `ValueError`, so older callers that catch `ValueError` keep working). The
message names the field, file or line and says what is allowed. `show` renders the offending value
for such a message in bounded space, whatever its size or nesting.
"""

from __future__ import annotations

import reprlib
from typing import Any


class InputError(ValueError):
    """Bad input from a user or a file; the message names the field and what is allowed."""


class ConfigError(InputError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


class RequestError(InputError):
    """A generation request is invalid; the message names the request field."""


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 3
_SHOWN.maxstring = 80
_SHOWN.maxother = 80
_SHOWN.maxlong = 40
for _name in ("maxdict", "maxlist", "maxtuple", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_SHOWN, _name, 6)


def show(value: Any) -> str:
    """`repr(value)` cut to about 100 characters: a value from a hostile file can be huge (a YAML
    alias bomb, a 10,000-digit number), and an error message must not be."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a value whose repr itself fails
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 120 else text[:117] + "..."
