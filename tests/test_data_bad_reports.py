"""Unreadable files are reported by the reader that met them, with its reason; the main
process records what it is told and reads no image itself."""

import builtins
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deit_fast.data_pipeline import (
    AugmentationPlan,
    BadImageError,
    DatasetIndex,
    build_train_loader,
    build_val_loader,
)
from deit_fast.data_pipeline.dataset import read_rgb
from deit_fast.data_pipeline.plan import replacement_sample
from deit_fast.data_pipeline.torch_loader import TrainViews
from tests.helpers import recipe_plan, train_loading, val_loading

SIZE = 32
BAD = ("text.jpg", "truncated.jpg")  # the header parse refuses both


@pytest.fixture(params=["torch", "dali"])
def backend(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


def write_tree(root, split="train", undecodable=False):
    """Two classes of 6 readable JPEGs, the BAD files in the first; with undecodable, a PNG
    whose header parses and whose body does not decode, in the second."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    for name in ("a", "b"):
        (root / split / name).mkdir(parents=True)
        for i in range(6):
            rgb.rotate(40 * i).save(root / split / name / f"{i}.jpg")
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG")
    (root / split / "a" / "truncated.jpg").write_bytes(buffer.getvalue()[:400])
    (root / split / "a" / "text.jpg").write_text("not an image")
    if undecodable:
        buffer = io.BytesIO()
        rgb.save(buffer, "PNG")
        png = bytearray(buffer.getvalue())
        start = png.find(b"IDAT") + 20
        png[start : start + 40] = bytes(40)
        (root / split / "b" / "body.png").write_bytes(bytes(png))
    return DatasetIndex.from_folder(str(root), split)


def reader_reason(backend, path):
    """The message the backend's own reader raises for `path`."""
    if backend == "dali":
        from deit_fast.data_pipeline.dali_source import read_probe

        read = lambda p: read_probe(p, frozenset())
    else:
        read = read_rgb
    with pytest.raises(BadImageError) as error:
        read(path)
    return str(error.value)


def worker_batch(backend, index, plan, rows):
    """(samples shown, skipped (path, reason) pairs) as a worker hands back the batch of
    (view, requested sample) rows."""
    if backend == "torch":
        out = TrainViews(index, plan, "skip").__getitems__([(v, s, 0, v, s) for v, s in rows])
        return out["samples"].tolist(), out["skipped"]
    from nvidia.dali import types

    from deit_fast.data_pipeline.dali_source import TrainSource, decode_reports, reported_skips
    from deit_fast.data_pipeline.train_loader import ListedKeys

    source = TrainSource(index, plan, ListedKeys([np.array(rows)]), "skip", frozenset())
    out = dict(zip(source.outputs, source(types.BatchInfo(0, 0))))
    report = torch.from_numpy(np.stack(out["report"]))
    return [int(s) for s in out["samples"]], reported_skips(decode_reports(report))


def test_a_worker_reports_the_file_it_skipped_with_its_readers_reason(tmp_path, backend):
    index = write_tree(tmp_path)
    plan = AugmentationPlan(recipe_plan(image_size=SIZE, rand_augment=None), seed=5)
    n, bad = len(index), index.paths.index(str(tmp_path / "train/a/text.jpg"))
    readable = [i for i, p in enumerate(index.paths) if not p.endswith(BAD)]
    # a view whose first replacement of the bad sample is readable: one file skipped
    view = next(v for v in range(50) if replacement_sample(5, v, bad, 0, n) in readable)
    rows = [(view, readable[0]), (view, bad), (view, readable[1])]
    shown, skipped = worker_batch(backend, index, plan, rows)
    assert shown == [readable[0], replacement_sample(5, view, bad, 0, n), readable[1]]
    assert skipped == [(index.paths[bad], reader_reason(backend, index.paths[bad]))]


def main_process_reads(monkeypatch, root) -> list[str]:
    """The files under root this process opens from now on; its forked workers' opens are
    their own (PIL and the DALI source open files with builtins.open)."""
    opened, main, real_open = [], os.getpid(), builtins.open

    def watched(file, *args, **kwargs):
        if os.getpid() == main and str(file).startswith(str(root)):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched)
    return opened


def test_the_main_process_records_reports_and_reads_no_image(tmp_path, backend, monkeypatch):
    train, val = write_tree(tmp_path), write_tree(tmp_path, "val")
    bad = [p for p in train.paths + val.paths if p.endswith(BAD)]
    reasons = sorted(f"skipped unreadable image (data.on_bad_image=skip): "
                     f"{reader_reason(backend, path)}" for path in bad)
    opened = main_process_reads(monkeypatch, tmp_path)
    params = recipe_plan(image_size=SIZE, rand_augment=None)
    loader = build_train_loader(index=train, params=params, **train_loading(
        batch_size=4, num_workers=1, backend=backend))
    validation = build_val_loader(val, **val_loading(
        image_size=SIZE, batch_size=4, num_workers=1, backend=backend))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(6):  # two cycles of R = 3: every file is met, most more than once
            list(loader.epoch(epoch))
        list(validation)
    messages = sorted(str(w.message) for w in caught if "unreadable" in str(w.message))
    assert sorted(loader.bad_files | validation.bad_files) == sorted(bad)
    assert loader.bad_images == validation.bad_images == 2
    assert messages == reasons and opened == []


def test_the_error_policy_raises_the_workers_error(tmp_path, backend, monkeypatch):
    index = write_tree(tmp_path, "val")
    first_bad = next(p for p in index.paths if p.endswith(BAD))  # validation reads in order
    reason = reader_reason(backend, first_bad)
    opened = main_process_reads(monkeypatch, tmp_path)
    val = build_val_loader(index, **val_loading(
        image_size=SIZE, batch_size=4, num_workers=1, backend=backend, on_bad_image="error"))
    with pytest.raises(BadImageError) as error:
        list(val)
    assert str(error.value) == reason and opened == []


def test_dali_decodes_the_failing_batch_alone_to_name_an_undecodable_file(tmp_path,
                                                                          monkeypatch):
    """DALI raises a decode error with the batch asked for: only that batch's files, as its
    source handed them to DALI, are decoded again; the files the source skipped keep the
    reason it gave."""
    pytest.importorskip("nvidia.dali")
    from deit_fast.data_pipeline import dali

    decoded = []
    monkeypatch.setattr(dali, "read_rgb", lambda path: decoded.append(path) or read_rgb(path))
    body = str(tmp_path / "val/b/body.png")
    index = write_tree(tmp_path, "val", undecodable=True)
    val = build_val_loader(index, **val_loading(
        image_size=SIZE, batch_size=len(index), num_workers=1,
        backend="dali"))  # one batch: the BAD files beside body.png
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (labels,) = [y for _, y in val]
    assert len(labels) == len(index) - 3 and sorted(decoded) == sorted(
        p for p in index.paths if not p.endswith(BAD))
    reasons = {str(w.message).split("skip): ")[1] for w in caught if "unreadable" in str(w.message)}
    assert reasons == {f"cannot decode image {body}: DALI failed to decode it",
                       *(reader_reason("dali", str(tmp_path / "val/a" / n)) for n in BAD)}

    index = write_tree(tmp_path / "train_run", undecodable=True)
    decoded.clear()
    params = recipe_plan(image_size=SIZE, rand_augment=None)
    loader = build_train_loader(index, params, **train_loading(
        batch_size=3, num_workers=1, backend="dali"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(6):  # body.png fails a batch that has batches after it
            list(loader.epoch(epoch))
    assert str(tmp_path / "train_run/train/b/body.png") in decoded and len(decoded) == 3
