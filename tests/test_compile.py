"""Every Triton kernel compiles for sm_90 (H100/H200) in bf16 and under bf16 autocast, at the
DeiT shapes, with no GPU: benchmarks/compile.py --quick, in its own processes (the
interpreter that this suite switches on would make compiling impossible)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNELS = {"attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "layer_norm_fwd",
           "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd"}


def test_every_kernel_builds_for_sm90_without_spills_and_on_tensor_cores(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile.py"), "--quick", "--out",
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    with open(tmp_path / "compile_sm90_quick.csv") as f:
        rows = list(csv.DictReader(f))

    failing = [f"{r['kernel']} {r['dtypes']} {r['config']} ({r['case']}): {r['problems']}"
               for r in rows if r["status"] != "ok"]
    assert not failing, "\n".join(failing)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["kernel"] for r in rows} >= KERNELS
    assert {r["arch"] for r in rows} == {"sm_90"}
    cases = {r["case"].split(" (+")[0] for r in rows}
    assert any("autocast bf16" in c for c in cases)
    # Every bf16 attention config ran its dots on wgmma, and the table came last.
    attention = [r for r in rows if r["kernel"].startswith("attention")]
    assert attention and all(r["tensor_cores"] == "wgmma" for r in attention)
    assert all(int(r["spill_bytes"]) == 0 and int(r["registers"]) > 0 for r in rows)
    assert done.stdout.rstrip().splitlines()[-1].startswith("sm_90")
    heading = (tmp_path / "compile_sm90_quick.md").read_text().splitlines()[0]
    assert heading == "# Compile check: sm_90, quick subset (bf16 and bf16 autocast, DeiT shapes)"
