"""Everything between image files on disk and a training batch on the device.

This folder is data_pipeline/ at the top of the repository; it imports as
deit_fast.data_pipeline (deit_fast/__init__.py adds the repository to that package's path
in a checkout; the wheel installs it as deit_fast/data_pipeline).

DatasetIndex -> RepeatedAugSampler (which (sample, repeat) pairs, per rank and step) ->
AugmentationPlan (every random decision of a view, keyed by (seed, view, sample)) ->
a loader backend (DALI or torch) that applies the plan -> Mixup on the device.

loader.py picks the backend. What both share (the keys, the replacement of unreadable
files and their report) is train_loader.py, and what they yield is batch.TrainBatch;
a backend adds only its decode-and-augment graph: torch_loader.py (PIL in torch workers)
or dali.py with dali_source.py (DALI's graph, fed by Python workers).
"""

from .batch import TrainBatch
from .check import check_dataset
from .dataset import BadImageError, DatasetIndex
from .loader import build_train_loader, build_val_loader
from .mixup import Mixup
from .plan import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugmentationPlan,
    PlanParams,
    ViewDecisions,
)
from .sampler import RepeatedAugSampler

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "AugmentationPlan",
    "BadImageError",
    "DatasetIndex",
    "Mixup",
    "PlanParams",
    "RepeatedAugSampler",
    "TrainBatch",
    "ViewDecisions",
    "build_train_loader",
    "build_val_loader",
    "check_dataset",
]
