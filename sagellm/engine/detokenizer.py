"""Incremental detokenization and stop-string matching for one request."""

from __future__ import annotations

from sagellm.models.tokenizer import TextTokenizer


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Contract: `add(token_id)` returns the newly printable text (possibly "" while a multi-byte
    character is incomplete, or while text that could begin a stop string is held back). After a
    stop string is seen, `stopped` is true and `text` ends just before it. `finish()` returns what
    was held back. `text` is always the concatenation of every delta returned.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._decoded += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        if self.stop:
            window_start = max(0, len(self.text) - self.hold)
            hits = [i for s in self.stop if (i := self._decoded.find(s, window_start)) >= 0]
            if hits:
                self.stopped = True
                return self._emit_until(min(hits))
            return self._emit_until(max(len(self.text), len(self._decoded) - self.hold))
        return self._emit_until(len(self._decoded))

    def finish(self) -> str:
        """Flush held-back text at the end of generation."""
        if self.stopped:
            return ""
        return self._emit_until(len(self._decoded))

    def _emit_until(self, end: int) -> str:
        delta = self._decoded[len(self.text) : end]
        self.text += delta
        return delta
