"""Typed run configuration: dataclasses, YAML loading and dotted overrides.

Every key is checked before any work starts: an unknown key, a wrong type or an
impossible value raises ConfigError naming the key and what would be accepted.
The defaults are the DeiT paper's recipe (Touvron et al. 2021, table 9), declared only here:
the augmentation plan is built from them (resolve.plan_params). String keys accept the values
in CHOICES.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deit_fast.data_pipeline.loader import BACKENDS, BAD_IMAGE_POLICIES
from deit_fast.data_pipeline.teacher_cache import CACHE_MODES
from deit_fast.losses import DISTILL_TYPES
from deit_fast.ops import ATTENTION, GELU, LAYERNORM, PRECISION


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range."""


@dataclass
class ModelConfig:
    name: str = "deit_small_patch16_224"
    img_size: int | None = None  # None: the model's own resolution
    num_classes: int | None = None  # None: taken from the dataset
    drop_path: float = 0.1
    init_checkpoint: str | None = None  # weights to start from (fine-tuning)


@dataclass
class KernelsConfig:
    attention: str = "auto"
    layernorm: str = "auto"
    gelu: str = "auto"


@dataclass
class DataConfig:
    path: str | None = None  # ImageFolder root with train/ and val/
    backend: str = "auto"  # auto: DALI's GPU graph on CUDA where DALI is installed, else torch
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    num_workers: int | None = None  # None: min(8, this rank's share of the CPU cores)
    repeats: int = 3  # repeated augmentation
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    on_bad_image: str = "skip"


@dataclass
class OptimConfig:
    lr: float = 5e-4  # for a global batch of 512; scaled linearly
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    scale_lr: bool = True  # lr * global_batch / 512


@dataclass
class DistillConfig:
    type: str = "none"
    alpha: float = 0.5
    tau: float = 1.0
    source: str = "online"
    teacher: str | None = None  # timm model name, or a deit-fast model name
    teacher_checkpoint: str | None = None
    cache_dir: str | None = None  # teacher-logit cache (deit-fast cache-teacher writes it)
    # batches: the teacher on each mixed batch the run trains on (exact, fixes the batch
    # layout); views: on each unmixed view, mixed afterwards (an approximation, any layout)
    cache_mode: str = "batches"
    num_views: int | None = None  # views cache: views held; None: one per showing
    topk: int = 5  # teacher log-probabilities kept per view (1 is enough for hard)
    shard_size: int = 10000  # samples per cache shard
    allow_backend_mismatch: bool = False  # train on a cache of another decoder, with a warning


@dataclass
class TrainConfig:
    epochs: int = 300
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    output_dir: str = "runs/deit"
    ema: bool = True
    ema_decay: float = 0.99996
    log_interval: int = 50
    eval_interval: int = 1  # epochs between evaluations; 0: never (no val/ split needed)
    # steps between last.pt writes inside an epoch (0: epoch ends only); like max_steps and
    # stop_check_interval, it takes effect at the first update end at or after each multiple
    checkpoint_interval: int = 0
    max_steps: int | None = None  # stop (and checkpoint) after this many steps in all
    compile: str = "none"  # torch.compile the model (train and eval)
    compile_fullgraph: bool = False  # torch.compile(fullgraph=True): a graph break is an error
    cuda_graphs: bool = False  # capture the whole step (forward, backward, AdamW, EMA) on CUDA
    accum_steps: int = 1  # micro-batches per optimizer step; lr scales on the effective batch
    peak_tflops: float | None = None  # for MFU; None: the device's known bf16 dense peak
    resume: bool = True  # continue from output_dir/checkpoints/last.pt when present
    progress: bool = True
    max_bad_steps: int = 20  # stop after this many NaN/inf-loss steps in a row (each is skipped)
    # under torchrun, ranks agree on a stop request every this many steps (a host barrier)
    stop_check_interval: int = 20


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The accepted values of each string key; lists a module also checks are imported from it.
CHOICES: dict[str, tuple[str, ...]] = {
    "kernels.attention": ("auto", *ATTENTION),
    "kernels.layernorm": ("auto", *LAYERNORM),
    "kernels.gelu": ("auto", *GELU),
    "data.backend": ("auto", *BACKENDS),
    "data.on_bad_image": BAD_IMAGE_POLICIES,
    "distill.type": DISTILL_TYPES,
    "distill.source": ("online", "cache"),
    "distill.cache_mode": CACHE_MODES,
    "train.precision": tuple(PRECISION),
    "train.device": ("auto", "cpu", "cuda"),
    "train.compile": ("none", "default", "max-autotune"),
}

# (key, lower bound, inclusive?) for numbers that must be positive or non-negative.
BOUNDS: dict[str, tuple[float, bool]] = {
    "model.img_size": (1, True),
    "model.num_classes": (1, True),
    "data.batch_size": (1, True),
    "data.eval_batch_size": (1, True),
    "data.num_workers": (0, True),
    "data.repeats": (1, True),
    "optim.lr": (0, False),
    "optim.min_lr": (0, True),
    "optim.warmup_lr": (0, True),
    "optim.warmup_epochs": (0, True),
    "optim.weight_decay": (0, True),
    "optim.eps": (0, False),
    "optim.clip_grad": (0, False),
    "distill.tau": (0, False),
    "distill.num_views": (1, True),
    "distill.topk": (1, True),
    "distill.shard_size": (1, True),
    "train.epochs": (1, True),
    "train.log_interval": (1, True),
    "train.eval_interval": (0, True),
    "train.checkpoint_interval": (0, True),
    "train.max_steps": (1, True),
    "train.max_bad_steps": (1, True),
    "train.accum_steps": (1, True),
    "train.peak_tflops": (0, False),
    "train.stop_check_interval": (1, True),
}

PROBABILITIES = (
    "model.drop_path", "data.hflip", "data.reprob", "data.mixup_prob", "data.mixup_switch_prob",
    "data.label_smoothing", "data.crop_pct", "distill.alpha", "train.ema_decay",
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and (
        (isinstance(value, (int, float)) and not isinstance(value, bool))
        or (isinstance(value, str) and _looks_numeric(value))  # YAML 1.1 reads 5e-4 as a string
    ):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r}; accepted: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
            continue
        try:
            kwargs[key] = _coerce(dotted, value, tp)
        except ConfigError as err:  # YAML reads `true` as a bool: say what the key takes
            if dotted not in CHOICES:
                raise
            raise ConfigError(f"{err}; accepted: {', '.join(CHOICES[dotted])}") from None
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Raise ConfigError for a value no run could use."""
    from deit_fast.models import MODEL_SPECS, is_known_model

    flat = to_dict(cfg)

    def get(key: str) -> Any:
        section, name = key.split(".")
        return flat[section][name]

    if not is_known_model(cfg.model.name):
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r}; accepted: {', '.join(MODEL_SPECS)}, "
            "or any timm model name (timm.list_models())")
    for key, accepted in CHOICES.items():
        if get(key) not in accepted:
            raise ConfigError(f"{key}: {get(key)!r} is not one of {', '.join(accepted)}")
    for key, (low, inclusive) in BOUNDS.items():
        value = get(key)
        if value is not None and (value < low if inclusive else value <= low):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{key}: must be {relation} {low}, got {value}")
    for key in PROBABILITIES:
        if not 0.0 <= get(key) <= 1.0:
            raise ConfigError(f"{key}: must lie in [0, 1], got {get(key)}")
    for key in ("data.scale", "data.ratio"):
        low, high = get(key)
        if not 0 < low <= high:
            raise ConfigError(f"{key}: expected 0 < min <= max, got {[low, high]}")
    if cfg.data.scale[1] > 1.0:
        raise ConfigError(f"data.scale: the largest crop is the whole image (<= 1), "
                          f"got {list(cfg.data.scale)}")
    if cfg.data.mixup < 0 or cfg.data.cutmix < 0:
        raise ConfigError("data.mixup and data.cutmix: Beta parameters must be >= 0 (0 turns off)")
    if cfg.distill.type != "none" and cfg.distill.source == "cache" and not cfg.distill.cache_dir:
        raise ConfigError("distill.cache_dir: a teacher cache folder is needed when "
                          "distill.source is 'cache' (deit-fast cache-teacher writes it)")
    if cfg.distill.num_views is not None and cfg.distill.cache_mode != "views":
        raise ConfigError("distill.num_views: a batches cache holds every mixed batch of the "
                          "run; a cache of fewer views needs distill.cache_mode=views")
    if cfg.distill.type != "none" and cfg.distill.source == "online" and not cfg.distill.teacher:
        raise ConfigError("distill.teacher: a teacher model name is needed when distill.type is "
                          f"{cfg.distill.type!r}")
    _validate_step(cfg.train)
    return cfg


def _validate_step(t: TrainConfig) -> None:
    """Combinations the training step cannot run."""
    if t.cuda_graphs and t.accum_steps > 1:
        raise ConfigError("train.cuda_graphs: the captured step is one whole update; it does "
                          "not combine with train.accum_steps > 1")
    if t.cuda_graphs and t.device == "cpu":
        raise ConfigError("train.cuda_graphs: needs train.device=cuda (or auto on a GPU)")
    if t.cuda_graphs and t.precision == "fp16":
        raise ConfigError("train.cuda_graphs: fp16's loss scaler is not captured; use "
                          "train.precision=bf16")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=1e-3")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=1e-3")
    return parts, yaml.safe_load(value) if value.strip() else None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package (configs/*.yaml)."""
    from deit_fast import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A YAML file, or the name of a shipped recipe (`deit_small`, `demo`, ...)."""
    from deit_fast import CONFIG_DIR

    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path(".") and (CONFIG_DIR / f"{path.stem}.yaml").is_file() \
            and path.suffix in ("", ".yaml"):
        return CONFIG_DIR / f"{path.stem}.yaml"
    raise ConfigError(f"config file {str(path)!r} does not exist, and it is not a shipped "
                      f"recipe ({', '.join(shipped_recipes())})")


def load_config(path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or the defaults), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        (section, name), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping, got {raw[section]!r}")
        raw[section][name] = value
    return validate(_build(Config, raw, ""))


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
