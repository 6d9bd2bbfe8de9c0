"""Text <-> token ids through a transformers fast tokenizer built from local files only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sagellm.models.errors import ModelLoadError


class TextTokenizer:
    """Encode, decode and chat-format text for one model.

    Wraps a transformers fast tokenizer (`hf`). `eos_token_ids` is the tokenizer's eos id followed
    by any extra ids given at construction (e.g. a GGUF file's eot id, or generation_config.json's
    list), without duplicates. Instances are read-only after construction.
    """

    def __init__(self, hf: Any, extra_eos_token_ids: Iterable[int] = (), source: Path | None = None) -> None:
        self.hf = hf
        self.source = source
        ids = [hf.eos_token_id] if hf.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys([*ids, *(int(i) for i in extra_eos_token_ids)])
        )
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)  # base vocabulary plus added tokens: the whole id space

    @property
    def has_chat_template(self) -> bool:
        """True if the model ships a chat template (GGUF tokenizer.chat_template / tokenizer_config)."""
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens=True the model's BOS/EOS rules are applied."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (e.g. <|im_end|>) are dropped unless skip_special_tokens=False."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ({"role", "content"} dicts), as text.

        Raises ValueError if the model has no chat template (no fallback format is guessed).
        """
        if not self.has_chat_template:
            raise ValueError(
                f"{self.source or 'this tokenizer'}: the model has no chat template "
                "(tokenizer.chat_template in the GGUF file, chat_template in tokenizer_config.json); "
                "use encode() on plain text instead"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of `render_chat(...)`; the template supplies the special tokens (no BOS is added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def load_tokenizer(
    path: Path, extra_eos_token_ids: Iterable[int] = (), cache_dir: Path | None = None
) -> TextTokenizer:
    """Build the tokenizer of a GGUF file or Hugging Face directory from local files only.

    GGUF: transformers converts the file's `tokenizer.ggml.*` metadata into a fast tokenizer; this
    parses the whole GGUF header and takes about 10 s for SmolLM2. With `cache_dir`, the converted
    tokenizer is saved under `cache_dir/<key>` (key: resolved path, size, mtime, transformers
    version) and later loads read it back in well under a second. HF directory: read as is; eos
    ids from generation_config.json are added. Pass the model's `shape.eos_token_ids` as
    `extra_eos_token_ids` so both sides agree on stop tokens.
    Side effect: sets HF_HUB_OFFLINE=1 in this process's environment. Raises ModelLoadError.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer  # after HF_HUB_OFFLINE, so the hub client starts offline

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; nothing is downloaded from a hub")
    extra = list(extra_eos_token_ids)
    try:
        if path.is_dir():
            extra += _generation_eos_ids(path)
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            cached = _cache_entry(path, cache_dir) if cache_dir is not None else None
            if cached is not None and (cached / "tokenizer.json").is_file():
                hf = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            else:
                hf = AutoTokenizer.from_pretrained(
                    str(path.parent), gguf_file=path.name, local_files_only=True
                )
                if cached is not None:
                    _save_atomically(hf, cached)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for bad inputs
        raise ModelLoadError(f"{path}: cannot build a tokenizer: {type(e).__name__}: {e}") from e
    if not getattr(hf, "is_fast", False):
        raise ModelLoadError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    return TextTokenizer(hf, extra, source=path)


def _generation_eos_ids(model_dir: Path) -> list[int]:
    """eos_token_id (int or list) from generation_config.json, or [] if absent or unreadable."""
    try:
        value = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get(
            "eos_token_id"
        )
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def _cache_entry(gguf_path: Path, cache_dir: Path) -> Path:
    """Directory under `cache_dir` for this exact GGUF file and transformers version."""
    import transformers

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return Path(cache_dir).expanduser() / hashlib.sha256(key.encode()).hexdigest()[:20]


def _save_atomically(hf: Any, target: Path) -> None:
    """save_pretrained into a temporary sibling, then rename; a concurrent writer's copy wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        hf.save_pretrained(str(tmp))
        os.rename(tmp, target)
    except Exception:  # caching is best effort
        pass  # another process created `target` first, or the cache is not writable: just don't cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
