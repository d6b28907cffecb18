"""Trains with a fault injected at a chosen step: `python -m tests.fault_driver --send SIG --at N`.

Signals this process as step N starts (on one rank), or inside the N-th checkpoint write,
between the temporary file and its rename. tests/test_faults.py and tests/test_distributed.py
launch it (the latter through torchrun); signals from outside the process go to the real
`python -m deit_fast train` instead.
"""

import argparse
import json
import os
import signal
from pathlib import Path

import torch

from deit_fast.config import load_config
from deit_fast.data_pipeline import files
from deit_fast.run import train
from tests.helpers import seeded_eval


def main(argv: list[str] | None = None) -> None:
    from deit_fast import train as train_module

    parser = argparse.ArgumentParser()
    parser.add_argument("--send", default="SIGKILL")
    parser.add_argument("--at", type=int, required=True)
    parser.add_argument("--during-write", action="store_true")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--eval-first", help="evaluate a seeded model on data.path/val first, "
                                             "writing the result here (JSON, from rank 0)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sig = getattr(signal, args.send)
    cfg = load_config(None, args.overrides)
    if args.eval_first:
        from deit_fast import distributed

        dist = distributed.setup(torch.device("cpu"))  # train() joins this group
        result = seeded_eval(Path(cfg.data.path), dist.rank, dist.world_size)
        if dist.is_main:
            Path(args.eval_first).write_text(json.dumps(result))
    if int(os.environ.get("RANK", "0")) == args.rank:
        if args.during_write:
            replace, writes = os.replace, [0]

            def killing_replace(src, dst):
                writes[0] += 1
                if writes[0] == args.at:
                    os.kill(os.getpid(), sig)
                replace(src, dst)

            files.os.replace = killing_replace
        else:
            step = train_module.Trainer.train_step

            def signalling_step(self, batch):
                if self.global_step == args.at:
                    os.kill(os.getpid(), sig)
                return step(self, batch)

            train_module.Trainer.train_step = signalling_step
    print(json.dumps(train(cfg)))


if __name__ == "__main__":
    main()
