"""CUB image-caption data (nbs/00b_cub): the published layout read from fixture trees the tests write (counts,
the caption-to-image rule, token ids, truncation), clear errors for malformed input, the versioned vocabulary,
and the offline stand-in (deterministic, labelled, captions that name the drawn attributes)."""
import json

import numpy as np
import pytest
import torch

from mmebm import cub as C
from mmebm.config import profile
from mmebm.cub_metrics import evaluate_cub
from mmebm.data import DataError


@pytest.fixture
def fixture_root(tmp_path):
    return C.write_cub_fixture(tmp_path / "cub", per_class={"train": [3, 2, 4], "test": [2, 1]})


def test_fixture_tree_counts_and_caption_to_image_rule(fixture_root, tmp_path):
    path = C.import_cub(fixture_root, cache_dir=tmp_path / "cache", progress=False)
    tr, te = C.CUBCaptions(path, "train"), C.CUBCaptions(path, "test")
    assert (len(tr.images), len(tr), len(te.images), len(te)) == (9, 90, 3, 30)
    man = json.loads((path / "manifest.json").read_text())
    assert man["counts"] == {"train": 9, "test": 3} and man["source"] == "cub"
    for i in (0, 9, 10, 57, 89):                       # caption i belongs to image i // 10, in folder-then-file order
        (x, c), y = tr.get_batch(np.array([i]))
        assert tr.vocab.decode(c[0]).startswith(f"image {i // 10} caption {i % 10}")
        assert torch.equal(x[0], C.to_signed(tr.images[i // 10][None])[0])
    assert list(tr.labels) == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_token_ids_specials_and_truncation(tmp_path):
    long = " ".join(["wing"] * 45)
    caps = {"train": ["a red bird ."] * 10 + [long] * 10, "test": ["a blue bird ."] * 10}
    root = C.write_cub_fixture(tmp_path / "cub", per_class={"train": [2], "test": [1]}, captions=caps)
    ds = C.CUBCaptions(C.import_cub(root, cache_dir=tmp_path / "cache", progress=False), "train")
    v = ds.vocab
    assert v.words[:3] == ["<exc>", "<pad>", "<eos>"] and (C.EXC, C.PAD, C.EOS) == (0, 1, 2)
    assert v.words[3:] == ["a", "red", "bird", ".", "wing"]                       # first-appearance order, count > 3
    (_, c), _ = ds.get_batch(np.array([0, 15]))
    assert c[0, :5].tolist() == [3, 4, 5, 6, C.EOS] and (c[0, 5:] == C.PAD).all()
    assert (c[1, :31] == v.index["wing"]).all() and c[1, 31] == C.EOS               # 31 tokens + <eos>
    te = C.CUBCaptions(ds.path, "test")
    (_, ct), _ = te.get_batch(np.array([0]))
    assert ct[0, :5].tolist() == [3, C.EXC, 5, 6, C.EOS]                           # "blue" never seen in train
    saved = json.loads((ds.path / "vocab.json").read_text())
    assert saved["version"] == C.VOCAB_VERSION and saved["min_count"] == 3 and saved["max_len"] == 32


@pytest.mark.parametrize("breakage, message", [
    (lambda r: (r / "text_trainvalclasses.txt").unlink(), "missing caption file"),
    (lambda r: (r / "text_trainvalclasses.txt").write_text("too few\n" * 7), "7 captions for 5 images"),
    (lambda r: next((r / "train").rglob("*.jpg")).write_bytes(b"not a jpeg"), "unreadable image"),
    (lambda r: [p.unlink() for p in (r / "test").rglob("*.jpg")], "no images"),
    (lambda r: (r / C.LABELS_FILE).write_text("{}"), "no label for"),
    (lambda r: (r / C.LABELS_FILE).write_text("{oops"), "corrupt label file"),
])
def test_malformed_input_is_a_clear_error_and_leaves_no_cache(tmp_path, breakage, message):
    root = C.write_cub_fixture(tmp_path / "cub")
    breakage(root)
    with pytest.raises(DataError, match=message) as e:
        C.import_cub(root, cache_dir=tmp_path / "cache", progress=False)
    assert "expected layout" in str(e.value)
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_missing_root_and_bad_vocabulary_version(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        C.import_cub(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    f = tmp_path / "vocab.json"
    f.write_text(json.dumps({"version": 99, "words": list(C.SPECIALS), "min_count": 3, "max_len": 32}))
    with pytest.raises(DataError, match="version 99"):
        C.Vocab.load(f)


def test_standin_is_deterministic_labelled_and_its_captions_name_the_drawn_colours(tmp_path):
    a = C.build_cub_standin(cache_dir=tmp_path / "a", n_train=60, n_test=10, progress=False)
    b = C.build_cub_standin(cache_dir=tmp_path / "b", n_train=60, n_test=10, progress=False)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["data_sha256"] == mb["data_sha256"] and ma["source"] == "cub-standin" and "standin" in a.name
    ds = C.CUBCaptions(a, "train")
    attrs = np.load(a / "train" / "attributes.npy")
    colours = list(C.COLOURS)
    assert ds.has_labels and (attrs[:, 0] == ds.labels).all() and set(ds.labels) <= set(range(8))
    for i in range(0, len(ds), 7):                          # every colour word in a caption is one the bird has
        (_, c), _ = ds.get_batch(np.array([i]))
        words = set(ds.vocab.decode(c[0]).split())
        has = {colours[k] for k in attrs[i // 10, 1:4]}
        assert words & set(colours) and words & set(colours) <= has, (words, has)
    # the species is visible: mean body colour of species 0 (red) is redder than that of species 1 (blue)
    img = ds.images.astype(float)
    red, blue = img[ds.labels == 0][:, :, 24:40, 24:40].mean((0, 2, 3)), img[ds.labels == 1][:, :, 24:40, 24:40].mean((0, 2, 3))
    assert red[0] - red[2] > blue[0] - blue[2] + 50


def test_cub_training_resolves_modalities_and_resumes_exactly(tmp_path, monkeypatch):
    "The trainer on the stand-in: an image and caption logits, modalities from the vocabulary, exact resume."
    from mmebm import train as T
    monkeypatch.setenv("MMEBM_RUNS_DIR", str(tmp_path / "runs"))
    cfg = profile("cub-tiny", data_limit=48, iterations=4)
    _, straight = T.train(cfg, tmp_path / "straight", progress=False)
    T.train(cfg.replace(iterations=2), tmp_path / "halves", progress=False)
    t, halves = T.train(cfg, tmp_path / "halves", progress=False)
    assert straight["state"] == halves["state"] == "completed" and straight["data"]["source"] == "cub-standin"
    assert t.cfg.modalities[1] == {"kind": "text", "vocab": len(t.train_ds.pairs.vocab), "length": 32}
    s = T.Trainer.resume(tmp_path / "straight")
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), s.model.state_dict().values()))
    with torch.no_grad():
        (img, cap), _ = t.train_ds.get_batch(np.arange(4))
        out = t.model.generate({0: img})                      # image -> caption logits
    assert out[1].shape == cap.shape and torch.isfinite(out[1]).all()


@pytest.mark.slow
def test_minutes_on_the_standin_give_captions_that_name_the_image_colours(tmp_path, monkeypatch):
    """Trained for a few CPU minutes on the stand-in, captions generated from test images name a colour the bird
    has more often than a random colour word would (chance: the share of a bird's distinct colours among the 8)."""
    from mmebm import train as T
    monkeypatch.setenv("MMEBM_RUNS_DIR", str(tmp_path / "runs"))
    t, status = T.train(profile("cub-smoke", iterations=100000, max_minutes=4.0), progress=False)
    assert status["state"] == "stopped"
    from mmebm.cub_metrics import cub_generations, colour_agreement
    test = C.CUBCaptions(t.data_path, "test")
    captions = cub_generations(t.model.eval(), test, 200)["image_to_caption"]
    got = colour_agreement(captions, test, 200)
    assert got["colour_words"] > 0, "no colour word generated"
    assert got["precision"] > got["chance"] + 0.1, got


def test_mmebm_eval_scores_a_cub_run_with_its_own_protocol(tmp_path, monkeypatch):
    """`mmebm eval` on a stand-in run: the CUB classifiers (trained on first use, above the floor on the stand-in),
    coherence both ways and joint, caption colours, image FID, written to metrics.json; PolyMNIST's published
    classifiers are refused for it."""
    import os, subprocess, sys
    from pathlib import Path
    from mmebm import train as T, metrics
    monkeypatch.setenv("MMEBM_DATA_DIR", str(tmp_path / "data"))
    T.train(profile("cub-tiny", data_limit=320, iterations=2), tmp_path / "run", progress=False)
    exe = str(Path(sys.executable).with_name("mmebm"))
    r = subprocess.run([exe, "eval", str(tmp_path / "run"), "--n", "16", "--n-fid", "16", "--n-inception", "0", "--quiet"],
                       capture_output=True, text=True, env=os.environ | {"MMEBM_DATA_DIR": str(tmp_path / "data")}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "classifiers: mmebm's own" in r.stdout and "coherence (generator): n 16, image_to_caption" in r.stdout, r.stdout
    assert "fid_inception: not reported (not requested" in r.stdout
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res["classifiers"]["accuracy"]["image"] >= 0.8 and set(res["coherence"]) == {"generator", "ebm"}
    assert 0 <= res["coherence"]["ebm"]["caption_to_image"] <= 1 and res["fid_classifier"]["n"] == 16
    with pytest.raises(ValueError, match="PolyMNIST"):
        evaluate_cub(tmp_path / "run", classifiers="/nowhere", progress=False)
    with pytest.raises(ValueError, match="evaluate_cub"):          # PolyMNIST's protocol refuses a CUB run
        metrics.evaluate(tmp_path / "run", progress=False)


def test_an_mscoco_tree_trains_and_is_scored_without_labels(tmp_path, monkeypatch):
    """MSCOCO captions (the scaling experiment) through the same pipeline: the 2017 layout imported (five captions per
    image), a few iterations trained, and scored: coherence refused for want of labels, image FID reported."""
    from mmebm import train as T, metrics
    monkeypatch.setenv("MMEBM_DATA_DIR", str(tmp_path / "data"))
    root = C.write_coco_fixture(tmp_path / "coco", {"train": 20, "test": 9})
    t, status = T.train(profile("cub-tiny", data=str(root), iterations=2), tmp_path / "run", progress=False)
    assert status["state"] == "completed" and status["data"]["source"] == "mscoco" and t.train_ds.pairs.per_image == 5
    res = evaluate_cub(tmp_path / "run", n_coherence=8, n_fid=8, progress=False)
    assert "no class labels" in res["coherence"]["unavailable"] and "no class labels" in res["fid_classifier"]["unavailable"]
    assert "attribute table" in res["caption_colours"]["unavailable"]
    assert profile("coco-paper").latent_dim == 128
