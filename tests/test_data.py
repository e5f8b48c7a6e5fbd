"""PolyMNIST: the seeded offline builder, both published formats, the dataset, and every bad input."""
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmebm import data as D


def arrays(path, split):
    return np.stack([np.load(path / split / f"m{k}.npy") for k in range(5)]), np.load(path / split / "labels.npy")


# ---------------------------------------------------------------- the offline builder
def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path, small_build):
    again = D.build_polymnist(tmp_path / "a", seed=0, limit=200, progress=False)
    other = D.build_polymnist(tmp_path / "b", seed=1, limit=200, progress=False)
    for f in D.read_manifest(small_build)["files"]:
        assert (small_build / f).read_bytes() == (again / f).read_bytes(), f
    assert D.read_manifest(again)["data_sha256"] == D.read_manifest(small_build)["data_sha256"]
    differ = [f for f in D.read_manifest(other)["files"] if re.fullmatch(r"train/m\d\.npy", f)
              if (small_build / f).read_bytes() != (other / f).read_bytes()]
    assert len(differ) == 5
    # labels come from MNIST order, not from the seed: only the images change
    assert (np.load(other / "train/labels.npy") == np.load(small_build / "train/labels.npy")).all()


def test_every_tuple_shares_its_label_and_each_digit_is_used_once(small_build):
    mnist, _ = D.load_mnist()
    for split in D.SPLITS:
        labels = np.load(small_build / split / "labels.npy")
        src = np.load(small_build / split / "mnist_index.npy")
        assert src.shape == (len(labels), 5)
        assert (mnist[split][1][src] == labels[:, None]).all()        # all five modalities show the tuple's class
        for k in range(5):
            assert sorted(src[:, k]) == list(range(len(labels)))       # a permutation per modality
        assert (src[:, 0] != src[:, 1]).mean() > 0.5                   # same class, mostly not the same instance


def test_digit_pixels_invert_the_background_crop(small_build):
    mnist, _ = D.load_mnist()
    photos = [D.load_photo(n) for n in D.PHOTOS]
    images, _ = arrays(small_build, "test")
    src = np.load(small_build / "test/mnist_index.npy")
    offsets = np.load(small_build / "test/crop_offsets.npy")
    checked = 0
    for i in range(0, 200, 7):
        for k in range(5):
            top, left = offsets[i, k]
            crop = photos[k][top:top + 28, left:left + 28].transpose(2, 0, 1).astype(int)
            mask = mnist["test"][0][src[i, k]] > 128
            img = images[k, i].astype(int)
            assert mask.any() and (~mask).any()
            # in [0, 1] units: x = 1 - crop under the mask, x = crop elsewhere
            assert (img[:, mask] == 255 - crop[:, mask]).all()
            assert (img[:, ~mask] == crop[:, ~mask]).all()
            checked += 1
    assert checked == 29 * 5


def test_manifest_records_counts_seed_photos_and_checksums(small_build):
    man = D.read_manifest(small_build)
    assert man["counts"] == {"train": 200, "test": 200} and man["seed"] == 0 and man["source"] == "offline"
    assert [p["name"] for p in man["photos"]] == list(D.PHOTOS)
    assert all(len(p["sha256"]) == 64 for p in man["photos"])
    for f, digest in man["files"].items():
        assert D.sha256_file(small_build / f) == digest
    assert D.verify_dataset(small_build) == man


def test_verify_detects_a_changed_file(tmp_path, small_build):
    copy = shutil.copytree(small_build, tmp_path / "copy")
    a = np.load(copy / "test/m2.npy"); a[0, 0, 0, 0] ^= 1; np.save(copy / "test/m2.npy", a)
    with pytest.raises(D.DataError, match=r"test/m2\.npy: checksum differs"):
        D.verify_dataset(copy)


def test_second_call_reuses_the_cache(small_build, monkeypatch):
    def boom(*a, **k): raise AssertionError("rebuilt instead of re-using the cache")
    monkeypatch.setattr(D, "load_mnist", boom)
    t = time.perf_counter()
    assert D.build_polymnist(small_build.parent, seed=0, limit=200) == small_build
    assert time.perf_counter() - t < 1.0


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEBM_DATA_DIR", str(tmp_path / "env-cache"))
    path = D.build_polymnist(seed=0, limit=20, progress=False)
    assert path.parent == tmp_path / "env-cache" and D.list_datasets() == [path]


def test_interrupted_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    real_save, calls = np.save, []
    def failing_save(*a, **k):
        calls.append(a[0])
        if len(calls) == 4: raise KeyboardInterrupt("simulated interruption")
        return real_save(*a, **k)
    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        D.build_polymnist(tmp_path, seed=0, limit=20, progress=False)
    # neither the data set nor its temporary folder (the entry's empty lock file stays: data.cache_lock)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(np, "save", real_save)
    assert D.read_manifest(D.build_polymnist(tmp_path, seed=0, limit=20, progress=False))["counts"]["train"] == 20


def test_full_offline_build_and_reuse():
    "The full 60,000 / 10,000 set in the configured cache (make sets ./data): the `make data` target's work."
    t = time.perf_counter()
    path = D.build_polymnist(progress=False)
    built = time.perf_counter() - t
    man = D.read_manifest(path)
    assert man["counts"] == D.FULL_SIZE == {"train": 60000, "test": 10000}
    assert built < 180
    t = time.perf_counter(); D.build_polymnist(); train, test = D.get_datasets()
    assert time.perf_counter() - t < 5 and len(train) == 60000 and len(test) == 10000
    assert np.bincount(test.labels, minlength=10).min() > 800


# ---------------------------------------------------------------- the published formats
@pytest.fixture
def reference(small_build):
    return {s: (arrays(small_build, s)[0][:, :12], arrays(small_build, s)[1][:12]) for s in D.SPLITS}


@pytest.mark.parametrize("fmt", ["png", "pt"])
def test_published_formats_round_trip_and_import(tmp_path, reference, fmt):
    root = tmp_path / "archive"
    (D.write_png_archive if fmt == "png" else D.write_pt_archive)(root, reference)
    assert D.detect_format(root) == fmt
    got = D.read_published(root, progress=False)
    for s in D.SPLITS:
        assert got[s][0].dtype == np.uint8 and (got[s][0] == reference[s][0]).all() and (got[s][1] == reference[s][1]).all()
    cached = D.polymnist_path(root, tmp_path / "cache")
    assert D.read_manifest(cached)["source"] == f"published-{fmt}"
    xs, y = D.PolyMNIST(cached, "test")[3]
    assert y == reference["test"][1][3]
    assert torch.equal(xs[4], D.to_signed(reference["test"][0][4, 3]))


def test_png_pairs_by_name_not_by_listing_order(tmp_path, reference):
    root = tmp_path / "a"; D.write_png_archive(root, reference)
    # file names sort as strings 0, 1, 10, 11, 2, ...: reading must pair tuples by their index i
    images, labels = D.read_png_split(root, "train", progress=False)
    assert (labels == reference["train"][1]).all() and (images == reference["train"][0]).all()


def test_tensor_files_accept_float_and_channels_last(tmp_path, reference):
    root = tmp_path / "pt"; D.write_pt_archive(root, reference)
    for s in D.SPLITS:
        for k in range(5):
            x = torch.load(root / s / f"m{k}.pt").permute(0, 2, 3, 1).float() / 255
            torch.save(x, root / s / f"m{k}.pt")
    got = D.read_published(root)
    assert (got["test"][0] == reference["test"][0]).all()


# ---------------------------------------------------------------- bad input: one line naming the file and layout
def expect_error(fn, *names):
    with pytest.raises(D.DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "expected layout" in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


def test_missing_root(tmp_path):
    expect_error(lambda: D.read_published(tmp_path / "nope"), "nope", "no such directory")
    expect_error(lambda: D.polymnist_path(tmp_path / "nope", tmp_path), "nope")


def test_wrong_layout(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    expect_error(lambda: D.read_published(tmp_path), "neither a PNG nor a tensor-file", "m{0..4}")
    (tmp_path / "train" / "m0").mkdir()
    (tmp_path / "train" / "m0" / "picture.png").write_bytes(b"")
    expect_error(lambda: D.read_png_split(tmp_path, "train"), "picture.png", "<i>.<digit>.png")


def test_unequal_counts(tmp_path, reference):
    root = tmp_path / "png"; D.write_png_archive(root, reference)
    next((root / "test" / "m2").glob("5.*.png")).unlink()
    expect_error(lambda: D.read_published(root), "unequal modality counts")
    root = tmp_path / "pt"; D.write_pt_archive(root, reference)
    torch.save(torch.load(root / "train" / "m3.pt")[:-1], root / "train" / "m3.pt")
    expect_error(lambda: D.read_published(root), "unequal counts", str(root / "train"))


def test_labels_disagreeing_across_modalities(tmp_path, reference):
    root = tmp_path / "png"; D.write_png_archive(root, reference)
    f = next((root / "train" / "m1").glob("7.*.png"))
    wrong = (int(f.name.split(".")[1]) + 1) % 10
    f.rename(f.with_name(f"7.{wrong}.png"))
    expect_error(lambda: D.read_published(root), f"7.{wrong}.png", "disagrees")


def test_missing_tuple_in_one_modality(tmp_path, reference):
    root = tmp_path / "png"; D.write_png_archive(root, reference)
    f = next((root / "train" / "m4").glob("3.*.png")); f.rename(f.with_name("99." + f.name.split(".", 1)[1]))
    expect_error(lambda: D.read_published(root), "m4", "not present in every modality")


def test_corrupt_png(tmp_path, reference):
    root = tmp_path / "png"; D.write_png_archive(root, reference)
    f = next((root / "test" / "m0").glob("2.*.png")); f.write_bytes(f.read_bytes()[:30])
    expect_error(lambda: D.read_published(root), f.name, "unreadable PNG")


def test_truncated_tensor_file(tmp_path, reference):
    root = tmp_path / "pt"; D.write_pt_archive(root, reference)
    f = root / "test" / "m1.pt"; f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(lambda: D.read_published(root), "m1.pt", "truncated")
    (root / "train" / "labels.pt").unlink()
    expect_error(lambda: D.read_pt_split(root, "train"), "labels.pt", "missing file")


def test_truncated_idx(tmp_path):
    import gzip, struct
    f = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(f, "wb") as g: g.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 28, 28) + bytes(28 * 28 * 2))
    assert D.read_idx(f).shape == (2, 28, 28)
    with gzip.open(f, "wb") as g: g.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 28, 28) + bytes(100))
    expect_error(lambda: D.read_idx(f), f.name, "truncated")


def test_not_a_cached_set(tmp_path):
    expect_error(lambda: D.PolyMNIST(tmp_path), "manifest.json", "no manifest")


# ---------------------------------------------------------------- the dataset and loaders
def test_dataset_items_subsets_and_batches(small_build):
    ds = D.PolyMNIST(small_build, "train")
    xs, y = ds[5]
    assert len(xs) == 5 and all(x.shape == (3, 28, 28) and x.dtype == torch.float32 for x in xs)
    assert min(x.min() for x in xs) >= -1 and max(x.max() for x in xs) <= 1
    assert min(x.min() for x in xs) == -1 or max(x.max() for x in xs) == 1   # the full range is used
    assert y == int(np.load(small_build / "train/labels.npy")[5])
    sub = D.PolyMNIST(small_build, "train", modalities=[4, 0])
    assert sub.modalities == (4, 0) and torch.equal(sub[5][0][0], xs[4]) and torch.equal(sub[5][0][1], xs[0])
    with pytest.raises(ValueError): D.PolyMNIST(small_build, "train", modalities=[5])
    with pytest.raises(ValueError): D.PolyMNIST(small_build, "valid")
    epoch = list(ds.batches(32, seed=3))
    assert len(epoch) == 200 // 32 and epoch[0][0][1].shape == (32, 3, 28, 28)
    assert torch.equal(epoch[0][1], next(ds.batches(32, seed=3))[1])
    assert not torch.equal(epoch[0][1], next(ds.batches(32, seed=3, epoch=1))[1])
    assert sum(len(b[1]) for b in ds.batches(32, shuffle=False, drop_last=False)) == 200
    seen = torch.cat([b[1] for b in ds.batches(40, seed=0)]).sort().values
    assert torch.equal(seen, torch.from_numpy(np.sort(ds.labels)))      # an epoch visits every tuple once
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    bx, by = next(iter(loader))
    assert len(bx) == 5 and bx[0].shape == (16, 3, 28, 28) and by.shape == (16,)


def test_sample_grid_figure(small_build, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    fig = D.plot_tuples(D.PolyMNIST(small_build, "test"), n=6)
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 5000


# ---------------------------------------------------------------- the command line
def cli(*args, env=None):
    exe = Path(sys.executable).with_name("mmebm")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_build_and_info(tmp_path):
    r = cli("data", "build", "--limit", "25", "--seed", "2", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "counts: {'train': 25, 'test': 25}" in r.stdout and "seed: 2" in r.stdout
    r = cli("data", "info", "--verify", env={"MMEBM_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0 and "verified" in r.stdout and "polymnist-offline-v1-seed2-n25" in r.stdout
    man = json.loads((tmp_path / "polymnist-offline-v1-seed2-n25" / "manifest.json").read_text())
    assert man["data_sha256"] in r.stdout


def test_cli_reports_bad_input_in_one_line(tmp_path):
    r = cli("data", "build", "--from", str(tmp_path / "missing"), "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = cli("data", "info", "--cache-dir", str(tmp_path / "empty"))
    assert r.returncode == 1 and "mmebm data build" in r.stdout
