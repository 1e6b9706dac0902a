"""Peak memory of one task, measured for that task alone.

On CUDA the allocator's peak is reset when the task starts. On CPU the process's max RSS is the
peak since the process began, so in a one-process sweep it carries over between cells; instead a
background thread samples the resident set size every ``interval`` seconds while the task runs
and keeps the largest (a sampled peak: a spike shorter than the interval can be missed, which the
row's ``peak_memory_kind`` says).
"""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``, ``peak.kind``."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.bytes, self.kind = 0, ""
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        self.kind = f"cpu_rss_sampled_{self.interval * 1000:g}ms"
        self._process = psutil.Process()
        self.bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, self._process.memory_info().rss)
