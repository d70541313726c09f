"""One row's tokens turned into text as they arrive: the one detokenizer the CLI's streamed output and
the HTTP API's choices (deltas, stop strings) share. It runs on the thread that steps the generation,
so a stop string ends the row at the token that completes it, streaming or not."""

from __future__ import annotations

from ._ends import ModelEnds


class Detokenizer:
    """Incremental: each token decodes only the ids since the last whole-character boundary (with one
    token of left context, for tokenizers whose decoding of a token depends on its neighbour), so the cost
    per token does not grow with the length of the text. A character still cut by the last token is held
    back; `flush` gives it (as U+FFFD, as the JSON output shows it)."""

    def __init__(self, ends: ModelEnds):
        self.ends = ends
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = self._read = 0  # the left-context start and the first id of the open window
        self._sent = 0  # characters of the open window already emitted
        self._held = ""  # the open window's text not emitted yet (kept by _emit: no second decode)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def held(self) -> str:
        """The text of the ids not emitted yet (a cut character as U+FFFD)."""
        return self._held

    def _window(self) -> str:
        """The text of the ids since the last whole-character boundary."""
        before = self.ends.decode(self.ids[self._prefix:self._read])
        text = self.ends.decode(self.ids[self._prefix:])
        return text[len(before):] if len(text) > len(before) else ""

    def _emit(self, final: bool) -> str:
        window = self._window()
        # An incomplete UTF-8 sequence at the end decodes as one U+FFFD that the next token may complete:
        # hold back that one; replacement characters before it are final (invalid bytes stay invalid).
        cut = not final and window.endswith("\ufffd")
        ready = window[:-1] if cut else window
        new = ready[self._sent:]
        if cut:
            self._sent = max(self._sent, len(ready))
            self._held = window[self._sent:]
        else:  # a whole-character boundary: the next window starts after these ids
            self._prefix, self._read, self._sent, self._held = self._read, len(self.ids), 0, ""
        self.text += new
        return new


class StopText:
    """A choice of an API request: its text, cut at the first stop string, and the deltas to stream
    (held back by the longest stop string's length minus one, so a stop is never half-streamed).
    `feed` runs on the stepping thread for each new token; `finish` once the row has ended."""

    def __init__(self, ends: ModelEnds, stops: list[str]):
        self.detok = Detokenizer(ends)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.hit = False  # a stop string was found: the row ends here
        self.prefix = ""  # echo: the prompt text, streamed first
        self._cut_text = ""
        self._searched = 0  # text searched for stops so far
        self._sent = 0  # characters already streamed

    @property
    def text(self) -> str:
        return self._cut_text if self.hit else self.detok.text

    def feed(self, token: int) -> str:
        """The next token: the text now ready to stream (maybe "")."""
        if not self.hit:
            self.detok.push([token])
            self._look_for_stops()
        return self._ready(final=False)

    def finish(self) -> str:
        """The row has ended: what is left to stream."""
        if not self.hit:
            self.detok.flush()
            self._look_for_stops()
        return self._ready(final=True)

    def _look_for_stops(self) -> None:
        # in everything decoded so far, the held-back tail included: the text `decode(ids)` gives
        text = self.detok.text + self.detok.held()
        start = max(0, self._searched - self.hold)  # a stop may straddle what was searched and what is new
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        self._searched = len(self.detok.text)  # the held tail may still change: searched again next time
        if found:
            self.hit, self._cut_text = True, text[:min(found)]

    def _ready(self, final: bool) -> str:
        text = self.text
        ready = len(text) if final or self.hit else len(text) - self.hold
        if ready <= self._sent:
            return ""
        piece, self._sent = text[self._sent:ready], ready
        return piece
