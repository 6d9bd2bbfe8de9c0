"""The one error type the model loaders raise."""

from __future__ import annotations

from sagellm.errors import InputError


class ModelLoadError(InputError):
    """A model (weights, shape or tokenizer) could not be loaded.

    Contract: the message always names the path involved and what is wrong with it (unknown path,
    not a GGUF file or Hugging Face directory, truncated or corrupt file, unsupported architecture
    or quantization type, missing or unexpected tensor, shape mismatch), so it can be shown to a
    user as is. An `InputError` (so a ValueError): callers validating configuration can catch both.
    """
