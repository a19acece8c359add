"""Stop strings cut out of a text stream, shared by every backend's token loop."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Cuts the text before the first stop string, holding back a possible partial match."""

    def __init__(self, stop: str | Sequence[str] | None) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.stops = [item for item in stops if item]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [index for index in (self.buffer.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = max((_overlap(self.buffer, stop) for stop in self.stops), default=0)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
