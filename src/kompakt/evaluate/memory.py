"""Peak resident memory (RSS) of this process while a block of code runs."""

from __future__ import annotations

import logging
import resource
import sys
import threading

logger = logging.getLogger(__name__)


def _rss_now() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform: use the getrusage fallback
        return None


def _max_rss_lifetime() -> int:
    """Peak RSS of the whole process so far (getrusage; kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)


class PeakMemory:
    """Context manager sampling RSS in a background thread; `.peak_bytes` after exit.

    The whole process is measured (everything loaded counts), sampled every `interval`
    seconds, so a spike shorter than that can be missed. Without psutil the lifetime peak
    from getrusage is reported instead (an upper bound).

        with PeakMemory() as mem:
            run()
        print(mem.peak_bytes)
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampling = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_now()
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        rss = _rss_now()
        self._sampling = rss is not None
        self.start_bytes = rss if rss is not None else _max_rss_lifetime()
        self.peak_bytes = self.start_bytes
        if self._sampling:
            self._thread = threading.Thread(target=self._sample, name="kompakt-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss = _rss_now()
        if rss is not None:
            self.peak_bytes = max(self.peak_bytes, rss)
        if not self._sampling:
            self.peak_bytes = max(self.peak_bytes, _max_rss_lifetime())


def peak_rss(fn, *args, **kwargs) -> tuple[object, int]:
    """Run fn(*args, **kwargs); return (its result, peak RSS in bytes while it ran)."""
    with PeakMemory() as mem:
        result = fn(*args, **kwargs)
    return result, mem.peak_bytes
