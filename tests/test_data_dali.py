"""The DALI graph on the CPU (device_id=None) against the torch fallback, op by op and batch."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402
from nvidia.dali.auto_aug.core import select  # noqa: E402

from deit_fast.data_pipeline import (  # noqa: E402
    BadImageError,
    DatasetIndex,
    PlanParams,
    build_train_loader,
    build_val_loader,
)
from deit_fast.data_pipeline.dali_augment import dali_params, rand_augment_ops  # noqa: E402
from deit_fast.data_pipeline.pil_augment import apply_rand_augment_op  # noqa: E402
from deit_fast.data_pipeline.plan import RA_OPS  # noqa: E402
from tests.helpers import recipe_plan, train_loading, val_loading  # noqa: E402

SIZE = 64
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def psnr(a: torch.Tensor, b: torch.Tensor, params: PlanParams) -> torch.Tensor:
    """PSNR per image in 0-255 pixel units (images are normalized)."""
    std = torch.tensor(params.std).view(1, 3, 1, 1) * 255
    mse = (((a - b) * std) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255**2 / mse.clamp_min(1e-10))


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_photos")
    for i, name in enumerate(PHOTOS):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(getattr(photos, name)())
        for k, side in enumerate((240, 150)):  # two sizes: crops from large and small images
            copy = img.copy()
            copy.thumbnail((side, side))
            copy.save(folder / f"{name}{k}.jpg", quality=90)
    return root


def _epoch(index, params, backend, epoch=0, **kw):
    loader = build_train_loader(index, params, **train_loading(
        batch_size=4, num_workers=1, backend=backend))
    return list(loader.epoch(epoch, **kw))


@pytest.mark.parametrize("reprob", [0.0, 1.0])
def test_dali_cpu_and_torch_agree_on_geometry(photo_tree, reprob):
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE, rand_augment=None, reprob=reprob)
    ours, theirs = _epoch(index, params, "dali", epoch=1), _epoch(index, params, "torch", epoch=1)
    assert len(ours) == len(theirs) == 3
    for d, t in zip(ours, theirs):
        for key in ("labels", "samples", "repeats", "views"):
            assert torch.equal(getattr(d, key), getattr(t, key)), key
        assert d.images.shape == t.images.shape == (4, 3, SIZE, SIZE)
        assert (psnr(d.images, t.images, params) >= 30).all()


def test_dali_rand_augment_ops_match_pil():
    img = Image.fromarray(photos.astronaut()).resize((96, 96), Image.Resampling.BICUBIC)
    chosen = {
        "rotate": 20,
        "posterize": 2,
        "solarize": 128,
        "solarize_add": 80,
        "color": 1.6,
        "contrast": 0.5,
        "brightness": 1.5,
        "sharpness": 1.8,
        "shear_x": 0.2,
        "shear_y": -0.2,
        "translate_x": 0.3,
        "translate_y": -0.3,
    }
    ops = np.arange(len(RA_OPS), dtype=np.int32)
    params = np.array([chosen.get(name, 0.0) for name in RA_OPS], np.float32)
    fill = (124, 116, 104)

    @pipeline_def(enable_conditionals=True)
    def graph():
        images = fn.external_source(lambda: [np.asarray(img)] * len(ops), layout="HWC", batch=True)
        op = fn.external_source(lambda: list(ops), batch=True)
        param = fn.external_source(lambda: list(dali_params(ops, params)), batch=True)
        return select(rand_augment_ops(96, fill), op, images, param=param)

    pipe = graph(batch_size=len(ops), num_threads=1, device_id=None)
    pipe.build()
    out = pipe.run()[0]
    for i, name in enumerate(RA_OPS):
        ours = np.asarray(out[i], np.float64)
        ref = np.asarray(apply_rand_augment_op(img, i, float(params[i]), fill), np.float64)
        db = 10 * np.log10(255**2 / max(((ours - ref) ** 2).mean(), 1e-10))
        # DALI's equalize follows OpenCV's lookup table, PIL's differs slightly; DALI's
        # warps are bilinear only (warp_affine and rotate refuse cubic), where the torch
        # backend resamples bicubically as timm does: 31.4-35.8 dB here (38-45 dB against
        # a bilinear PIL)
        assert db >= {"equalize": 20, **dict.fromkeys(GEOMETRIC, 30)}.get(name, 35), name


def test_dali_rand_augment_and_resume(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE)
    loader = build_train_loader(index, params, **train_loading(
        batch_size=4, num_workers=1, backend="dali"))
    first = list(loader.epoch(0))
    second = list(loader.epoch(1))  # the running pipeline continues into the next epoch
    resumed = list(loader.epoch(1, start_step=1))  # a fresh pipeline from mid-epoch
    assert len(first) == len(second) == loader.steps_per_epoch == 3 and len(resumed) == 2
    for a, b in zip(second[1:], resumed):
        assert torch.equal(a.samples, b.samples)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    torch_second = _epoch(index, params, "torch", epoch=1)
    for d, t in zip(second, torch_second):
        assert torch.equal(d.samples, t.samples) and torch.isfinite(d.images).all()
        assert psnr(d.images, t.images, params).median() > 20  # same ops, other kernels


@pytest.fixture()
def bad_tree(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(6):
            rgb.rotate(40 * i).save(tmp_path / "train" / name / f"{i}.jpg")
    folder = tmp_path / "train" / "a"
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("P").save(folder / "palette.png")
    rgb.resize((9, 7)).save(folder / "tiny.jpg")
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.jpg").write_text("not an image")
    buffer = io.BytesIO()
    rgb.save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    start = png.find(b"IDAT") + 20
    png[start : start + 40] = bytes(40)  # the header parses, the body does not decode
    (tmp_path / "train" / "b" / "body.png").write_bytes(bytes(png))
    return tmp_path


def test_dali_replaces_bad_files_like_torch(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    params = recipe_plan(image_size=32, rand_augment=None)
    shown, counts = {}, {}
    for backend in ("dali", "torch"):
        loader = build_train_loader(index, params, **train_loading(
            batch_size=6, num_workers=1, backend=backend))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # two cycles of R = 3 epochs: an epoch holds 18 of the 19 files, so one cycle
            # may leave a bad file unshown (and unreplaced)
            batches = [b for e in range(6) for b in loader.epoch(e)]
        names = " ".join(str(w.message) for w in caught)
        assert all(n in names for n in ("truncated.jpg", "text.jpg", "body.png")), backend
        shown[backend] = torch.cat([b.samples for b in batches])
        counts[backend] = loader.bad_images
    assert torch.equal(shown["dali"], shown["torch"]) and counts["dali"] == counts["torch"] > 0
    odd = {
        i
        for i, p in enumerate(index.paths)
        if p.endswith(("cmyk.jpg", "gray.jpg", ".png", "tiny.jpg"))
    }
    assert odd - {index.paths.index(str(bad_tree / "train/b/body.png"))} <= set(
        shown["dali"].tolist()
    )


def test_dali_error_policy_names_the_file(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    loader = build_train_loader(index, recipe_plan(image_size=32), **train_loading(
        batch_size=6, num_workers=1, backend="dali", on_bad_image="error"))
    with pytest.raises(
        Exception, match=r"cannot decode image .*(truncated\.jpg|text\.jpg|body\.png)"
    ):
        [b for epoch in range(3) for b in loader.epoch(epoch)]  # a cycle shows every file
    (bad_tree / "train/a/truncated.jpg").unlink()
    (bad_tree / "train/a/text.jpg").unlink()  # left: body.png, which only the decoder rejects
    index = DatasetIndex.from_folder(str(bad_tree))
    loader = build_train_loader(index, recipe_plan(image_size=32), **train_loading(
        batch_size=5, num_workers=1, backend="dali", on_bad_image="error"))
    with pytest.raises(BadImageError, match=r"cannot decode image .*body\.png: DALI's decoder"):
        [b for epoch in range(3) for b in loader.epoch(epoch)]


def test_dali_val_matches_torch_and_drops_bad_files(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    images, labels = {}, {}
    for backend in ("dali", "torch"):
        collected = []
        for rank in range(2):
            val = build_val_loader(index, **val_loading(
                image_size=32, batch_size=4, num_workers=1, backend=backend, rank=rank,
                world_size=2))
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                collected += list(val)
        images[backend] = torch.cat([x for x, _ in collected])
        labels[backend] = torch.cat([y for _, y in collected])
    assert torch.equal(labels["dali"], labels["torch"]) and len(labels["dali"]) == len(index) - 3
    assert (psnr(images["dali"], images["torch"], recipe_plan()) >= 30).all()
