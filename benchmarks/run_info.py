"""What the GPU benchmarks share: the CUDA-or-smoke choice, and the device, versions, date
and command recorded beside their numbers. Imported as `benchmarks.run_info` once a
script has put the repository root at the head of sys.path."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys

import torch


def cuda_or_smoke(script: str, smoke: bool, smoke_runs: str) -> bool | None:
    """True with a CUDA GPU. Without one: False for --smoke, with the Triton interpreter
    switched on before triton is first imported; None, after saying why, otherwise."""
    if torch.cuda.is_available():
        return True
    if not smoke:
        print(f"benchmarks/{script}: no CUDA GPU; use --smoke to run {smoke_runs} on the CPU "
              "under the Triton interpreter", file=sys.stderr)
        return None
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
    return False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


def file_stem(name: str, smoke: bool) -> str:
    """'smoke', or the device name as a file-name slug."""
    return "smoke" if smoke else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_meta(name: str, script: str, argv: list[str] | None) -> dict:
    """Device, library versions, UTC date and the command line of this run."""
    import triton

    return {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"python benchmarks/{script}",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
