"""Peak memory is per task: a large allocation in one task does not show in the next one run by
the same process (the process's max RSS would carry it over)."""

import time

import torch

from qeval.model.memory import PeakMemory

MB = 1 << 20


def test_cpu_peak_is_measured_per_task_not_per_process():
    cpu = torch.device("cpu")
    with PeakMemory(cpu) as before:
        time.sleep(0.05)
    with PeakMemory(cpu) as big:
        x = torch.ones(256 * MB // 4)          # 256 MiB of float32, written so the pages are resident
        time.sleep(0.1)                        # several sampling intervals while it is held
        del x
    with PeakMemory(cpu) as after:
        time.sleep(0.05)
    assert big.kind == "cpu_rss_sampled_10ms"
    # the allocation shows in its own task (allocator overheads aside: at least 3/4 of it) ...
    assert big.bytes - before.bytes > 192 * MB, (big.bytes, before.bytes)
    # ... and not in the next one: freed memory returns to the OS for an allocation this large
    assert after.bytes < big.bytes - 192 * MB, (after.bytes, big.bytes)
