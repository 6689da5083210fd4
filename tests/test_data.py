"""Data loading: MedMNIST npz files, folder datasets, downloads, and every bad input named in the issue."""
import hashlib
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import make_arrays


def test_npz_loads_as_uint8_nchw_with_both_label_shapes(tmp_path):
    for shape in ("col", "flat"):
        np.savez(tmp_path / "breastmnist.npz", **make_arrays(label_shape=shape, seed=3))
        ds = dataset.load("breast", 28, str(tmp_path))
        x, y = ds["train"]
        assert x.dtype == torch.uint8 and x.shape == (64, 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (64,)
        ref = make_arrays(label_shape=shape, seed=3)
        assert np.array_equal(x[:, 0].numpy(), ref["train_images"])
        assert np.array_equal(y.numpy(), ref["train_labels"].reshape(-1))
        assert ds["n_classes"] == 2 and ds["channels"] == 1


def test_rgb_npz_becomes_three_channels(tmp_path):
    arr = make_arrays(channels=3, n_classes=3)
    np.savez(tmp_path / "dermamnist_64.npz", **make_arrays(channels=3, n_classes=3, size=64))
    np.savez(tmp_path / "dermamnist.npz", **arr)
    ds = dataset.load("dermamnist", 28, str(tmp_path))
    assert ds["train"][0].shape == (64, 3, 28, 28) and ds["n_classes"] == 3
    assert np.array_equal(ds["train"][0].permute(0, 2, 3, 1).numpy(), arr["train_images"])
    assert dataset.load("dermamnist", 64, str(tmp_path))["train"][0].shape == (64, 3, 64, 64)


def test_file_in_flag_subfolder_is_found(tmp_path):
    (tmp_path / "pneumoniamnist").mkdir()
    np.savez(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz", **make_arrays())
    assert len(dataset.load("pneumonia", 28, str(tmp_path))["test"][0]) == 16


def _bad(tmp_path, arrays, match, exc=(ValueError, TypeError, KeyError)):
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(exc, match=match) as e:
        dataset.load("pneumonia", 28, str(tmp_path))
    assert "pneumoniamnist.npz" in str(e.value)  # the error names the file


def test_missing_key(tmp_path):
    a = make_arrays()
    del a["val_labels"]
    _bad(tmp_path, a, "missing key 'val_labels'", KeyError)


def test_wrong_image_dtype(tmp_path):
    a = make_arrays()
    a["train_images"] = a["train_images"].astype(np.float32)
    _bad(tmp_path, a, "dtype float32, expected uint8", TypeError)


def test_wrong_image_shape(tmp_path):
    a = make_arrays()
    a["test_images"] = a["test_images"].reshape(16, -1)
    _bad(tmp_path, a, "test_images has shape")


def test_labels_out_of_range(tmp_path):
    a = make_arrays()
    a["val_labels"][0] = 7
    _bad(tmp_path, a, "out of range")


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_label_equal_to_the_class_count_is_out_of_range(tmp_path, split):
    """The boundary itself: train has labels 0..1, so K = 2 is the first label out of range (planted: `>` for `>=`
    in the check accepted it, and a probe would index past its 2 outputs)."""
    a = make_arrays()
    a[f"{split}_labels"][0] = 2
    _bad(tmp_path, a, f"{split}_labels has label 2 out of range")


def test_labels_not_integers(tmp_path):
    a = make_arrays()
    a["train_labels"] = a["train_labels"].astype(np.float32)
    _bad(tmp_path, a, "expected integers", TypeError)


def test_label_count_mismatch(tmp_path):
    a = make_arrays()
    a["train_labels"] = a["train_labels"][:10]
    _bad(tmp_path, a, "train_labels has shape")


def test_empty_split(tmp_path):
    a = make_arrays()
    a["val_images"], a["val_labels"] = a["val_images"][:0], a["val_labels"][:0]
    _bad(tmp_path, a, "split 'val' is empty")


def test_truncated_npz(tmp_path):
    np.savez(tmp_path / "full.npz", **make_arrays())
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "pneumoniamnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="pneumoniamnist.npz: not a readable npz"):
        dataset.load("pneumonia", 28, str(tmp_path))


def test_wrong_size_for_file(tmp_path):
    np.savez(tmp_path / "pneumoniamnist_64.npz", **make_arrays(size=28))
    with pytest.raises(ValueError, match="expected --size 64"):
        dataset.load("pneumonia", 64, str(tmp_path))


def test_unknown_flag_and_size():
    with pytest.raises(ValueError, match="not a MedMNIST 2D flag"):
        dataset.load("nosuchmnist", 28, "/nonexistent")
    with pytest.raises(ValueError, match="--size 32"):
        dataset.load("pneumonia", 32, "/nonexistent")


def test_offline_download_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "ZENODO", "file:///nonexistent-medssl/{file}")
    with pytest.raises(FileNotFoundError) as e:
        dataset.load("pneumonia", 28, str(tmp_path))
    msg = str(e.value)
    assert "pneumoniamnist.npz" in msg and "file:///nonexistent-medssl/pneumoniamnist.npz" in msg
    assert str(tmp_path / "pneumoniamnist.npz") in msg
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_download_checks_md5(tmp_path, monkeypatch):
    src = tmp_path / "server"
    src.mkdir()
    np.savez(src / "breastmnist.npz", **make_arrays())
    monkeypatch.setattr(dataset, "ZENODO", f"file://{src}/{{file}}")
    dest = tmp_path / "data"
    # the official checksum does not match this synthetic file: refused, and nothing is left behind
    with pytest.raises(FileNotFoundError, match="MD5"):
        dataset.load("breast", 28, str(dest))
    assert not any(dest.iterdir())
    # with the matching checksum the same download is accepted, renamed into place, and loads
    md5 = hashlib.md5((src / "breastmnist.npz").read_bytes()).hexdigest()
    monkeypatch.setitem(dataset.MEDMNIST_MD5, "breastmnist", (md5,) * 4)
    assert dataset.load("breast", 28, str(dest))["train"][0].shape == (64, 1, 28, 28)
    assert sorted(os.listdir(dest)) == ["breastmnist.npz"]


# ---------------------------------------------------------------------------------------------- folders
def _write_images(folder, n, gray, value, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(n):
        a = rng.integers(0, 60, (size, size + 8, 3)).astype(np.uint8) + value
        if gray:
            a[..., 1] = a[..., 0]
            a[..., 2] = a[..., 0]
        Image.fromarray(a).save(folder / f"img{i}.png")


def test_flat_class_folders_are_split_stratified(tmp_path):
    root = tmp_path / "kather"
    _write_images(root / "ADIPOSE", 20, gray=False, value=0)
    _write_images(root / "TUMOR", 30, gray=False, value=150)
    cache = tmp_path / "cache"
    ds = dataset.load(str(root), 28, str(cache), seed=1)
    counts = {s: torch.bincount(ds[s][1], minlength=2).tolist() for s in dataset.SPLITS}
    assert counts["test"] == [4, 6]  # 20% of each class
    assert counts["val"] == [2, 2]  # 10% of the remaining 16 / 24, rounded
    assert counts["train"] == [14, 22]
    assert ds["channels"] == 3 and ds["train"][0].shape[1:] == (3, 28, 28)
    # the class is visible in brightness: label 1 images are brighter
    x, y = ds["train"]
    assert x[y == 1].float().mean() > x[y == 0].float().mean() + 100
    # cached: the second load of the unchanged folder decodes nothing
    assert len(os.listdir(cache)) == 1 and os.listdir(cache)[0].startswith("kather_28_s1_")
    with mock.patch.object(dataset.Image, "open", side_effect=AssertionError("decoded again")):
        again = dataset.load(str(root), 28, str(cache), seed=1)
    assert torch.equal(again["test"][0], ds["test"][0])


def test_split_folders_gray_stays_one_channel(tmp_path):
    root = tmp_path / "cxr"
    for split, n in (("train", 10), ("test", 4)):
        _write_images(root / split / "NORMAL", n, gray=True, value=0)
        _write_images(root / split / "PNEUMONIA", n, gray=True, value=100)
    ds = dataset.load(str(root), 28, str(tmp_path / "c"))
    assert ds["channels"] == 1
    assert [len(ds[s][1]) for s in dataset.SPLITS] == [18, 2, 8]  # val carved from train only; test kept


@pytest.mark.parametrize("n_small", [1, 2, 3])
def test_carving_val_and_test_never_empties_a_tiny_class_from_train(tmp_path, n_small):
    """A class of 1-3 images in a flat folder: test (20%) and val (10%) are carved per class with at least one image
    each, which would take every image of such a class out of train; at least one stays (planted: leave_one off:
    the load failed, "train_labels must be 0..K-1 with every class present")."""
    root = tmp_path / "tiny"
    _write_images(root / "big", 20, gray=True, value=0)
    _write_images(root / "small", n_small, gray=True, value=150)
    ds = dataset.load(str(root), 28, str(tmp_path / "c"), seed=0)
    assert ds["n_classes"] == 2 and (ds["train"][1] == 1).sum() >= 1
    assert sum((ds[s][1] == 1).sum().item() for s in dataset.SPLITS) == n_small  # every image somewhere, once


def test_unreadable_image_is_named(tmp_path):
    root = tmp_path / "ds"
    _write_images(root / "A", 3, gray=True, value=0)
    _write_images(root / "B", 3, gray=True, value=0)
    (root / "B" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        dataset.load(str(root), 28, str(tmp_path / "c"))


def test_truncated_jpeg_is_named(tmp_path):
    root = tmp_path / "ds"
    _write_images(root / "A", 3, gray=True, value=0)
    (root / "B").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(root / "B" / "x.jpg", quality=90)
    data = (root / "B" / "x.jpg").read_bytes()
    (root / "B" / "x.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="x.jpg: unreadable image"):
        dataset.load(str(root), 28, str(tmp_path / "c"))


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "ds"
    _write_images(root / "A", 3, gray=True, value=0)
    (root / "B").mkdir()
    (root / "B" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"B: class folder has no images"):
        dataset.load(str(root), 28, str(tmp_path / "c"))


def test_train_subset_is_seeded(npz_dir):
    a = dataset.load("pneumonia", 28, str(npz_dir))
    b = dataset.load("pneumonia", 28, str(npz_dir))
    dataset.take_subset(a, 10, seed=5)
    dataset.take_subset(b, 10, seed=5)
    assert torch.equal(a["train"][0], b["train"][0]) and len(a["train"][1]) == 10
    with pytest.raises(ValueError, match="--train-subset 999"):
        dataset.take_subset(a, 999, seed=5)


def test_a_train_subset_without_every_class_is_refused_before_training(npz_dir):
    """--train-subset 3 drew three images of one class (issue 32: L-BFGS overflowed after training, on the NaN
    spread of a one-image probe): refused at load, naming the missing class; which subsets lack a class is
    brute-forced here from the same seeded draw (planted: no check -> the load passes)."""
    full = dataset.load("pneumonia", 28, str(npz_dir))
    y = full["train"][1]
    for n in range(1, 9):
        drawn = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]]
        lacks = sorted(set(range(2)) - set(drawn.tolist()))
        if lacks:
            with pytest.raises(ValueError, match=rf"--train-subset {n}: .* no train image of class\(es\) "
                                                 rf"{lacks[0]}"):
                dataset.load("pneumonia", 28, str(npz_dir), subset=n)
        else:
            assert len(dataset.load("pneumonia", 28, str(npz_dir), subset=n)["train"][1]) == n


# ---------------------------------------------------------------------------------------------- real data
def test_real_medmnist_files_load(real_data_dir):
    pn = dataset.load("pneumonia", 28, real_data_dir)
    assert [len(pn[s][1]) for s in dataset.SPLITS] == [4708, 524, 624]  # official split counts
    assert torch.bincount(pn["test"][1]).tolist() == [234, 390]
    br = dataset.load("breast", 64, real_data_dir)  # (N, 1) labels, byte-identical official file
    assert [len(br[s][1]) for s in dataset.SPLITS] == [546, 78, 156] and br["train"][0].shape[-1] == 64
    assert dataset.md5sum(os.path.join(real_data_dir, "breastmnist", "breastmnist_64.npz")) == dataset.MEDMNIST_MD5["breastmnist"][1]


def test_real_chest_xray_folder(real_data_dir, tmp_path):
    root = os.path.join(real_data_dir, "chest_xray_224")
    ds = dataset.load(root, 28, str(tmp_path))
    assert ds["channels"] == 1 and ds["n_classes"] == 2  # gray X-rays stored as RGB JPEGs stay 1 channel
    assert len(ds["test"][1]) == 624 and len(ds["train"][1]) + len(ds["val"][1]) == 2682
    assert torch.bincount(ds["val"][1]).tolist() == [134, 134]  # 10% of each class, stratified


def test_channel_stats_in_chunks_match_the_whole_set_formula():
    x = torch.randint(0, 256, (1000, 3, 9, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = dataset.channel_stats(x, chunk=300)  # 300 does not divide 1000: a ragged last chunk
    xf = x.float().div(255).transpose(0, 1).flatten(1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), xf.mean(1).double(), atol=1e-6)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), xf.std(1).double(), atol=1e-6)

