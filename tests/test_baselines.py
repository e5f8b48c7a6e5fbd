"""Baselines (the package mmebm.baselines, nbs/07a-07f): the aggregation rules against independent computations
(numerical integration, quantile averaging, the matrix formula), every baseline trains and its loss falls, the adapters
answer the common interface with the right shapes and ranges, resume is exact, and (slow) minutes of training beat
chance coherence."""
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from mmebm import baselines as B
from mmebm import metrics
from mmebm.data import PolyMNIST, polymnist_path


@pytest.fixture(scope="module")
def xs():
    ds = PolyMNIST(polymnist_path(None, seed=0, limit=256, progress=False), "train")
    return list(ds.get_batch(np.arange(12))[0])


def normal_pdf(z, mu, sd):
    return torch.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def test_hellinger_pool_of_equal_gaussians_is_that_gaussian():
    mu, lv = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    m, l = B.hellinger_pool(mu.repeat(3, 1, 1), lv.repeat(3, 1, 1))
    assert torch.allclose(m, mu[0], atol=1e-5) and torch.allclose(l, lv[0], atol=1e-4)


def test_hellinger_pool_matches_the_moments_of_the_pooled_density_in_two_dimensions():
    "(sqrt q1 + sqrt q2)^2, normalised on a 2-D grid: its per-dimension mean and variance are what the pool returns."
    mus = torch.tensor([[[-1.0, 0.5]], [[2.0, -0.5]]], dtype=torch.float64)
    sds = torch.tensor([[[0.5, 1.2]], [[1.5, 0.7]]], dtype=torch.float64)
    g = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    Z1, Z2 = torch.meshgrid(g, g, indexing="ij")
    q = lambda i: normal_pdf(Z1, mus[i, 0, 0], sds[i, 0, 0]) * normal_pdf(Z2, mus[i, 0, 1], sds[i, 0, 1])
    p = (q(0).sqrt() + q(1).sqrt()) ** 2
    p = p / p.sum()
    mean = torch.stack([(p * Z1).sum(), (p * Z2).sum()])
    var = torch.stack([(p * Z1 ** 2).sum(), (p * Z2 ** 2).sum()]) - mean ** 2
    m, lv = B.hellinger_pool(mus.float(), (2 * sds.log()).float())
    assert torch.allclose(m[0].double(), mean, atol=1e-4), (m, mean)
    assert torch.allclose(lv[0].double().exp(), var, rtol=1e-3), (lv.exp(), var)


def test_wasserstein_barycenter_equals_the_average_of_quantile_functions():
    "In 1-D the W2 barycenter's quantile function is the weighted mean of the inputs' quantile functions."
    mus, sds, w = torch.tensor([-1.0, 0.5, 3.0]), torch.tensor([0.3, 1.0, 2.0]), torch.tensor([0.2, 0.5, 0.3])
    m, lv = B.wasserstein_barycenter(mus.view(3, 1, 1), (2 * sds.log()).view(3, 1, 1), w)
    probs = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99])
    quant = lambda mu, sd: torch.distributions.Normal(mu, sd).icdf(probs)
    avg = sum(wi * quant(mi, si) for wi, mi, si in zip(w, mus, sds))
    assert torch.allclose(quant(m.flatten(), lv.exp().sqrt().flatten()), avg, atol=1e-5)


def test_consensus_of_dependent_experts_matches_the_matrix_formula_and_poe():
    torch.manual_seed(0)
    mus, lvs = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    m, lv = B.consensus_of_experts(mus, lvs, rho=0.3)
    R = torch.full((4, 4), 0.3).fill_diagonal_(1.0)
    one = torch.ones(4)
    for b in range(3):
        for d in range(5):
            D = torch.diag(torch.exp(0.5 * lvs[:, b, d]))
            Si = torch.linalg.inv(D @ R @ D)
            assert torch.isclose(lv[b, d].exp(), 1 / (one @ Si @ one), rtol=1e-4)
            assert torch.isclose(m[b, d], (one @ Si @ mus[:, b, d]) / (one @ Si @ one), rtol=1e-4, atol=1e-5)
    pm, plv = B.product_of_experts(mus, lvs, prior=False)
    m0, lv0 = B.consensus_of_experts(mus, lvs, rho=0.0)
    assert torch.allclose(m0, pm, atol=1e-5) and torch.allclose(lv0, plv, atol=1e-5)
    with pytest.raises(ValueError, match="singular"):
        B.consensus_of_experts(mus, lvs, rho=1.0)


def test_product_of_experts_with_the_prior():
    m, lv = B.product_of_experts(torch.tensor([[[3.0]]]), torch.zeros(1, 1, 1))   # N(3, 1) x N(0, 1) = N(1.5, 0.5)
    assert torch.allclose(m, torch.tensor([[1.5]])) and torch.allclose(lv.exp(), torch.tensor([[0.5]]))


@pytest.mark.parametrize("key", list(B.BASELINES))
def test_every_baseline_trains_and_its_loss_falls(key, tmp_path):
    cfg = B.baseline_profile(key, "tiny", iterations=16, lr=3e-3, vae_iterations=12 if key == "diff_cmvae" else None)
    _, status = B.train_baseline(cfg, tmp_path / key, progress=False)
    log = pd.read_csv(tmp_path / key / "log.csv")
    vae = log[log.phase == "vae"].loss.to_numpy()
    assert status["state"] == "completed" and len(log) == 16
    assert vae[-3:].mean() < vae[:3].mean(), vae
    if key == "diff_cmvae": assert (log.phase == "refiner").sum() == 4


@pytest.mark.parametrize("key", list(B.BASELINES))
def test_adapters_answer_the_common_interface(key, xs):
    torch.manual_seed(0)
    model = B.build_baseline(B.baseline_profile(key, "tiny")).eval()
    assert model.n_modalities == 5
    with torch.no_grad():
        outs = [model.sample(5), model.sample(1)] + [model.generate({m: xs[m] for m in S}) for S in ((0,), (1, 3), (0, 1, 2, 3))]
        refined = model.sample(3, revised=True)
    for out in outs + [refined]:
        assert len(out) == 5 and all(o.dim() == 4 and o.shape[1:] == (3, 28, 28) and o.abs().max() <= 1 and torch.isfinite(o).all() for o in out)
    assert [o.shape[0] for o in (outs[0][0], outs[1][0], outs[2][0])] == [5, 1, 12]
    assert metrics.kinds_of(model) == (("generator", "refiner") if key == "diff_cmvae" else ("generator",))


def test_diff_cmvae_refiner_changes_the_samples_and_the_cmvae_is_frozen_while_it_trains(xs):
    torch.manual_seed(0)
    model = B.build_baseline(B.baseline_profile("diff_cmvae", "tiny"))
    coarse = model.vae.sample(4)
    assert not all(torch.equal(a, b) for a, b in zip(coarse, model.refine(coarse)))
    loss, _ = model.loss(xs, "refiner")
    loss.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiner.parameters())


@pytest.mark.parametrize("key", ["mopoe", "diff_cmvae", "mmvae_plus", "helvae"])
def test_resume_is_exact(key, tmp_path):
    """A run of budget 3 continued to 6 equals one that ran 6 straight (Diff-CMVAE: across its phase boundary at 2, which
    an absolute `vae_iterations` keeps where it was when the budget grows)."""
    cfg = B.baseline_profile(key, "tiny", iterations=6)
    B.train_baseline(cfg, tmp_path / "straight", progress=False)
    B.train_baseline(cfg.replace(iterations=3), tmp_path / "halves", progress=False)
    t, _ = B.train_baseline(cfg, tmp_path / "halves", progress=False)
    straight = B.BaselineTrainer.resume(tmp_path / "straight")
    for (n, a), b in zip(t.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_refuses_another_config(tmp_path):
    cfg = B.baseline_profile("helvae", "tiny", iterations=2)
    B.train_baseline(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another config"):
        B.train_baseline(cfg.replace(beta=2.0), tmp_path / "r", progress=False)


def test_the_multivae_pin_is_enforced(monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(B.library, "_LIB", {})      # the cache lives in the part that fills it
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    with pytest.raises(ImportError, match="pinned to multivae==1.0.3"):
        B.multivae_lib()


# Measured on this 2-core CPU (2026-11-26, best pair of 500 test tuples): MoPoE, MMVAE+, CoDE-VAE, HELVAE (with its
# private latents; without them it stays at chance, see its section in nbs/07b_baselines_written) and Diff-CMVAE's
# CMVAE pass after 4 minutes. MWB-VAE starts later: its best pair after 1..8 minutes of training was 0.156, 0.156,
# 0.164, 0.184, 0.290, 0.314, 0.352, 0.348 (and 0.152 or 0.202 after 4 minutes in other runs, under and over the 0.154
# the test needs), so it gets 7 minutes.
MINUTES = {"mwb": 7.0}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(B.BASELINES))
def test_minutes_of_training_beat_chance_coherence(key, tmp_path):
    """Trained for four minutes of this CPU (smoke widths; MWB-VAE seven), generating from one
    modality beats chance on at least one (source, target) pair by four binomial standard errors on 500 test tuples
    (chance 0.1; 20 pairs, so 4 rather than 3 standard errors keeps a chance pass below 1e-3)."""
    # Diff-CMVAE: its CMVAE alone (no refiner phase), whose samples are what the refiner conditions on
    cfg = B.baseline_profile(key, "smoke", iterations=100000, max_minutes=MINUTES.get(key, 4.0), vae_iterations=None)
    t, status = B.train_baseline(cfg, tmp_path / key, progress=False)
    assert status["state"] == "stopped"
    test = PolyMNIST(t.data_path, "test")
    clf = metrics.get_classifiers(t.data_path, progress=False)
    table = metrics.conditional_coherence(t.model.eval(), test, clf, n=500, progress=False, subsets=[(m,) for m in range(5)])
    assert table["coherence"].max() > 0.1 + 4 * math.sqrt(0.09 / 500), table


@pytest.mark.parametrize("key", list(B.BASELINES))
def test_every_baseline_takes_captions(key, tmp_path, monkeypatch):
    """On the CUB stand-in: a caption encoder and a categorical caption decoder from the data's modalities (multivae's
    categorical likelihood for MMVAE+, MoPoE and CMVAE), the loss falls over a few iterations, resume continues the
    same run, and generation gives caption logits from an image and an image from a caption. Diff-CMVAE: its refiner
    trains on the images after the CMVAE and leaves the caption as the CMVAE gave it."""
    monkeypatch.setenv("MMEBM_DATA_DIR", str(tmp_path / "data"))
    cfg = B.baseline_profile(key, "cub-tiny", data_limit=64, iterations=30, checkpoint_every=15,
                             **({"vae_iterations": 24} if key == "diff_cmvae" else {}))
    t, status = B.train_baseline(cfg.replace(iterations=15), tmp_path / key, progress=False)
    t, status = B.train_baseline(cfg, tmp_path / key, progress=False)
    assert status["state"] == "completed" and status["iteration"] == 30 and status["data"]["source"] == "cub-standin"
    assert t.cfg.modalities[1]["kind"] == "text" and B.baseline_config_hash(t.cfg) == status["config_hash"]
    log = pd.read_csv(tmp_path / key / "log.csv")
    loss = log[log.phase == "vae"]["loss"]
    assert loss.tail(5).mean() < loss.head(5).mean(), loss.tolist()
    (img, cap), _ = t.train_ds.get_batch(np.arange(3))
    torch.manual_seed(0)
    with torch.no_grad():
        out, back = t.model.eval().generate({0: img}), t.model.generate({1: cap})
    assert out[1].shape == cap.shape and out[0].shape == img.shape and back[0].shape == img.shape
    assert torch.isfinite(out[1]).all() and back[0].abs().max() <= 1
    if key == "diff_cmvae":
        assert (log.phase == "refiner").sum() == 6 and np.isfinite(log[log.phase == "refiner"]["loss"]).all()
        coarse = t.model.vae.generate({1: cap})
        refined = t.model.refine(coarse)
        assert torch.equal(refined[1], coarse[1]) and not torch.equal(refined[0], coarse[0])


def test_multivae_reads_a_caption_as_its_token_probabilities():
    """The adapter gives multivae softmax(logits) (its categorical likelihood multiplies the target by log-softmax) and
    gives our TextEncoder log p back, whose softmax is p: the caption expert sees what our own model's expert sees."""
    cub = [{"kind": "image", "size": 64, "channels": 3}, {"kind": "text", "vocab": 30, "length": 32}]
    torch.manual_seed(0)
    m = B.LibraryBaseline(B.baseline_profile("mopoe", "cub-tiny", modalities=cub), "mopoe")
    logits = torch.randn(4, 32, 30) * 3
    held = m._data({1: logits}).data
    assert torch.allclose(held["m1"], torch.softmax(logits, -1)) and held["m0"].shape == (4, 3, 64, 64)
    enc = m.net.encoders["m1"]
    assert torch.allclose(enc(held["m1"]).embedding, enc.net(logits)[0], atol=1e-5)
    # multivae's categorical log-likelihood of a caption is minus our categorical_nll
    from mmebm.nets import categorical_nll
    rec = torch.randn(4, 32, 30)
    lp = m.net.recon_log_probs["m1"](rec, held["m1"]).sum((1, 2))
    assert torch.allclose(-lp, categorical_nll(logits, rec), rtol=1e-4)


def test_old_baseline_run_ids_stay():
    # the fields added later (for CUB; private latents) are not hashed at their defaults: runs keep the ids they were
    # trained under (MWB-VAE's committed smoke run; HELVAE's before private latents became its setting)
    assert B.baseline_config_hash(B.baseline_profile("mwb", "smoke")) == "7831cdbc"
    plain = B.baseline_profile("helvae", "smoke", private_latents=False, beta_style=1.0)
    assert B.baseline_config_hash(plain) == "810b1d16"
    assert B.baseline_config_hash(B.baseline_profile("helvae", "smoke")) != "810b1d16"


@pytest.mark.parametrize("key", ["mopoe", "mmvae_plus", "helvae"])
def test_expost_sampler_fits_every_latent_space_of_a_baseline(key):
    """The ex-post sampler of the main table's rows (mmebm.metrics.ExPost) reads each baseline's own latents: the
    shared one, and MMVAE+'s modality-specific ones in mixtures of their own; its draws are fixed by torch's seed."""
    from mmebm.data import PolyMNIST
    from mmebm.datasets import data_path_of
    from mmebm.metrics import ExPost, kinds_of
    cfg = B.baseline_profile(key, "tiny")
    torch.manual_seed(0)
    model = B.build_baseline(cfg).eval()
    ep = ExPost(model, PolyMNIST(data_path_of(cfg), "train"), n_fit=60, components=2)
    styles = {f"m{m}": cfg.style_dim for m in range(5)} if key == "mmvae_plus" else {}
    assert ep.dims == {"z": cfg.latent_dim} | styles and kinds_of(ep) == ("generator",)
    torch.manual_seed(3); a = ep.sample(6)
    torch.manual_seed(3); b = ep.sample(6)
    assert [tuple(x.shape) for x in a] == [(6, 3, 28, 28)] * 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, ep.sample(6)))     # the next call draws anew
    with pytest.raises(ValueError, match="only a model with an EBM"):
        ep.sample(2, revised=True)
