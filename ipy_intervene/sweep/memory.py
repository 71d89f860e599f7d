"""How much memory a sweep may use for one batch of patched runs.

>>> budget(torch.device("cpu"), 0.25) > 0
True
"""

from __future__ import annotations

import os

import torch


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA allocator's view, or MemAvailable of the host."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def budget(device: torch.device, fraction: float) -> int:
    """``fraction`` of the free memory, in bytes (at least 64 MiB)."""
    return max(64 << 20, int(free_bytes(device) * fraction))

