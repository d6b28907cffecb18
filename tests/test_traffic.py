"""benchmarks/traffic.py: its FLOPs against deit_fast/flops.py, its bytes against hand counts
of a residual+LayerNorm and a bias+GELU in both settings, the fusions' saving on DeiT-S,
and the script end to end. Everything runs on fake tensors: no kernel runs, nothing is timed.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import traffic
from benchmarks.traffic_count import count_step, counting, fake_tensors
from deit_fast.flops import train_flops_per_image
from deit_fast.models import create_model
from deit_fast.models.deit import LayerNorm, Mlp

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "traffic.py"
ROWS, WIDTH, HIDDEN = 2 * 197, 384, 1536  # R tokens of DeiT-S: C wide, H in the MLP


@pytest.fixture(scope="module")
def deit_s_steps() -> dict:
    """The counted ops of one DeiT-S step at batch 256, per setting."""
    return {s: count_step(traffic.MODELS["small"], traffic.setting_kernels(s), 256)
            for s in ("torch-eager", "torch", "triton")}


def _family_bytes(ops, family: str) -> int:
    return sum(o.read + o.written for o in ops if o.family == family)


def test_flops_equal_the_model_count_plus_what_attention_backwards_recompute(deit_s_steps):
    with torch.device("meta"):
        model = create_model(traffic.MODELS["small"])
    expected = train_flops_per_image(model) * 256
    tokens = model.grid**2 + 1
    product = 2 * tokens**2 * WIDTH * 256 * len(model.blocks)  # one q@k^T of every block
    # eager attention recomputes nothing; SDPA's backward q@k^T; ours q@k^T twice and
    # dout@v^T once more (each of its two kernels does its own)
    for setting, recomputed in (("torch-eager", 0), ("torch", 1), ("triton", 3)):
        counted = sum(o.flops for o in deit_s_steps[setting])
        assert counted - recomputed * product == pytest.approx(expected, rel=0.01), setting
    assert sum(o.flops for o in deit_s_steps["torch-eager"]) == pytest.approx(expected, rel=1e-6)


def test_counter_charges_each_distinct_element_once():
    with fake_tensors():
        x, y = torch.randn(64, 32), torch.randn(64, 32)
        bias = torch.randn(32)
        with counting() as ops:
            z = x + bias.expand(64, 32)  # a broadcast view: its 32 values read once
            x.add_(y)  # read both, write x
            x.copy_(y)  # y read, x only written
            z.t().reshape(-1)[:5]  # views: nothing (the reshape of a transpose copies)
            torch.zeros_like(z)  # z's shape, not its data
            x.mul_(x)  # x passed twice, read once
    n = 64 * 32 * 4
    assert [(o.op, o.read, o.written) for o in ops] == [
        ("aten.add.Tensor", n + 32 * 4, n), ("aten.add_.Tensor", 2 * n, n),
        ("aten.copy_.default", n, n), ("aten.clone.default", n, n),
        ("aten.zeros_like.default", 0, n), ("aten.mul_.Tensor", n, n)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_residual_layernorm_bytes_equal_a_hand_count(impl):
    """x the fp32 residual stream, residual a bf16 branch output, under bf16 autocast, as in
    the model; forward, then backward from gradients for y and for the new stream s."""
    r, c = ROWS, WIDTH
    with fake_tensors():
        norm = LayerNorm(c)
        norm.impl = impl
        x = torch.randn(2, 197, c, requires_grad=True)
        residual = torch.randn(2, 197, c, dtype=torch.bfloat16, requires_grad=True)
        with counting() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, s = norm(x, residual)
            torch.autograd.backward([y, s], [torch.randn_like(y), torch.randn_like(s)])
    if impl == "torch":
        forward = (4 + 2 + 4) * r * c  # s = x + residual
        forward += 4 * r * c + 8 * c + 4 * r * c + 8 * r  # y = LN(s) in fp32: s, w, b; y, stats
        # LN backward reads dy, s, stats, w and b (passed, unread) and writes dx, dw, db; the
        # engine then adds the gradient of s
        backward = (4 + 4) * r * c + 8 * r + 8 * c + 4 * r * c + 8 * c + (8 + 4) * r * c
    else:
        forward = (4 + 2) * r * c + 8 * c + (2 + 4) * r * c + 8 * r  # x, res, w, b; y, s, stats
        backward = (2 + 4 + 4) * r * c + 4 * c + 8 * r + 4 * r * c + 8 * c  # dy, ds, s, w, stats
    assert _family_bytes(ops, "layernorm") == forward + backward
    # the residual's gradient to bf16; torch's y, as its reference writes it in the autocast
    # dtype, also goes to bf16 and its gradient back to fp32 (where a Linear would cast them)
    casts = (4 + 2) * r * c * (3 if impl == "torch" else 1)
    assert _family_bytes(ops, "casts") == casts


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bias_gelu_bytes_equal_a_hand_count(impl):
    """The MLP's non-matmul, non-cast ops in bf16: torch's fc1 adds the bias in its matmul,
    GELU reads and writes the hidden tensor, its backward reads dg and h and writes dh, and
    fc1's bias gradient reads dh again; ours adds the bias inside GELU and sums its gradient
    in the same pass."""
    r, h = ROWS, HIDDEN
    with fake_tensors():
        mlp = Mlp(WIDTH, h)
        mlp.impl = impl
        x = torch.randn(2, 197, WIDTH, dtype=torch.bfloat16, requires_grad=True)
        with counting() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = mlp(x)
            out.backward(torch.randn_like(out))
    if impl == "torch":
        expected = (2 + 2) * r * h + (2 + 2 + 2) * r * h + 2 * r * h + 2 * h
    else:
        expected = (2 * r * h + 4 * h + 2 * r * h) + (2 + 2) * r * h + 4 * h + 2 * r * h + 4 * h
    assert _family_bytes(ops, "gelu") == expected


def test_triton_moves_fewer_bytes_than_torch_on_deit_s(deit_s_steps):
    torch_ops, triton_ops = deit_s_steps["torch"], deit_s_steps["triton"]
    total = {s: sum(o.read + o.written for o in ops) for s, ops in deit_s_steps.items()}
    assert total["triton"] < total["torch"] < total["torch-eager"]
    for family in ("attention", "layernorm", "gelu", "casts"):  # what the fused ops touch
        assert _family_bytes(triton_ops, family) < _family_bytes(torch_ops, family), family
    for family in ("drop path", "optimizer", "EMA"):  # what they leave alone
        assert _family_bytes(triton_ops, family) == _family_bytes(torch_ops, family), family
    # torch's fc1 reads its bf16 bias in the matmul; ours, in the GELU
    fc1_biases = 12 * HIDDEN * 2
    assert _family_bytes(triton_ops, "matmul") + fc1_biases == _family_bytes(torch_ops, "matmul")
    assert not any(o.family == "other" for o in triton_ops + torch_ops)


def test_the_update_reads_and_writes_each_parameter_by_hand(deit_s_steps):
    """Fused AdamW reads param, grad and both moments (fp32) and writes back all but the
    grad; the EMA reads its copy and the param and writes its copy; the guard reads every
    grad and writes it back (its kernel multiplies by 1)."""
    with torch.device("meta"):
        params = list(create_model(traffic.MODELS["small"]).parameters())
    n, tensors = sum(p.numel() for p in params), len(params)

    def charged(op: str) -> int:
        return sum(o.read + o.written for o in deit_s_steps["triton"] if o.op == op)

    # plus a step count per tensor, and each of the two groups' lr and found_inf
    assert charged("aten._fused_adamw_.tensor_lr") == 28 * n + 4 * tensors + 2 * 8
    assert charged("aten._foreach_lerp_.List") == 12 * n + 4  # one weight, passed per tensor
    assert charged("aten._amp_foreach_non_finite_check_and_unscale_.default") == 8 * n + 12


def test_script_writes_the_tables_and_compares_a_step_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--settings",
                           "torch,triton", "--batch", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "traffic.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["setting"]) for r in rows] == [("DeiT-Ti", "torch"),
                                                         ("DeiT-Ti", "triton")]
    assert {"model", "setting", "gb_per_step", "matmul_tflop_per_step", "bound_ms_h100",
            "bound_ms_h200", "bound_ms_h200_790"} <= rows[0].keys()
    assert all(float(r["gb_per_step"]) > 0 and float(r["bound_ms_h100"])
               > float(r["bound_ms_h200"]) for r in rows)
    assert (tmp_path / "traffic_families.png").stat().st_size > 0
    assert "| DeiT-Ti | triton |" in (tmp_path / "traffic.md").read_text()
    assert done.stdout.rstrip().splitlines()[-1].startswith("| DeiT-Ti | triton |")

    # a step run on an H100: its triton row against that bound, timm's with none
    step = tmp_path / "step_h100.csv"
    with open(step, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "setting", "kernels", "batch",
                                               "img_per_s", "status"])
        writer.writeheader()
        writer.writerow({"model": "DeiT-Ti", "setting": "ours triton", "batch": 2,
                         "kernels": rows[1]["kernels"], "img_per_s": 10.0, "status": "ok"})
        writer.writerow({"model": "DeiT-Ti", "setting": "timm eager", "batch": 2,
                         "kernels": "timm", "img_per_s": "", "status": "OOM"})
    step.with_suffix(".json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3"}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(step), "--bounds",
                           str(tmp_path / "traffic.csv")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, timm = done.stdout.splitlines()[-2:]
    bound = int(rows[1]["img_per_s_h100"])
    assert ours.split()[-3:] == ["10.0", str(bound), f"{10 / bound:.0%}"]
    assert timm.split()[-1] == "OOM"
