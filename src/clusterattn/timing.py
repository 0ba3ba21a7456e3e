"""Wall-clock timing that is honest on accelerators (CUDA runs asynchronously)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the accelerator's queued work (a no-op on CPU), so wall-clock timers are honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(tensor: torch.Tensor) -> float:
    """``time.perf_counter()`` once ``tensor``'s device has finished its queued work (without the
    wait, work queued before the call, e.g. compression, would be counted in the next interval)."""
    synchronize(tensor.device)
    return time.perf_counter()
