"""A run on a dataset with unreadable and unusual images: skipped and counted, or named."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from deit_fast.data_pipeline import BadImageError, DatasetIndex, RepeatedAugSampler
from deit_fast.data_pipeline.plan import replacement_sample
from deit_fast.run import train
from tests.helpers import tiny_config, write_tiny_imagefolder


def add_awkward_files(root):
    folder = root / "train" / "class_0"
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 36, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.save(folder / "image.png")
    rgb.resize((12, 9)).save(folder / "smaller_than_crop.jpg")
    (folder / "corrupt.jpg").write_bytes(rng.bytes(2000))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image, and not listed")


def unreadable_met(cfg, index: DatasetIndex, unreadable: set[int]) -> set[int]:
    """The unreadable files a run meets: each unreadable sample the sampler shows, and each
    unreadable replacement tried for it (plan.replacement_sample's chain)."""
    sampler = RepeatedAugSampler(len(index), cfg.data.batch_size, cfg.data.repeats,
                                 seed=cfg.train.seed)
    met = set()
    for epoch in range(cfg.train.epochs):
        first = sampler.start_item()
        for step in range(sampler.steps_per_epoch):
            samples, repeats = sampler.batch_at(epoch, first + step * sampler.items_per_step)
            views = sampler.views(epoch, repeats, None)
            for sample, view in zip(samples.tolist(), views.tolist()):
                shown, attempt = sample, 0
                while shown in unreadable:
                    met.add(shown)
                    shown = replacement_sample(cfg.train.seed, view, sample, attempt, len(index))
                    attempt += 1
    return met


def test_bad_images_are_skipped_and_counted(tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    add_awkward_files(tmp_path / "data")
    out = tmp_path / "run"
    # 36 files, batch 6, 2 repeats: the 2 epochs are one cycle that shows each file twice
    cfg = tiny_config(tmp_path / "data", out, "train.epochs=2", "train.log_interval=1",
                      "data.batch_size=6")
    index = DatasetIndex.from_folder(str(tmp_path / "data"), "train")
    folder = tmp_path / "data" / "train" / "class_0"
    unreadable = {index.paths.index(str(folder / name))
                  for name in ("corrupt.jpg", "truncated.jpg")}
    assert unreadable_met(cfg, index, unreadable) == unreadable  # the run meets both
    with pytest.warns(UserWarning, match=r"(corrupt|truncated)\.jpg"):
        summary = train(cfg)
    assert summary["bad_images"] == len(unreadable)  # distinct files, each met twice
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))


def test_bad_image_policy_error_names_the_file(tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    add_awkward_files(tmp_path / "data")
    with pytest.raises(BadImageError, match=r"(corrupt|truncated)\.jpg"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", "data.on_bad_image=error"))


def test_empty_class_folder_is_named(tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    (tmp_path / "data" / "train" / "class_9").mkdir()
    with pytest.raises(ValueError, match="class folder has no images: .*class_9"):
        train(tiny_config(tmp_path / "data", tmp_path / "run"))
