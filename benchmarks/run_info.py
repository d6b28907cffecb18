"""What the benchmarks share: where they write, the CUDA-or-smoke choice, torch's SDPA
backends by name, and the device, versions, date and command recorded beside their
numbers. Imported as `benchmarks.run_info` once a script has put the repository root at the
head of sys.path."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

# torch's SDPA backends by the name the benchmarks' rows give them (a row forces one with
# torch.nn.attention.sdpa_kernel)
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

# Every benchmark writes here unless given --out: runs/ is in .gitignore, so a run (smoke,
# quick or full, on any machine) leaves the committed tables in benchmarks/results/ as they
# are; a measurement joins them only when asked, with --out benchmarks/results.
DEFAULT_OUT = Path("runs") / "bench"


def add_out_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The --out option every benchmark takes, with the rule above in its help."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for {what} (default: {DEFAULT_OUT}/ under the current "
                             "folder, untracked; --out benchmarks/results to add to or "
                             "replace the committed tables)")


def wrote(out: Path, names: list[str]) -> str:
    """The line that says where a run's files went."""
    return f"wrote {', '.join(names)} to {out.resolve()}"


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
