from pathlib import Path

import pytest
import yaml

from deit_fast.config import CHOICES, Config, ConfigError, load_config, save_config, to_dict
from deit_fast.data_pipeline import PlanParams
from deit_fast.data_pipeline.loader import BACKENDS, BAD_IMAGE_POLICIES
from deit_fast.demo import demo_config
from deit_fast.losses import DISTILL_TYPES, DistillationLoss
from deit_fast.ops import ATTENTION, GELU, LAYERNORM, KernelChoice
from deit_fast.resolve import plan_params
from tests.helpers import ROOT

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (5e-4, 0.05, 5)
    assert (cfg.train.epochs, cfg.train.ema_decay, cfg.model.drop_path) == (300, 0.99996, 0.1)
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.repeats) == (0.8, 1.0,
                                                                                     0.25, 3)
    assert cfg.data.label_smoothing == 0.1
    assert cfg.data.rand_augment == "rand-m9-mstd0.5-inc1"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.model.name


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "deit_small.yaml",
                      ["optim.lr=1e-3", "data.batch_size=64", "train.ema=false",
                       "data.scale=[0.2,1]", "optim.clip_grad=1"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64 and cfg.train.ema is False
    assert cfg.data.scale == (0.2, 1.0) and cfg.optim.clip_grad == 1.0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", r"unknown key 'optim.lrr'.*accepted: lr, min_lr"),
    ("optimizer.lr=1e-3", r"unknown key 'optimizer'.*accepted: model, kernels"),
    ("optim.lr=-1e-3", r"optim.lr: must be > 0"),
    ("optim.lr=nan", r"optim.lr: expected a finite number"),
    ("optim.lr=fast", r"optim.lr: expected float, got str"),
    ("data.batch_size=0", r"data.batch_size: must be >= 1, got 0"),
    ("data.batch_size=12.5", r"data.batch_size: expected int"),
    ("train.ema=yes please", r"train.ema: expected bool"),
    ("model.name=deit_huge", r"model.name: unknown model 'deit_huge'; accepted: deit_tiny"),
    ("kernels.attention=flash", r"kernels.attention: 'flash' is not one of auto, triton"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of bf16, fp16, fp32"),
    ("data.hflip=1.5", r"data.hflip: must lie in \[0, 1\]"),
    ("data.scale=[0.5]", r"data.scale: expected a list of 2 numbers"),
    ("data.scale=[0.9,0.1]", r"data.scale: expected 0 < min <= max"),
    ("distill.type=hard", r"distill.teacher: a teacher model name is needed"),
    ("optim.lr", r"expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_choice_lists_are_the_checking_modules_own():
    assert CHOICES["data.backend"] == ("auto", *BACKENDS)  # auto: resolve.data_backend
    assert CHOICES["data.on_bad_image"] is BAD_IMAGE_POLICIES
    assert CHOICES["distill.type"] is DISTILL_TYPES
    for op, impls in (("attention", ATTENTION), ("layernorm", LAYERNORM), ("gelu", GELU)):
        assert CHOICES[f"kernels.{op}"] == ("auto", *impls)
        for impl in impls:  # what the config accepts, the kernel choice takes
            assert getattr(KernelChoice(**{op: impl}), op) == impl
    for kind in DISTILL_TYPES:
        assert DistillationLoss(kind).kind == kind


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_listed_choice_loads_and_nothing_else(key):
    section, name = key.split(".")
    for value in CHOICES[key]:  # distill.type other than none needs a teacher name
        cfg = load_config(None, [f"{key}={value}", "distill.teacher=t"])
        assert getattr(getattr(cfg, section), name) == value
    with pytest.raises(ConfigError, match=f"{key}: 'nope' is not one of "
                                          f"{', '.join(CHOICES[key])}"):
        load_config(None, [f"{key}=nope"])


def test_plan_takes_the_recipe_from_the_config():
    d = Config().data
    p = plan_params(Config())
    assert (p.scale, p.ratio, p.hflip, p.rand_augment, p.reprob) == (
        d.scale, d.ratio, d.hflip, d.rand_augment, d.reprob)
    p = plan_params(load_config(None, ["data.hflip=0.2", "data.rand_augment=",
                                       "model.img_size=64"]))
    assert (p.hflip, p.rand_augment, p.image_size) == (0.2, None, 64)
    with pytest.raises(TypeError, match="missing"):  # no recipe defaults of its own
        PlanParams()


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  name: deit_tiny_patch16_224\n  depth: 7\n")
    with pytest.raises(ConfigError, match="unknown key 'model.depth'"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "deit_tiny_distilled.yaml", ["optim.lr=3e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_demo_yaml_is_the_built_in_recipe(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml",
                      [f"data.path={tmp_path / 'digits'}", f"train.output_dir={tmp_path / 'run'}"])
    assert cfg == demo_config(tmp_path)


def test_a_shipped_recipe_loads_by_name_and_an_unknown_name_lists_them():
    assert load_config("deit_small") == load_config(ROOT / "configs" / "deit_small.yaml")
    with pytest.raises(ConfigError, match=r"'deit_smal' does not exist, and it is not a shipped "
                                          r"recipe \(.*deit_small, deit_small_distilled"):
        load_config("deit_smal")


def test_mixup_takes_the_recipe_from_the_config_alone():
    import inspect

    from deit_fast.data_pipeline import Mixup
    from deit_fast.resolve import build_mixup

    own = {k: p.default for k, p in inspect.signature(Mixup).parameters.items()}
    assert all(v is inspect.Parameter.empty for k, v in own.items() if k != "seed")
    d = Config().data
    m = build_mixup(d, 7, seed=3)
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.label_smoothing) == \
        (d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob, d.label_smoothing)
    assert (m.num_classes, m.seed) == (7, 3)
