"""The machine and software a benchmark ran on (the ``environment`` entry of ``results.json``)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .. import __version__

__all__ = ["cpu_model", "describe_environment"]


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (``None`` where that is not available)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe_environment(device: torch.device) -> dict[str, Any]:
    """Date, Python, platform, library versions, device, threads and CPU/GPU model."""
    import nequip  # heavy: loaded only when a run is described

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "nequip": getattr(nequip, "__version__", "?"),
        "nequip_sus2": __version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import allegro  # optional and heavy: only its version is recorded

        env["nequip_allegro"] = getattr(allegro, "__version__", "?")
    except ImportError:
        pass
    cpu = cpu_model()
    if cpu is not None:
        env["cpu"] = cpu
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
