"""Shared measuring helpers for the benchmarks: wall time and peak memory of one call."""
from __future__ import annotations

import threading
import time

import torch


class PeakRSS:
    """Peak resident set size above the level at entry, polled every 2 ms (CPU runs)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.used = self.peak - self.base


def measure(fn) -> tuple[float, int]:
    """(seconds, peak bytes above the starting level) of ``fn()``: CUDA allocator peak on a GPU, RSS on a CPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        fn()
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return elapsed, (torch.cuda.max_memory_allocated() - base if cuda else rss.used)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
