"""Where the loaders' CPU time goes: each stage of the DALI CPU graph and of the torch
fallback's PIL path, in CPU ms per image, on the same files and the same plan.

    python benchmarks/data_stages.py                 # 512 generated 500x375 JPEGs
    python benchmarks/data_stages.py --data-path /data/imagenet --batches 20 [--out DIR]

DALI rows run graph prefixes (ROI decode; + cubic resize; + flip and normalize; + each
the full train graph) through `pipe.run` on `--threads` threads; a stage's cost is the
difference between prefixes. Each RandAugment op runs alone on every image of a batch of
the same 224x224 crops, less the cost of the identity. PIL rows run the fallback's steps
image by image on one thread. CPU time counts every thread and worker process (Linux
/proc), so the two compare whatever the thread count; the least of `--rounds` rounds is
reported, as a busy machine only ever adds time. Writes data_stages.csv to --out and
prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.data import cpu_seconds, make_imagenet_like, report  # noqa: E402
from benchmarks.run_info import add_out_argument  # noqa: E402
from deit_fast.config import Config  # noqa: E402
from deit_fast.data_pipeline import DatasetIndex, PlanParams  # noqa: E402
from deit_fast.data_pipeline.dataset import probe_image  # noqa: E402
from deit_fast.data_pipeline.pil_augment import apply_rand_augment_op  # noqa: E402
from deit_fast.data_pipeline.plan import RA_OPS, AugmentationPlan  # noqa: E402
from deit_fast.data_pipeline.sampler import RepeatedAugSampler  # noqa: E402
from deit_fast.data_pipeline.torch_loader import TrainViews, normalize  # noqa: E402
from deit_fast.data_pipeline.train_loader import SamplerKeys  # noqa: E402
from deit_fast.resolve import plan_params  # noqa: E402

# one mid-strength parameter per op (magnitude 9 of 10, as the recipe's rand-m9)
OP_PARAMS = {"rotate": 27.0, "posterize": 5.0, "solarize": 64.0, "solarize_add": 99.0,
             "color": 1.9, "contrast": 1.9, "brightness": 1.9, "sharpness": 1.9,
             "shear_x": 0.27, "shear_y": 0.27, "translate_x": 0.41, "translate_y": 0.41}


def least_cpu_ms(run, images: int, rounds: int, clock=cpu_seconds) -> float:
    """CPU ms per image of run() (which handles `images` images), least over rounds."""
    run()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        run()
        best = min(best, clock() - start)
    return 1000 * best / images


class Inputs:
    """The files of `count` samples, their plan crops, decoded and resized with PIL."""

    def __init__(self, index: DatasetIndex, params: PlanParams, count: int) -> None:
        self.paths = [index.paths[i % len(index)] for i in range(count)]
        self.plan, self.count = AugmentationPlan(params, 0), count
        self.encoded = [open(p, "rb").read() for p in self.paths]
        sizes = [probe_image(e, p) for e, p in zip(self.encoded, self.paths)]
        self.heights, self.widths = zip(*sizes)
        self.crops = self.draw().crop
        self.decoded = [Image.open(io.BytesIO(e)).convert("RGB") for e in self.encoded]
        self.resized = [self.resize(i) for i in range(count)]

    def draw(self):
        samples = np.arange(self.count)
        return self.plan.draw(np.zeros(self.count, np.int64), samples, self.heights, self.widths)

    def resize(self, i: int) -> Image.Image:
        size = self.plan.params.image_size
        crop = [int(v) for v in self.crops[i]]
        return F.resized_crop(self.decoded[i], *crop, [size, size], InterpolationMode.BICUBIC)


def dali_stages(index, inputs: Inputs, args) -> dict[str, float]:
    """CPU ms per image of each stage of the DALI CPU graph."""
    from nvidia.dali import fn, pipeline_def, types

    from deit_fast.data_pipeline import dali
    from deit_fast.data_pipeline.dali_augment import dali_params, rand_augment_ops

    params = inputs.plan.params
    sampler = RepeatedAugSampler(len(index), args.batch_size, repeats=3, seed=0)
    keys = SamplerKeys(sampler, 0, 0, None)
    source = dali.TrainSource(index, inputs.plan, keys, "skip", frozenset())
    size, ra = params.image_size, params.rand_augment_config
    kw = {"batch_size": args.batch_size, "num_threads": args.threads, "device_id": None,
          "py_num_workers": 1, "py_start_method": "fork"}
    crops = [np.asarray(img) for img in inputs.resized[: args.batch_size]]

    @pipeline_def(enable_conditionals=True)
    def prefix(stage: str):
        x = dali.train_inputs(source)
        if stage == "source":
            return x["encoded"]
        out = dali.decode_crop(x, on_gpu=False)
        if stage == "decode":
            return out
        out = dali.resize_square(out, size)
        if stage == "normalize":
            out = dali._normalize(fn.flip(out, horizontal=x["flip"]), params.mean, params.std)
        return out

    @pipeline_def(enable_conditionals=True)
    def one_op(op: int):  # every image gets RA_OPS[op] with its OP_PARAMS value
        images = fn.external_source(lambda: crops, batch=True, layout="HWC")
        param = dali_params(np.array([op]), np.array([OP_PARAMS.get(RA_OPS[op], 0.0)]))
        return rand_augment_ops(size, params.fill)[op](images, types.Constant(np.float32(param[0])))

    def cost(pipe) -> float:
        pipe.build()

        def batch():
            try:
                pipe.run()
            except StopIteration:  # the end of the sampler's epoch: on to the next
                pipe.reset()
                pipe.run()

        run = lambda: [batch() for _ in range(args.batches)]
        return least_cpu_ms(run, args.batches * args.batch_size, args.rounds)

    total = {name: cost(prefix(name, **kw)) for name in ("source", "decode", "resize", "normalize")}
    stages = {
        "source: read, header, plan": total["source"],
        "decode the crop": total["decode"] - total["source"],
        "resize to 224, bicubic": total["resize"] - total["decode"],
        "flip, normalize": total["normalize"] - total["resize"],
    }
    identity = cost(one_op(0, **kw))
    for op, name in enumerate(RA_OPS[1:], start=1):
        stages[f"RandAugment {name}"] = cost(one_op(op, **kw)) - identity
    full = dali.train_graph(source, size, ra.num_layers, params.fill, params.mean, params.std,
                            on_gpu=False, **kw)
    stages["whole pipeline"] = cost(full)
    return stages


def pil_stages(index, inputs: Inputs, args) -> dict[str, float]:
    """CPU ms per image of the fallback's steps, each alone, on one thread."""
    params, count = inputs.plan.params, inputs.count

    def read_and_plan():
        for path in inputs.paths:
            with open(path, "rb") as f:
                f.read()
        inputs.draw()

    def each(step):
        return lambda: [step(i) for i in range(count)]

    steps = {
        "source: read, header, plan": read_and_plan,
        "decode the crop": each(lambda i: Image.open(io.BytesIO(inputs.encoded[i])).convert("RGB")),
        "resize to 224, bicubic": each(inputs.resize),
        "flip, normalize": each(lambda i: normalize(F.pil_to_tensor(F.hflip(inputs.resized[i])),
                                                    params.mean, params.std)),
    }
    for op, name in enumerate(RA_OPS[1:], start=1):
        param = OP_PARAMS.get(name, 0.0)
        steps[f"RandAugment {name}"] = each(
            lambda i, op=op, param=param: apply_rand_augment_op(
                inputs.resized[i % args.batch_size], op, param, params.fill
            )
        )
    views = TrainViews(index, inputs.plan, "skip", finish_in_worker=True)
    keys = [(0, i % len(index), 0, 0, i % len(index)) for i in range(count)]
    steps["whole pipeline"] = lambda: views.__getitems__(keys)
    return {
        name: least_cpu_ms(run, count, args.rounds, clock=time.process_time)
        for name, run in steps.items()
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", help="an ImageFolder root (with train/); default: generate")
    parser.add_argument("--images", type=int, default=512, help="JPEGs to generate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI threads")
    parser.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1")
    add_out_argument(parser, "the CSV")
    args = parser.parse_args(argv)

    params = dataclasses.replace(plan_params(Config()), rand_augment=args.rand_augment)
    torch.set_num_threads(1)  # as in DataLoader workers: idle OpenMP threads spin and bill CPU
    warnings.filterwarnings("ignore", message="The external source node")  # prefixes use few
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_path or scratch
        if not args.data_path:
            make_imagenet_like(root, args.images)
        index = DatasetIndex.from_folder(root, "train")
        inputs = Inputs(index, params, args.batches * args.batch_size)
        pil, dali = pil_stages(index, inputs, args), dali_stages(index, inputs, args)
    for side in (pil, dali):  # the recipe: 2 layers at p 0.5, one op of 15 per image on average
        ops = [side[n] for n in side if n.startswith("RandAugment")]
        fixed = [side[n] for n in list(side)[:4]]
        side["sum: stages + one average op"] = sum(fixed) + sum(ops) / len(ops)
    rows = [
        {"stage": name, "pil_ms": round(pil[name], 2), "dali_cpu_ms": round(dali[name], 2),
         "dali/pil": round(dali[name] / pil[name], 2) if pil[name] >= 0.05 else "-"}
        for name in pil
    ]
    report(rows, args.out, "data_stages.csv", ", CPU ms per image")
    return rows


if __name__ == "__main__":
    main()
