"""Compile check: every Triton kernel of kernels/ built for sm_90 and sm_80, with no GPU.

Runs the ops of kernels/ (and a DeiT-Ti/S/B block under autocast) on CPU tensors while
recording every kernel launch instead of running it, so the argument types, the
divisibility-by-16 specialisation, the tile heuristics and the autotune lists are exactly
what the code would launch. Each recorded (kernel, config) is then compiled by
`triton.compile` for each target, through the ptxas that ships in the triton wheel, down to
a cubin. Reported per compile: status (and the first line of an error), registers per
thread, spill bytes, shared memory against the arch's limit, whether the dots run on tensor
cores (wgmma/HGMMA on sm_90, mma/HMMA on sm_80, from the PTX and the SASS), compile time.

    python benchmarks/compile.py [--arch 90 80] [--quick] [--out DIR] [--jobs N]
    (or: deit-fast bench compile)

--quick is the CI subset: sm_90, bf16 and bf16 autocast, DeiT shapes. The run fails
(exit 1) when a compile fails, spills, needs more shared memory than the arch has, or runs
a bf16/fp16 dot off the tensor cores. Writes compile_<archs>[_quick].md and .csv to --out
and prints the table last. Compiles run in worker processes with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository, not benchmarks/

from benchmarks.run_info import add_out_argument, run_meta, wrote  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block
TENSOR_CORE_SASS = {90: "HGMMA", 80: "HMMA"}
TENSOR_CORE_PTX = {90: "wgmma.mma_async", 80: "mma.sync"}
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (32, 64, 128)
WIDTHS = (96, 192, 384, 768, 1024)
DEIT = {"DeiT-Ti": (192, 3), "DeiT-S": (384, 6), "DeiT-B": (768, 12)}  # width, heads
BATCH = 16  # a multiple of 16, as a training batch: rows = BATCH * N specialise as one
TOKENS = 197


@dataclass
class Job:
    """One kernel, one config, one target: what `triton.compile` is given."""

    arch: int
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[str] = field(default_factory=list)


@dataclass
class Result:
    arch: int
    kernel: str
    dtypes: str
    config: str
    case: str
    status: str = "ok"
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    tensor_cores: str = "-"
    seconds: float = 0.0
    problems: str = ""


# ---------------------------------------------------------------- enumeration (worker)

def _cases(quick: bool):
    """(label, run) pairs; each run calls ops of kernels/ forward and backward on CPU tensors."""
    import torch

    from deit_fast import kernels

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

    def attention(dtype, head_dim, heads):
        qkv = torch.empty(BATCH, TOKENS, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
        kernels.attention(qkv, heads).sum().backward()

    def layer_norm(dtype, batch, width, residual, y_only):
        x = torch.empty(batch, TOKENS, width, dtype=dtype, requires_grad=True)
        w, b = (torch.ones(width, dtype=dtype, requires_grad=True) for _ in range(2))
        res = torch.empty_like(x, requires_grad=True) if residual else None
        y, s = kernels.layer_norm(x, w, b, 1e-6, res)
        (y.sum() + (0 if y_only else s.sum())).backward()

    def bias_gelu(dtype, batch, width):
        x = torch.empty(batch, TOKENS, width, dtype=dtype, requires_grad=True)
        b = torch.empty(width, dtype=dtype, requires_grad=True)
        kernels.bias_gelu(x, b).sum().backward()

    def deit_block(width, heads, autocast_dtype):
        from deit_fast.models.deit import DeiT
        from deit_fast.ops import KernelChoice

        # One block has every launch of a deep model: norm1 with and without a pending
        # branch, norm2, attention, bias+GELU, and the final norm whose s is unused. The
        # 4x4 patch grid keeps the CPU work small; N does not change the specialisation.
        model = DeiT(img_size=64, embed_dim=width, depth=1, num_heads=heads, num_classes=10)
        model.set_kernels(KernelChoice("triton", "triton", "triton"))
        with torch.autocast("cpu", dtype=autocast_dtype):
            logits = model(torch.randn(BATCH, 3, 64, 64))
        logits.float().sum().backward()

    deit_widths = [width for width, _ in DEIT.values()]
    widths = deit_widths if quick else WIDTHS
    gelu_widths = sorted({4 * w for w in deit_widths} | set(() if quick else WIDTHS))
    batches = (BATCH,) if quick else (BATCH, 1)  # 1: rows = 197, not a multiple of 16
    for name in ("bf16",) if quick else DTYPES:
        dtype = names[name]
        attention_shapes = ([(64, heads) for _, heads in DEIT.values()] if quick
                            else [(head_dim, 6) for head_dim in HEAD_DIMS])
        for head_dim, heads in attention_shapes:
            yield f"{name} D={head_dim} H={heads}", partial(attention, dtype, head_dim, heads)
        for batch in batches:
            for width in widths:
                yield f"{name} B={batch} C={width}", partial(layer_norm, dtype, batch, width,
                                                              False, False)
                yield f"{name} B={batch} C={width} +residual", partial(
                    layer_norm, dtype, batch, width, True, False)
                yield f"{name} B={batch} C={width} +residual, s unused", partial(
                    layer_norm, dtype, batch, width, True, True)
            for width in gelu_widths:
                yield f"{name} B={batch} C={width}", partial(bias_gelu, dtype, batch, width)
    for name in ("bf16",) if quick else ("bf16", "fp16"):
        for model, (width, heads) in DEIT.items():
            yield f"{model} autocast {name}", partial(deit_block, width, heads, names[name])


@contextlib.contextmanager
def _recorded_launches(launches: list):
    """Kernel launches append (JITFunction, args, kwargs, autotune configs) and run nothing."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, [None]))

    def autotuner_run(self, *args, grid=None, warmup=False, **kwargs):
        launches.append((self.fn, args, kwargs, list(self.configs)))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _launchable_kernels() -> set[tuple[str, str]]:
    """(module, name) of every @triton.jit `*_kernel` of kernels/ (the rest are helpers)."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    from deit_fast import kernels

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"deit_fast.kernels.{info.name}")
        found |= {(module.__name__, name) for name, value in vars(module).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return found


def enumerate_jobs(archs: list[int], quick: bool) -> tuple[list[Job], list[str]]:
    """Every distinct (arch, kernel, specialisation, config) the cases launch, and the
    kernels no case launches."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    torch.manual_seed(0)
    jobs: dict[tuple, Job] = {}
    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    for label, run in _cases(quick):
        launches: list = []
        with _recorded_launches(launches):
            run()
        for fn, args, kwargs, configs in launches:
            for config in configs:
                kw = dict(kwargs, **(config.all_kwargs() if config is not None else {}))
                for arch, backend in backends.items():
                    # The binder a launch uses: dtypes, divisibility by 16, constants.
                    binder = create_function_from_signature(fn.signature, fn.params, backend)
                    bound, spec, options = binder(*args, **kw)
                    options, signature, constexprs, attrs = fn._pack_args(
                        backend, kw, bound, spec, options)
                    key = (arch, fn.module, fn.__name__, repr(signature), repr(constexprs),
                           repr(attrs), repr(options))
                    job = jobs.setdefault(key, Job(arch, fn.module, fn.__name__, signature,
                                                   constexprs, attrs, dict(options.__dict__)))
                    if label not in job.cases:
                        job.cases.append(label)
    launched = {(job.module, job.name) for job in jobs.values()}
    return list(jobs.values()), sorted(name for _, name in _launchable_kernels() - launched)


# ---------------------------------------------------------------- compile (worker)

def _first_error_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error" in line]
    return f"{type(err).__name__}: {(named or lines or [''])[-1]}"[:200]


def _describe(job: Job) -> tuple[str, str, str]:
    """(kernel, pointer dtypes, config) labels."""
    kernel = job.name.strip("_").removesuffix("_kernel")
    dtypes = []
    for ty in job.signature.values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] not in dtypes:
            dtypes.append(ty[1:])
    names = list(job.signature)
    parts = []
    for (index,), value in job.constexprs.items():
        name = names[index]
        if name == "HEAD_DIM":
            parts.append(f"D{value}")
        elif name.startswith("BLOCK_"):
            parts.append(f"{name.removeprefix('BLOCK_')}{value}")
        elif value is True:  # a HAS_X switch that is on
            parts.append(f"+{name.removeprefix('HAS_').lower()}")
    parts += [f"w{job.options['num_warps']}", f"s{job.options['num_stages']}"]
    return kernel, "+".join(dtypes), " ".join(parts)


def _sass(cubin: bytes) -> str:
    """cuobjdump -sass from the triton wheel, its stderr kept out of the report."""
    import subprocess

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name],
                              capture_output=True, text=True, check=True)
    return done.stdout


def compile_job(job: Job) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, dtypes, config = _describe(job)
    result = Result(job.arch, kernel, dtypes, config, job.cases[0]
                    + (f" (+{len(job.cases) - 1})" if len(job.cases) > 1 else ""))
    fn = getattr(importlib.import_module(job.module), job.name)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed on stdout
    knobs.compilation.always_compile = True  # a cache hit would have no report and no time
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, job.signature, job.constexprs, job.attrs),
                target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as err:  # any compiler error is a result to report, not a crash
        result.seconds = time.perf_counter() - start
        result.status, result.error = "error", _first_error_line(err)
        result.problems = "does not compile"
        return result
    result.seconds = time.perf_counter() - start
    report = log.getvalue()
    result.registers = int(re.search(r"Used (\d+) registers", report).group(1))
    result.spill_bytes = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
    result.shared_bytes = compiled.metadata.shared
    problems = []
    if result.spill_bytes:
        problems.append(f"spills {result.spill_bytes} B")
    if result.shared_bytes > SHARED_LIMIT[job.arch]:
        problems.append(f"shared {result.shared_bytes} B > {SHARED_LIMIT[job.arch]} B")
    if "tt.dot" in compiled.asm["ttir"]:
        sass, ptx = _sass(compiled.asm["cubin"]), compiled.asm["ptx"]
        units = [unit for unit, sass_op, ptx_op in (("wgmma", "HGMMA", "wgmma.mma_async"),
                                                    ("mma", "HMMA", "mma.sync"))
                 if re.search(rf"\b{sass_op}\b", sass) and ptx_op in ptx]
        result.tensor_cores = "+".join(units) or "none (FMA)"
        half = any(f"*{t}" in job.signature.values() for t in ("fp16", "bf16"))
        wanted = "wgmma" if job.arch == 90 else "mma"
        if half and units != [wanted]:
            problems.append(f"dots on {result.tensor_cores}, not {wanted} alone")
    if problems:
        result.status, result.problems = "fail", "; ".join(problems)
    return result


# ---------------------------------------------------------------- report (parent)

COLUMNS = ("arch", "kernel", "dtypes", "config", "case", "status", "registers", "spill_bytes",
           "shared_kib", "tensor_cores", "seconds", "problems")


def _row(r: Result) -> dict:
    row = asdict(r)
    row["arch"] = f"sm_{r.arch}"
    row["shared_kib"] = f"{r.shared_bytes / 1024:.1f}/{SHARED_LIMIT[r.arch] // 1024}"
    row["seconds"] = f"{r.seconds:.2f}"
    row["problems"] = r.error or r.problems
    return {c: row[c] for c in COLUMNS}


def _summary(results: list[Result], jobs: list[Job]) -> list[str]:
    lines = ["| arch | kernel | compiles | ok | fail | error | max regs | max spill B | "
             "max shared KiB | compile s (sum / mean) |", "|" + "---|" * 10]
    groups = defaultdict(list)
    for r in results:
        groups[(r.arch, r.kernel)].append(r)
    for (arch, kernel), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        count = {s: sum(r.status == s for r in rs) for s in ("ok", "fail", "error")}
        total = sum(r.seconds for r in rs)
        lines.append(f"| sm_{arch} | {kernel} | {len(rs)} | {count['ok']} | {count['fail']} | "
                     f"{count['error']} | {max(r.registers for r in rs)} | "
                     f"{max(r.spill_bytes for r in rs)} | "
                     f"{max(r.shared_bytes for r in rs) / 1024:.1f} | "
                     f"{total:.1f} / {total / len(rs):.2f} |")
    # What the first training step compiles before it runs: every config of every launch.
    lines += ["", "Start-up: kernels the first training step of a model compiles (one process, "
              "in sequence, before autotuning runs them):", ""]
    for job_case in sorted({c for j in jobs for c in j.cases if "autocast" in c}):
        for arch in sorted({j.arch for j in jobs}, reverse=True):
            used = [r for j, r in zip(jobs, results) if j.arch == arch and job_case in j.cases]
            lines.append(f"- sm_{arch}, {job_case}: {len(used)} kernels, "
                         f"{sum(r.seconds for r in used):.1f} s")
    return lines


def _markdown(results: list[Result], jobs: list[Job], meta: dict) -> str:
    subset = ", quick subset (bf16 and bf16 autocast, DeiT shapes)" if meta["quick"] else ""
    head = [f"# Compile check: {', '.join(f'sm_{a}' for a in meta['archs'])}{subset}", "",
            f"triton {meta['triton']} (ptxas {meta['ptxas']}), torch {meta['torch']}, "
            f"{meta['date']}, {meta['cpus']}", "", f"`{meta['command']}`", "",
            "## Summary", ""]
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(str(v).replace("|", "/") for v in _row(r).values()) + " |"
              for r in results]
    return "\n".join(head + _summary(results, jobs) + ["", "## Every compile", ""] + table) + "\n"


def _print_table(results: list[Result]) -> None:
    widths = {c: max(len(c), *(len(str(_row(r)[c])) for r in results)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for r in results:
        print("  ".join(str(v).ljust(widths[c]) for c, v in _row(r).items()).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT),
                        help="compute capabilities (default 90 80; 90 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="CI subset: bf16 and bf16 autocast at the DeiT shapes")
    add_out_argument(parser, "the markdown table and the CSV")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes")
    args = parser.parse_args(argv)
    archs = args.arch or ([90] if args.quick else [90, 80])

    # Workers start fresh (spawn) without the interpreter, compiling into an empty cache
    # so that every compile is timed in full.
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.TemporaryDirectory(prefix="triton-compile-check-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pythonpath = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), pythonpath) if p)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with cache, ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        jobs, unlaunched = pool.submit(enumerate_jobs, archs, args.quick).result()
        jobs.sort(key=lambda j: (-j.arch, j.name, j.cases[0]))
        results = []
        for result in pool.map(compile_job, jobs):
            results.append(result)
            print(f"[{len(results)}/{len(jobs)}] sm_{result.arch} {result.kernel} {result.config}"
                  f" {result.status} {result.seconds:.1f} s", file=sys.stderr, flush=True)
        results += [Result(archs[0], name.strip("_").removesuffix("_kernel"), "-", "-", "-",
                           "error", "no case of benchmarks/compile.py launches it")
                    for name in unlaunched]
        meta = pool.submit(_versions).result()

    meta = {**run_meta("none", "compile.py", argv), **meta, "archs": archs, "quick": args.quick,
            "cpus": f"{args.jobs} compile processes, {time.perf_counter() - start:.0f} s wall"}
    stem = "compile_" + "_".join(f"sm{a}" for a in archs) + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(_markdown(results, jobs, meta))
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_row(r) for r in results)
    print("\n".join(_summary(results, jobs)) + "\n")
    _print_table(results)
    bad = [r for r in results if r.status != "ok"]
    print(f"\n{len(results)} compiles, {len(bad)} failing; "
          f"{wrote(args.out, [f'{stem}.md', f'{stem}.csv'])}", file=sys.stderr)
    return 1 if bad else 0


def _versions() -> dict:
    from triton.backends.nvidia.compiler import get_ptxas_version

    version = re.search(r"release ([\d.]+)", get_ptxas_version(90))
    return {"ptxas": version.group(1) if version else "?"}


if __name__ == "__main__":
    sys.exit(main())
