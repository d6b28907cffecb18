"""Command line: deit-fast train | eval | cache-teacher | demo | data check | bench.

train, eval and cache-teacher take --config FILE and dotted overrides (optim.lr=1e-3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from deit_fast.config import ConfigError, load_config

# `deit-fast bench NAME` runs benchmarks/SCRIPT
BENCHMARKS = {"kernels": "kernel_bench.py", "step": "step.py", "data": "data.py",
              "distill": "distill.py", "compile": "compile.py", "traffic": "traffic.py"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deit-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a DeiT (resumes from output_dir when it can)"),
                       ("eval", "evaluate a checkpoint on data.path/val"),
                       ("cache-teacher", "write the teacher's top-k for every view the planned "
                                         "run shows to distill.cache_dir (resumes)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML recipe, e.g. configs/deit_small.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
        if name == "eval":
            p.add_argument("--checkpoint", required=True, help="deit-fast, timm or DeiT weights; "
                           "a deit-fast checkpoint's own model, image size and precision are "
                           "used unless set here")
            p.add_argument("--ema", action="store_true",
                           help="evaluate the EMA weights of a deit-fast checkpoint")
    p = sub.add_parser("demo", help="train a small DeiT on scikit-learn's digits, on the CPU")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--ablation", action="store_true",
                   help="the distillation ablation instead (3 seeds x 4 recipes, ~20 min)")
    p.add_argument("--table", default="benchmarks/results/distill_ablation.md",
                   help="where --ablation writes its markdown table")
    p.add_argument("overrides", nargs="*", help="dotted overrides on the demo recipe")
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="list the files a training run would skip and the "
                                          "problems that stop it")
    p.add_argument("--data-path", required=True, help="dataset root (train/ and val/) or a split")
    p.add_argument("--full-decode", action="store_true", help="decode every image (slow, exact)")
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (arguments pass through)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _run_benchmark(name: str, args: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[name]
    if not script.is_file():
        print(f"deit-fast bench {name}: {script} is missing; benchmarks ship with a source "
              "checkout (pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args])


def _check_data(root: str, full_decode: bool) -> int:
    from deit_fast.data_pipeline import check_dataset
    from deit_fast.data_pipeline.check import STOPS_TRAINING

    problems = check_dataset(root, full_decode=full_decode)
    for path, reason in problems:
        print(f"{path}\t{reason}")
    stopping = sum(reason.startswith(STOPS_TRAINING) for _, reason in problems)
    print(f"{len(problems)} problem(s) found under {root}: training would stop on "
          f"{stopping} and skip {len(problems) - stopping} file(s)", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _run_benchmark(args.name, args.args)
        if args.command == "data":
            return _check_data(args.data_path, args.full_decode)
        if args.command == "demo" and args.ablation:
            from deit_fast.ablation import run_ablation

            summary = run_ablation(args.output_dir, args.overrides, table=args.table)
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "demo":
            from deit_fast.demo import run_demo

            summary = run_demo(args.output_dir, args.overrides)
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "eval":
            from deit_fast.run import evaluate_checkpoint

            print(json.dumps(evaluate_checkpoint(args.config, args.overrides, args.checkpoint,
                                                 args.ema), indent=2))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from deit_fast.distributed import is_main_process
            from deit_fast.run import train

            summary = train(cfg)
            if is_main_process():
                print(json.dumps(summary, indent=2))
        else:
            from deit_fast.cache_teacher import cache_teacher

            print(f"teacher cache written to {cache_teacher(cfg)}")
        return 0
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        print(f"deit-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint
        print(f"deit-fast {args.command}: interrupted; a run resumes from its last checkpoint "
              "when the same command is run again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
