"""The FLOPs and bytes of every op of one training step, counted without running it.

`count_step` runs `Trainer.train_step` (the benchmark step's Trainer, benchmarks/step.py)
under a TorchDispatchMode that records, for every op: its FLOPs (torch's flop counter
formulas) and the bytes of its tensor inputs (read) and of its outputs and mutated
arguments (written). A Triton op is one `deit_fast::` op at that level, so it is charged
what crosses its registered boundary, which is what its kernels must move.

The step runs on FakeTensorMode CPU tensors: every op goes through the real dispatcher
with its real shapes and dtypes, but nothing is computed or allocated, so DeiT-B at the
real batch of 256 takes a second. (A small real batch scaled up would be wrong: the
optimizer's and the EMA's traffic does not grow with the batch.) A Triton op runs its
registered fake implementation: it allocates its outputs and launches nothing. Two
CPU-for-GPU stand-ins: CPU autocast keeps softmax in bf16 where CUDA's computes it in
fp32, so CUDA's rule is applied to softmax (the one op of this step that the two policies
treat differently: the step's LayerNorms see the fp32 stream, its losses cast to fp32);
SDPA runs CPU flash attention, whose op has the CUDA kernels' boundary (q, k, v in, out and
logsumexp out; dq, dk, dv back).

What is charged: every distinct element of every tensor argument once (a broadcast dim
once, not per use), every output and mutated tensor once; views, allocations and metadata
queries nothing. Matmul FLOPs are what the kernels execute: SDPA's backward recomputes
q@k^T (torch's count), ours recomputes q@k^T and dout@v^T in both its kernels. Each op is
charged to a family: matmuls, casts and the update by op, the rest by the innermost
module whose forward made it (its backward too, through a tag on the autograd node).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

if not torch.cuda.is_available():  # resolve_kernels accepts Triton on CPU tensors only so
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import Tensor, nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import (  # noqa: E402
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchmarks import step as step_bench  # noqa: E402
from deit_fast import ema  # noqa: E402
from deit_fast.models import create_model  # noqa: E402
from deit_fast.models.deit import Attention, Block, DeiT, LayerNorm, Mlp  # noqa: E402
from deit_fast.ops import KernelChoice  # noqa: E402

aten = torch.ops.aten
# The innermost module -> the family of its ops; matmuls, casts and the update by op. A
# Linear's only other ops are its bias gradient's sums.
MODULE_FAMILIES = ((Attention, "attention"), (LayerNorm, "layernorm"), (Mlp, "gelu"),
                   (nn.Linear, "bias grads"), (nn.Conv2d, "bias grads"), (Block, "drop path"),
                   (DeiT, "embed & head"))
OUTSIDE_MODEL = "loss & mixup"
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.convolution, aten.convolution_backward}
OP_FAMILIES = {aten._to_copy: "casts", aten._fused_adamw_: "optimizer",
               aten._foreach_add_: "optimizer", aten._foreach_lerp_: "EMA",
               aten._amp_foreach_non_finite_check_and_unscale_: "optimizer"}
FAMILIES = ["matmul", "attention", "layernorm", "gelu", "drop path", "casts", "bias grads",
            "embed & head", "loss & mixup", "optimizer", "EMA", "other"]
NO_TRAFFIC = {aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided,
              aten.new_empty, aten.new_empty_strided, aten.lift_fresh, aten.detach}
SHAPE_ONLY = {aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones,
              aten.new_full}  # their input gives a shape, not data
OVERWRITES = {aten.copy_, aten.fill_, aten.zero_, aten.bernoulli_, aten.normal_,
              aten.uniform_}  # in place, but the old values are not read


@dataclass
class OpCount:
    op: str
    family: str
    backward: bool
    flops: int
    read: int
    written: int


def tensor_bytes(t: Tensor) -> int:
    """Bytes of the distinct elements: a broadcast (stride-0) dim counts once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        elements *= size if stride != 0 else 1
    return elements * t.element_size()


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's formulas, plus CPU SDPA and our attention op: q@k^T and p@v forward; the
    backward's dq kernel does 3 such products, its dk/dv kernel 4."""
    import deit_fast.kernels  # noqa: F401  (registers the deit_fast:: ops)

    def heads(qkv: Tensor, num_heads: int) -> tuple[int, int, int, int]:
        batch, tokens, packed = qkv.shape
        return batch, num_heads, tokens, packed // (3 * num_heads)

    def ours_fwd(qkv: Tensor, num_heads: int, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(*3 * [heads(qkv, num_heads)])

    def ours_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                 *_: Any, **__: Any) -> int:
        return 7 * sdpa_flop_count(*3 * [heads(qkv, num_heads)]) // 2

    def cpu_sdpa(q: Tensor, k: Tensor, v: Tensor, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(q.shape, k.shape, v.shape)

    def cpu_sdpa_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *_: Any, **__: Any) -> int:
        return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)

    return {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_bwd,
            torch.ops.deit_fast.attention_fwd: ours_fwd,
            torch.ops.deit_fast.attention_bwd: ours_bwd}


class ModuleFamilies(TorchFunctionMode):
    """The family of the innermost module running now. Each autograd node is tagged with
    the family of the call that made it, so the backward's ops are charged to it too."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[nn.Module] = []
        self.handles: list[Any] = []

    def current(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get("family", "other")
        for module in reversed(self.stack):
            for kind, family in MODULE_FAMILIES:
                if isinstance(module, kind):
                    return family
        return OUTSIDE_MODEL

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        family = self.current()
        # every node this call made is untagged (e.g. addmm's, under linear's view)
        nodes = [t.grad_fn for t in tree_leaves(out) if isinstance(t, Tensor)]
        while nodes:
            node = nodes.pop()
            if node is not None and "family" not in node.metadata:
                node.metadata["family"] = family
                nodes += [next_node for next_node, _ in node.next_functions]
        return out

    def __enter__(self) -> ModuleFamilies:
        def enter(module: nn.Module, _: Any) -> None:
            self.stack.append(module)

        def leave(*_: Any) -> None:
            self.stack.pop()

        hooks = nn.modules.module
        self.handles = [hooks.register_module_forward_pre_hook(enter),
                        hooks.register_module_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        super().__exit__(*exc)


class TrafficCounter(TorchDispatchMode):
    """An OpCount for every op that moves data."""

    def __init__(self, families: ModuleFamilies) -> None:
        super().__init__()
        self.families, self.formulas = families, _flop_formulas()
        self.ops: list[OpCount] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in NO_TRAFFIC:
            return out
        schema = func._schema
        values = [args[i] if i < len(args) else kwargs.get(arg.name)
                  for i, arg in enumerate(schema.arguments)]
        mutated = [t for arg, value in zip(schema.arguments, values)
                   if arg.alias_info is not None and arg.alias_info.is_write
                   for t in tree_leaves(value) if isinstance(t, Tensor)]
        if packet is aten._fused_adamw_ and kwargs.get("grad_scale") is None:
            # its kernel writes the gradients back only when it unscales them
            mutated = [t for t in mutated if all(t is not g for g in args[1])]
        outs = out if len(schema.returns) > 1 else [out]
        fresh = [t for ret, value in zip(schema.returns, outs) if ret.alias_info is None
                 for t in tree_leaves(value) if isinstance(t, Tensor)]
        if not mutated and not fresh:
            return out  # a metadata query
        unread = mutated[:1] if packet in OVERWRITES else []
        inputs = {} if packet in SHAPE_ONLY else {
            id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        read = sum(tensor_bytes(t) for t in inputs.values() if not any(t is u for u in unread))
        written = sum(tensor_bytes(t) for t in {id(t): t for t in mutated + fresh}.values())
        formula = self.formulas.get(packet)
        family = self.families.current()
        if packet in MATMULS:
            family = "attention" if family == "attention" else "matmul"
        self.ops.append(OpCount(str(func), OP_FAMILIES.get(packet, family),
                                torch._C._current_autograd_node() is not None,
                                formula(*args, **kwargs, out_val=out) if formula else 0,
                                read, written))
        return out


@contextlib.contextmanager
def cuda_autocast_softmax() -> Iterator[None]:
    """CUDA's autocast returns softmax in fp32 (fp32_set_opt_dtype); CPU's keeps bf16."""
    lib = torch.library.Library("aten", "IMPL")
    skip = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def softmax(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
        with torch._C._ExcludeDispatchKeyGuard(skip):
            return aten.softmax.int(x, dim, torch.float32 if dtype is None else dtype)

    lib.impl("softmax.int", softmax, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def counting() -> Iterator[list[OpCount]]:
    """The OpCounts of the ops run inside (on fake tensors), in order."""
    families = ModuleFamilies()
    counter = TrafficCounter(families)
    with cuda_autocast_softmax(), families, counter:
        yield counter.ops


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """FakeTensorMode, where an interpreted Triton launch is skipped (a fake tensor holds
    no data; compiled kernels launch through wrap_triton's op, whose fake launches nothing)
    and ModelEma's deepcopy gives fresh fake parameters (copying a fake tensor's storage
    would read a pointer that holds no data)."""
    from triton.runtime.interpreter import InterpretedFunction

    def fake_deepcopy(module: nn.Module) -> nn.Module:
        memo = {id(p): nn.Parameter(torch.empty_like(p), p.requires_grad)
                for p in module.parameters()}
        return copy.deepcopy(module, memo)

    with FakeTensorMode(allow_non_fake_inputs=True), \
            mock.patch.object(InterpretedFunction, "run", lambda *_, **__: None), \
            mock.patch.object(ema, "copy", SimpleNamespace(deepcopy=fake_deepcopy)):
        yield


def fake_model(name: str, kernels: KernelChoice, **overrides: Any) -> DeiT:
    """The model, built on the meta device, with fake CPU parameters (call in fake_tensors)."""
    with torch.device("meta"):
        model = create_model(name, kernels=kernels, drop_path_rate=step_bench.DROP_PATH,
                             **overrides)
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = nn.Parameter(torch.empty_like(p, device="cpu"))
    return model


def count_step(model_name: str, kernels: KernelChoice, batch: int) -> list[OpCount]:
    """The ops of the second Trainer.train_step (the first creates the optimizer state);
    a distilled model learns from cached hard-distillation targets, as its recipe does."""
    run = step_bench.Run(torch.device("cpu"), torch.bfloat16, steps=1, warmup=1,
                         distill="hard" if "distilled" in model_name else "none")
    setting = step_bench.Setting("traffic", "ours", kernels, False, 0)
    with fake_tensors(), tempfile.TemporaryDirectory(prefix="deit-fast-traffic-") as run_dir:
        model = fake_model(model_name, kernels)
        trainer, data = step_bench.build_trainer(model, model_name, setting, batch, run, run_dir)
        step = step_bench.advancing_step(trainer, data)
        step()
        with counting() as ops:
            step()
    return ops
