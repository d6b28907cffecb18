"""deit-fast: fast, trustworthy training of DeiT vision transformers.

The repository keeps the kernels, the data pipeline and the recipes in top-level folders
(kernels/, data_pipeline/, configs/ beside this one); they import as deit_fast.kernels,
deit_fast.data_pipeline and deit_fast.configs both from a wheel, which installs them inside
this package, and from a checkout, where this package's path also covers the folders beside
it. No top-level `kernels` or `data_pipeline` is installed.
"""

from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
if not (_HERE / "kernels").is_dir() and (_HERE.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # a checkout: the sibling folders are subpackages

CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"
# The source checkout this package runs from, which holds benchmarks/ and its results; None
# for an installed wheel (benchmarks ship with the source only).
REPOSITORY = _HERE.parent if (_HERE.parent / "setup.py").is_file() and \
    (_HERE.parent / "benchmarks" / "step.py").is_file() else None


def commit(dirty: bool = False) -> str:
    """The commit of REPOSITORY, short (`git describe --always`; with dirty, "-dirty" added
    where its tracked files differ from it), or "unknown" outside a source checkout."""
    import subprocess

    if REPOSITORY is None:
        return "unknown"
    found = subprocess.run(["git", "-C", str(REPOSITORY), "describe", "--always",
                            *(["--dirty"] if dirty else [])], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    import contextlib
    import platform

    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
