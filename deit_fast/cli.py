"""Command line: deit-fast train | eval | cache-teacher | demo | data check | bench.

train, eval and cache-teacher take --config FILE and dotted overrides (optim.lr=1e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

from tqdm import tqdm

from deit_fast.config import ConfigError, load_config
from deit_fast.distributed import is_main_process
from deit_fast.models.deit import HEADS

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
                           "used unless an override sets them, and its classes are matched to "
                           "val/'s by name")
            p.add_argument("--ema", action="store_true",
                           help="evaluate the EMA weights of a deit-fast checkpoint")
            p.add_argument("--head", choices=HEADS, default="joint",
                           help="a distilled model's head: the class token's, the "
                                "distillation token's, or their mean (joint, the default)")
    p = sub.add_parser("demo", help="train a small DeiT on scikit-learn's digits, on the CPU")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--ablation", action="store_true",
                   help="the distillation ablation instead (5 seeds x 7 rows, ~45 min on one "
                        "CPU thread; resumable)")
    p.add_argument("--select", action="store_true",
                   help="with --ablation: choose the soft tau on held-out training digits")
    p.add_argument("--table", help="where --ablation writes its markdown table, its JSON beside "
                   "it (default: OUTPUT_DIR/distill_{ablation,selection}.md; --table "
                   "benchmarks/results/distill_ablation.md replaces the committed one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides on the demo recipe")
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="list the files a training run would skip and the "
                                          "problems that stop it")
    p.add_argument("--data-path", required=True,
                   help="dataset root (train/ and val/), or one split folder named train or val")
    p.add_argument("--full-decode", action="store_true", help="decode every image (slow, exact)")
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (arguments pass through)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _run_benchmark(name: str, args: list[str]) -> int:
    from deit_fast import REPOSITORY

    if REPOSITORY is None:
        print(f"deit-fast bench {name}: the benchmarks ship with deit-fast's source checkout, "
              "not with this installed package; in a checkout, run "
              f"`python benchmarks/{BENCHMARKS[name]}` (or `deit-fast bench {name}` after "
              "`pip install -e .` there)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(REPOSITORY / "benchmarks" / BENCHMARKS[name]),
                            *args])


def _check_data(root: str, full_decode: bool) -> int:
    from deit_fast.data_pipeline.check import check_dataset, split_summary

    report = check_dataset(root, full_decode=full_decode)
    for top, counts in report.splits.items():  # stderr: stdout lists only the problems
        print("\n".join(split_summary(top, counts)), file=sys.stderr)
    for path, reason in report.problems:
        print(f"{path}\t{reason}")
    print(f"{len(report.problems)} problem(s) found under {root}: training would stop on "
          f"{report.stopping} and skip {len(report.problems) - report.stopping} file(s)",
          file=sys.stderr)
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _console_warnings()
    try:
        if args.command == "bench":
            return _run_benchmark(args.name, args.args)
        if args.command == "data":
            return _check_data(args.data_path, args.full_decode)
        if args.command == "demo" and args.ablation:
            from deit_fast.ablation import run_ablation

            table = args.table or os.path.join(args.output_dir, "distill_selection.md" if
                                               args.select else "distill_ablation.md")
            summary = run_ablation(args.output_dir, args.overrides, table=table,
                                   select=args.select)
            print(json.dumps(summary, indent=2))
            return 0
        if args.command == "demo":
            from deit_fast.demo import describe, run_demo

            summary = run_demo(args.output_dir, args.overrides)
            print(json.dumps(summary, indent=2))
            print(describe(summary), file=sys.stderr)
            return 0
        if args.command == "eval":
            from deit_fast.checkpoint_eval import evaluate_checkpoint

            print(json.dumps(evaluate_checkpoint(args.config, args.overrides, args.checkpoint,
                                                 args.ema, args.head), indent=2))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from deit_fast.run import train

            summary = train(cfg)
            if is_main_process():
                print(json.dumps(summary, indent=2))
        else:
            from deit_fast.cache_teacher import cache_teacher

            where = cfg.distill.cache_dir
            print(f"teacher cache complete: {where}" if cache_teacher(cfg) else
                  f"this rank's shards of the teacher cache are written to {where}; the cache "
                  "is complete once every rank's are")
        return 0
    except (ConfigError, OSError, ValueError, RuntimeError) as err:
        print(f"deit-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (train): stopped at once, no checkpoint
        kept = RESUMES.get(args.command, "nothing was kept")
        print(f"deit-fast {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130


# What an interrupted command keeps, and how it goes on.
RESUMES = {
    "train": "a run resumes from its last checkpoint when the same command is run again",
    "cache-teacher": "the shards already written are kept: run the same command again to "
                     "finish the cache",
    "demo": "run the same command again (the demo starts afresh; --ablation resumes, "
            "skipping the runs it finished)",
}


def _console_warnings() -> None:
    """Warnings on a line of their own, above any progress bar, without a source line; under
    torchrun from rank 0 alone (the other ranks meet the same ones)."""
    if not is_main_process():
        warnings.simplefilter("ignore")
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        tqdm.write(f"deit-fast: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
