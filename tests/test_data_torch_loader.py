"""The torch fallback loader: determinism, resume, the plan applied, bad input, validation."""

import gc
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from skimage import data as photos
from torchvision.transforms import InterpolationMode

from deit_fast.data_pipeline import (
    AugmentationPlan,
    BadImageError,
    DatasetIndex,
    build_train_loader,
    build_val_loader,
)
from deit_fast.data_pipeline.dataset import read_rgb
from deit_fast.data_pipeline.loader import view_batches
from deit_fast.data_pipeline.torch_loader import TrainViews, erase, finish
from tests.helpers import recipe_plan, train_loading, val_loading

SIZE = 48
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """Six scikit-image photographs, downscaled, two per class, plus small random JPEGs."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, name in enumerate(PHOTOS):
        folder = root / "train" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(getattr(photos, name)())
        img.thumbnail((160, 160))
        img.save(folder / f"{name}.jpg", quality=90)
        for k in range(3):
            h, w = rng.integers(30, 90, 2)
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"noise{k}.jpg", quality=90)
    return root


def _collect(loader, epoch, **kw):
    return list(loader.epoch(epoch, **kw))


def _by_key(batches):
    return {
        (int(s), int(k)): img for b in batches for s, k, img in zip(b.samples, b.repeats, b.images)
    }


def test_same_images_for_any_workers_and_batch_size(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE)
    a = _collect(build_train_loader(index, params, **train_loading(
        batch_size=4, num_workers=0)), epoch=2)
    b = _collect(build_train_loader(index, params, **train_loading(
        batch_size=2, num_workers=2)), epoch=2)
    ka, kb = _by_key(a), _by_key(b)
    assert set(ka) <= set(kb) and len(ka) == 4 * len(a)
    for key, img in ka.items():
        torch.testing.assert_close(img, kb[key], rtol=0, atol=0)
    assert a[0].images.shape == (4, 3, SIZE, SIZE) and a[0].images.dtype == torch.float32
    assert a[0].labels.dtype == torch.int64
    np.testing.assert_array_equal(a[0].labels, index.labels[a[0].samples.numpy()])
    # epoch 2 lies in the first cycle of R = 3 epochs: its views are 0 * 3 + repeat
    np.testing.assert_array_equal(a[0].views, a[0].repeats.numpy())


def test_resume_mid_epoch_is_exact(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    loader = build_train_loader(index, recipe_plan(image_size=SIZE), **train_loading(
        batch_size=3, num_workers=0))
    full = _collect(loader, epoch=1)
    resumed = _collect(loader, epoch=1, start_step=2)
    assert len(full) == loader.steps_per_epoch and len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)
        assert torch.equal(x.samples, y.samples) and torch.equal(x.repeats, y.repeats)


def test_images_follow_the_plan(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE, rand_augment=None, reprob=1.0)
    batch = _collect(build_train_loader(index, params, **train_loading(
        batch_size=4, num_workers=0)), epoch=0)[0]
    plan = AugmentationPlan(params, seed=0)
    mean = torch.tensor(params.mean).view(3, 1, 1)
    std = torch.tensor(params.std).view(3, 1, 1)
    for img, sample, view in zip(batch.images, batch.samples.tolist(), batch.views.tolist()):
        src = Image.open(index.paths[sample]).convert("RGB")
        d = plan.draw([view], [sample], src.height, src.width)
        top, left, h, w = d.crop[0].tolist()
        ref = F.resized_crop(src, top, left, h, w, [SIZE, SIZE], InterpolationMode.BICUBIC)
        if d.flip[0]:
            ref = F.hflip(ref)
        ref = (F.pil_to_tensor(ref) / 255 - mean) / std
        et, el, eh, ew = d.erase[0].tolist()
        assert eh > 0  # reprob=1: every image has a box
        ref[:, et : et + eh, el : el + ew] = torch.from_numpy(
            plan.erase_noise(view, sample, eh, ew)
        )
        torch.testing.assert_close(img, ref, rtol=0, atol=1e-5)


def test_rand_augment_changes_images_deterministically(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    on = recipe_plan(image_size=SIZE, rand_augment="rand-m9-mstd0.5-inc1-p1", reprob=0)
    off = recipe_plan(image_size=SIZE, rand_augment=None, reprob=0)
    a = _collect(build_train_loader(index, on, **train_loading(
        batch_size=4, num_workers=0)), epoch=0)[0]
    b = _collect(build_train_loader(index, off, **train_loading(
        batch_size=4, num_workers=0)), epoch=0)[0]
    again = _collect(build_train_loader(index, on, **train_loading(
        batch_size=4, num_workers=0)), epoch=0)[0]
    assert torch.equal(a.images, again.images)
    assert all((x - y).abs().mean() > 0.01 for x, y in zip(a.images, b.images))


@pytest.fixture()
def bad_tree(tmp_path):
    """Good, odd-but-readable and unreadable files in one class folder, a second clean class."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    rgb.save(folder / "good.jpg", quality=90)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.resize((9, 7)).save(folder / "tiny.jpg")
    buffer = io.BytesIO()
    rgb.resize((300, 200)).save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "text.jpg").write_text("not an image")
    other = tmp_path / "train" / "b"
    other.mkdir()
    for i in range(9):
        rgb.rotate(40 * i).save(other / f"{i}.jpg")
    return tmp_path


BAD = ("truncated.jpg", "corrupt.jpg", "text.jpg")


def test_bad_files_are_replaced_counted_and_named(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    bad_ids = {i for i, p in enumerate(index.paths) if p.endswith(BAD)}
    loader = build_train_loader(index, recipe_plan(image_size=SIZE), **train_loading(
        batch_size=6, num_workers=0))
    with pytest.warns(UserWarning) as caught:
        batches = _collect(loader, epoch=0) + _collect(loader, epoch=1) + _collect(loader, epoch=2)
    shown = {int(s) for b in batches for s in b.samples}
    assert not shown & bad_ids  # replaced by readable samples
    assert loader.bad_images == len(caught) == 3  # distinct files, whatever views met them
    named = " ".join(str(w.message) for w in caught)
    assert all(name in named for name in BAD)
    assert all(torch.isfinite(b.images).all() for b in batches)
    for b in batches:  # labels follow the sample actually shown
        np.testing.assert_array_equal(b.labels, index.labels[b.samples.numpy()])
    odd = {
        i
        for i, p in enumerate(index.paths)
        if p.endswith(("cmyk.jpg", "gray.jpg", "png", "tiny.jpg"))
    }
    assert odd <= shown  # CMYK, grayscale, palette/alpha PNG and tiny images all load


def test_bad_file_with_error_policy_raises_naming_it(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    loader = build_train_loader(index, recipe_plan(image_size=SIZE), **train_loading(
        batch_size=18, num_workers=0, on_bad_image="error"))
    with pytest.raises(
        BadImageError, match=r"cannot decode image .*/a/(truncated|corrupt|text)\.jpg"
    ):
        for epoch in range(3):  # a cycle of the 3 repeats shows every file
            _collect(loader, epoch=epoch)


def test_each_replaced_file_is_warned_once_with_its_reason(bad_tree):
    """The workers hand back each skipped file with the reason their reader raised; the main
    process warns once per file with it."""
    index = DatasetIndex.from_folder(str(bad_tree))
    loader = build_train_loader(index, recipe_plan(image_size=SIZE), **train_loading(
        batch_size=6, num_workers=1))
    with pytest.warns(UserWarning) as caught:
        for epoch in range(3):
            _collect(loader, epoch=epoch)
    reasons = []
    for path in sorted(loader.bad_files):
        with pytest.raises(BadImageError) as error:
            read_rgb(path)
        reasons.append(f"skipped unreadable image (data.on_bad_image=skip): {error.value}")
    assert sorted(str(w.message) for w in caught) == reasons and len(reasons) == len(BAD)


def test_view_batches_render_listed_views_as_training_does(bad_tree):
    """The teacher-cache pass: listed (view, sample) rows rendered as TrainViews renders them,
    replacements warned about; with on_bad_image=error the bad file is named."""
    index = DatasetIndex.from_folder(str(bad_tree))
    plan = AugmentationPlan(recipe_plan(image_size=SIZE, reprob=0.5), seed=3)
    rows = np.array([(view, sample) for view in (2, 5) for sample in range(len(index))])
    batches = [rows[:7], rows[7:]]
    with pytest.warns(UserWarning, match=r"(truncated|corrupt|text)\.jpg"):
        rendered = list(view_batches(index, plan, batches, backend="torch", num_workers=1,
                                     on_bad_image="skip"))
    expected = TrainViews(index, plan, "skip", finish_in_worker=True).__getitems__(
        [(int(v), int(s), 0, int(v), int(s)) for v, s in rows]
    )["images"]
    assert torch.equal(torch.cat(rendered), expected)
    with pytest.raises(BadImageError, match=r"cannot decode image .*/a/(truncated|corrupt|text)"):
        list(view_batches(index, plan, batches, backend="torch", num_workers=0,
                          on_bad_image="error"))


def test_unknown_backend_or_policy_is_refused(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    with pytest.raises(ValueError, match=r"data backend 'tf': accepted \('torch', 'dali'\)"):
        build_train_loader(index, recipe_plan(), **train_loading(batch_size=2, backend="tf"))
    with pytest.raises(ValueError, match="on_bad_image 'ignore'"):
        build_train_loader(index, recipe_plan(), **train_loading(
            batch_size=2, on_bad_image="ignore"))


def test_val_every_sample_once_over_ranks(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    seen = []
    for rank in range(4):  # 24 samples, batch 5: ranks get 6 each, batches 5 + 1
        val = build_val_loader(index, **val_loading(
            image_size=SIZE, batch_size=5, num_workers=rank % 2, rank=rank, world_size=4))
        for images, labels in val:
            assert images.shape[1:] == (3, SIZE, SIZE)
            seen.extend(labels.tolist())
    assert sorted(seen) == sorted(index.labels.tolist())


def test_val_matches_resize_and_centre_crop(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    images, _ = next(iter(build_val_loader(index, **val_loading(
        image_size=SIZE, batch_size=2, num_workers=0))))
    src = Image.open(index.paths[0]).convert("RGB")
    ref = F.center_crop(F.resize(src, int(SIZE / 0.875), InterpolationMode.BICUBIC), SIZE)
    ref = F.normalize(F.to_tensor(ref), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(images[0], ref, rtol=0, atol=1e-5)


def test_val_drops_bad_files(bad_tree):
    index = DatasetIndex.from_folder(str(bad_tree))
    val = build_val_loader(index, **val_loading(image_size=SIZE, batch_size=4, num_workers=0))
    with pytest.warns(UserWarning) as caught:
        labels = [y for _, ys in val for y in ys.tolist()]
    assert len(labels) == len(index) - 3 and val.bad_images == len(caught) == 3
    assert all(name in " ".join(str(w.message) for w in caught) for name in BAD)


@pytest.mark.parametrize("batch", [1, 5])
def test_erase_fills_each_box_with_its_own_noise(batch):
    """Against slicing each box by hand: boxes at the edges, 1x1, the whole image, and
    samples without a box (height 0)."""
    rng = np.random.default_rng()
    height, width = 13, 11
    images = torch.randn(batch, 3, height, width)
    choices = [(0, 0, height, width), (12, 10, 1, 1), (0, 0, 0, 0), (3, 0, 5, 11), (0, 4, 13, 2)]
    boxes = torch.tensor([choices[k] for k in rng.permutation(len(choices))[:batch]])
    noise = [torch.randn(3, h, w) for _, _, h, w in boxes.tolist()]
    expected = images.clone()
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected[i, :, top : top + h, left : left + w] = noise[i]
    flat = torch.cat([n.reshape(-1) for n in noise])
    assert torch.equal(erase(images, boxes.tolist(), flat), expected)


def test_worker_and_main_process_finish_alike(photo_tree):
    """A GPU run normalizes and erases in the main process, a CPU run in the workers: the
    same images either way (here both on the CPU)."""
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    plan = AugmentationPlan(params, seed=int(np.random.default_rng().integers(1000)))
    keys = [(view, sample, 0, view, sample) for view in (0, 1) for sample in range(len(index))]
    raw = TrainViews(index, plan, "skip").__getitems__(keys)
    done = TrainViews(index, plan, "skip", finish_in_worker=True).__getitems__(keys)
    assert raw["images"].dtype == torch.uint8 and 0 < raw["erase_boxes"][:, 2].count_nonzero()
    finished = finish(raw, torch.device("cpu"), params.mean, params.std)
    assert torch.equal(finished, done["images"])
    assert torch.equal(finish(done, torch.device("cpu"), params.mean, params.std), finished)


@pytest.mark.gpu
def test_finish_on_the_gpu_matches_the_cpu(photo_tree):
    """The GPU path: pinned uint8 batch, non-blocking copies, normalize and erase on the GPU."""
    index = DatasetIndex.from_folder(str(photo_tree))
    params = recipe_plan(image_size=SIZE, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    plan = AugmentationPlan(params, seed=int(np.random.default_rng().integers(1000)))
    raw = TrainViews(index, plan, "skip").__getitems__(
        [(1, s, 0, 1, s) for s in range(len(index))])
    pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in raw.items()}
    on_gpu = finish(pinned, torch.device("cuda"), params.mean, params.std)
    on_cpu = finish(raw, torch.device("cpu"), params.mean, params.std)
    assert on_gpu.device.type == "cuda" and raw["erase_noise"].numel() > 0
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_only_what_the_step_reads_is_copied_to_the_gpu(photo_tree):
    index = DatasetIndex.from_folder(str(photo_tree))
    loader = build_train_loader(index, recipe_plan(image_size=SIZE), **train_loading(
        batch_size=4, num_workers=1, device=torch.device("cuda")))
    batch = next(loader.epoch(0))
    assert batch.images.is_cuda and batch.labels.is_cuda
    assert not any(t.is_cuda for t in (batch.samples, batch.repeats, batch.views))


class _Collected:
    """Garbage in a reference cycle; its destructor records the pid that collected it."""

    def __init__(self, marker):
        self.marker, self.cycle = marker, self

    def __del__(self):
        with open(self.marker, "a") as f:
            f.write(f"{os.getpid()}\n")


class _CollectingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        gc.collect()  # as an allocation in a worker may trigger it
        return os.getpid()


def test_forked_workers_never_collect_what_they_inherit(tmp_path):
    """A DALI pipeline left as garbage would hang a worker that ran its destructor."""
    from deit_fast.data_pipeline.workers import iterate

    marker = tmp_path / "collected"
    gc.disable()
    try:
        _Collected(marker)  # unreachable at once, collectable only by gc
        loader = torch.utils.data.DataLoader(_CollectingDataset(), num_workers=1,
                                             multiprocessing_context="fork")
        workers = {int(pid) for pid in iterate(loader)}
    finally:
        gc.enable()
    gc.collect()
    collected_by = {int(pid) for pid in marker.read_text().split()}
    assert collected_by == {os.getpid()} and not workers & collected_by


def test_a_process_exits_with_its_loader_workers_still_running(tmp_path):
    """Workers ignore SIGTERM, which Python's exit hook sends them: exit must not hang."""
    code = (
        "import torch; from deit_fast.data_pipeline.workers import ignore_stop_signals, iterate;"
        "loader = torch.utils.data.DataLoader(list(range(8)), num_workers=1, "
        "persistent_workers=True, worker_init_fn=ignore_stop_signals);"
        "batches = iterate(loader); print(next(batches).tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[0]", done.stderr[-2000:]
