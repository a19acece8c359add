"""Peak resident memory (RSS) of this process while a block of code runs."""

from __future__ import annotations

import logging
import threading

from kompakt.process_memory import high_water_mark, max_rss_lifetime, reset_high_water_mark

logger = logging.getLogger(__name__)


def _rss_now() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform: use the getrusage fallback
        return None


class PeakMemory:
    """Context manager measuring this process's peak RSS while its block runs; `.peak_bytes` after exit.

    The whole process is measured (everything loaded counts). On Linux the kernel's own peak
    counter is reset on entry and read on exit, which is exact. Elsewhere RSS is sampled in a
    background thread every `interval` seconds (a spike shorter than that, or one while the
    thread is not scheduled, can be missed), and without psutil the lifetime peak from
    getrusage is reported instead (an upper bound).

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
        self._kernel_peak = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_now()
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._kernel_peak = reset_high_water_mark()
        rss = _rss_now()
        self._sampling = rss is not None
        self.start_bytes = rss if rss is not None else max_rss_lifetime()
        self.peak_bytes = self.start_bytes
        if self._sampling and not self._kernel_peak:
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
        if self._kernel_peak:
            self.peak_bytes = max(self.peak_bytes, high_water_mark() or 0)
        elif not self._sampling:
            self.peak_bytes = max(self.peak_bytes, max_rss_lifetime())


def peak_rss(fn, *args, **kwargs) -> tuple[object, int]:
    """Run fn(*args, **kwargs); return (its result, peak RSS in bytes while it ran)."""
    with PeakMemory() as mem:
        result = fn(*args, **kwargs)
    return result, mem.peak_bytes
