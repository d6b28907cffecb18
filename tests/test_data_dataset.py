"""Dataset index, fingerprint, and `check_dataset` on every kind of bad input."""

import hashlib
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from deit_fast.data_pipeline import BadImageError, DatasetIndex, check_dataset
from deit_fast.data_pipeline.dataset import class_difference, jpeg_size, probe_image


def _jpeg(path, size=(40, 30), mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)


def _tree(root, counts):
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                _jpeg(folder / f"{i}.jpg", seed=i)


def test_folder_index_sorted_classes_labels_and_fingerprint(tmp_path):
    _tree(tmp_path, {"train": [3, 2, 4]})
    (tmp_path / "train" / "c1" / "notes.txt").write_text("not an image")
    index = DatasetIndex.from_folder(str(tmp_path), "train")
    assert index.classes == ["c0", "c1", "c2"] and len(index) == 9
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert all(os.path.isfile(p) for p in index.paths)
    fingerprint = index.fingerprint
    assert DatasetIndex.from_folder(str(tmp_path), "train").fingerprint == fingerprint
    shutil.copytree(tmp_path / "train", tmp_path / "moved" / "train")  # relative paths count
    assert DatasetIndex.from_folder(str(tmp_path / "moved"), "train").fingerprint == fingerprint
    with open(tmp_path / "train" / "c2" / "0.jpg", "ab") as f:  # one file changes size
        f.write(b"\0")
    assert DatasetIndex.from_folder(str(tmp_path), "train").fingerprint != fingerprint


def test_missing_and_empty_inputs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"split folder not found: {tmp_path}/train"):
        DatasetIndex.from_folder(str(tmp_path), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=f"no class folders in {tmp_path}/train"):
        DatasetIndex.from_folder(str(tmp_path), "train")
    (tmp_path / "train" / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "train" / "empty" / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError) as err:
        DatasetIndex.from_folder(str(tmp_path), "train")
    assert str(err.value) == (
        f"class folder has no images: {tmp_path}/train/empty (no file in it or its subfolders "
        "ends in .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, in any case); add "
        "images or remove the folder")


def _write(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)  # the index reads names and sizes only


def test_flat_tree_keeps_its_order_and_fingerprint(tmp_path):
    tree = {"b": ["10.jpg", "2.jpg", "a.JPEG"], "A": ["x.png", "y.webp", "notes.txt"],
            "c": ["z.tif"]}
    for k, (name, files) in enumerate(tree.items()):
        for i, file in enumerate(files):
            _write(tmp_path / "train" / name / file, 10 * k + i + 1)
    index = DatasetIndex.from_folder(str(tmp_path), "train")
    top = str(tmp_path / "train")
    listing = [(os.path.join(top, c, f), label) for label, c in enumerate(sorted(os.listdir(top)))
               for f in sorted(os.listdir(os.path.join(top, c))) if not f.endswith(".txt")]
    assert list(zip(index.paths, index.labels.tolist())) == listing
    rows = sorted(f"{os.path.relpath(p, top)}\t{os.path.getsize(p)}\t{label}\n"
                  for p, label in listing)
    assert index.fingerprint == hashlib.sha256("".join(rows).encode()).hexdigest()
    # the fingerprint this tree had when the index listed class folders without recursion
    assert index.fingerprint == "3e941d6187be480b6d8978c68898f3b07fe79b2141735b20836efb412c8d989f"


def test_nested_images_are_the_ones_imagefolder_finds(tmp_path):
    train, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    for path in ("a/1.jpg", "a/notes.txt", "a/sub/2.JPG", "a/sub/deeper/3.png",
                 "a/sub/deeper/readme.md", "a/sub/y.jpg.bak", "b/x.jpeg", "b/a/0.jpg", "b/a.jpg",
                 "b/a b/9.ppm", "c/only/nested/6.bmp", "list.txt"):
        _write(train / path, 5)
    for path in ("4.jpg", "nested/5.webp", "nested/skip.csv"):
        _write(elsewhere / path, 7)
    (train / "b" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (train / "d").symlink_to(train / "a" / "sub", target_is_directory=True)
    index = DatasetIndex.from_folder(str(tmp_path), "train")
    folder = ImageFolder(str(train))
    assert index.classes == folder.classes == ["a", "b", "c", "d"]
    assert set(zip(index.paths, index.labels.tolist())) == set(folder.samples)
    assert len(index) == len(folder.samples) == 12
    assert index.paths == sorted(index.paths)  # classes in order, files by path within each
    assert str(train / "b" / "linked" / "nested" / "5.webp") in index.paths


@pytest.mark.parametrize("links", [{"a/up": ".."}, {"a/x/l1": "../y", "a/y/l2": "../x"}])
def test_folder_link_loop_names_the_link(tmp_path, links):
    _write(tmp_path / "train" / "a" / "1.jpg", 5)
    for link, target in links.items():
        (tmp_path / "train" / link).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / link).symlink_to(target, target_is_directory=True)
    with pytest.raises(ValueError, match=r"folder link loop: .*/train/a/(up|x/l1/l2|y/l2/l1)"):
        DatasetIndex.from_folder(str(tmp_path), "train")


def test_class_difference_names_missing_and_extra_classes():
    assert class_difference(["a", "b"], ["a", "b"]) is None
    assert class_difference(["astronaut", "b"], ["b", "zastronaut"]) == (
        "in train/, missing from val/: 'astronaut'; extra in val/, not in train/: 'zastronaut'")
    names = [f"n{i}" for i in range(8)]
    assert class_difference(names, names[:1], expected_name="the checkpoint") == (
        "in the checkpoint, missing from val/: 'n1', 'n2', 'n3', 'n4', 'n5' and 2 more")
    assert class_difference(["a", "b"], ["b", "a"]) == (
        "the same names with other labels: label 0 is 'a' in train/, 'b' in val/")
    assert class_difference(["a"], ["a", "a"]) == (
        "the same names with other labels: label 1 is no class in train/, 'a' in val/")


def _write_bad_inputs(folder):
    """Every kind of input from DESIGN's 'Bad input'; returns {name: readable?}."""
    folder.mkdir(parents=True)
    _jpeg(folder / "good.jpg")
    _jpeg(folder / "cmyk.jpg", mode="CMYK")
    _jpeg(folder / "gray.jpg", mode="L")
    _jpeg(folder / "tiny.jpg", size=(7, 5))
    Image.open(folder / "good.jpg").convert("P").save(folder / "palette.png")
    Image.open(folder / "good.jpg").convert("RGBA").save(folder / "alpha.png")
    buffer = io.BytesIO()
    Image.open(folder / "good.jpg").resize((300, 200)).save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    return {"good", "cmyk", "gray", "tiny", "palette", "alpha"}


@pytest.mark.parametrize("full_decode", [False, True])
def test_check_dataset_lists_bad_files_and_empty_folders(tmp_path, full_decode):
    readable = _write_bad_inputs(tmp_path / "train" / "mixed")
    (tmp_path / "train" / "hollow").mkdir()
    (tmp_path / "train" / "mixed" / "labels.csv").write_text("x")
    problems = dict(check_dataset(str(tmp_path / "train"), full_decode=full_decode).problems)
    folder = tmp_path / "train" / "mixed"
    expected = {str(folder / f"{n}.jpg") for n in ("truncated", "corrupt", "text", "empty")}
    expected |= {str(tmp_path / "train" / "hollow"), str(folder / "labels.csv")}
    assert set(problems) == expected
    assert problems[str(tmp_path / "train" / "hollow")].startswith(
        "stops training: class folder has no images")
    assert "truncated" in problems[str(folder / "truncated.jpg")]
    assert not readable & {os.path.basename(p).split(".")[0] for p in problems}


def test_check_dataset_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
        check_dataset(str(tmp_path / "nowhere"))


def _encoded(size, mode="RGB", **save):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_jpeg_size_reads_the_frame_header_as_pil_does():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the header's size is still the stored one
    variants = [
        _encoded((197, 1)),
        _encoded((1, 198), mode="L"),
        _encoded((333, 250), mode="CMYK"),
        _encoded((500, 375), progressive=True),
        _encoded((64, 48), exif=exif.tobytes(), icc_profile=b"\0" * 3000),
        _encoded((65, 47), quality=95, subsampling=0, restart_marker_blocks=1),
    ]
    for data in variants:
        with Image.open(io.BytesIO(data)) as img:
            assert jpeg_size(data) == img.size[::-1]
            assert probe_image(data, "x.jpg") == img.size[::-1]
    png = io.BytesIO()
    Image.new("RGB", (9, 7)).save(png, "PNG")
    assert jpeg_size(png.getvalue()) is None  # PIL takes over
    assert probe_image(png.getvalue(), "x.png") == (7, 9)
    data = variants[3]
    for cut in np.random.default_rng().integers(0, 700, 200).tolist():  # header cut anywhere
        assert jpeg_size(data[:cut]) in (None, (375, 500))
    with pytest.raises(BadImageError, match="cannot decode image cut.jpg: not a readable"):
        probe_image(data[:100], "cut.jpg")
