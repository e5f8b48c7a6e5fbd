"""The method: the two kernels against known answers, gradient routing, the ablation switches, resume,
the divergence guard, and learning on the offline PolyMNIST."""
import csv
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mmebm.langevin import langevin_x, langevin_z, temperature
from mmebm.model import MMEBM
from mmebm.revision import RevisionStep, ebm_loss, generator_loss, inference_loss, grad_norm
from mmebm.config import Config, profile, config_hash
from mmebm.train import Trainer, train, quick_checks
from mmebm.bench import benchmark
from mmebm.data import PolyMNIST

TINY = dict(latent_dim=8, enc_width=4, enc_hidden=16, dec_width=4, ebm_width=4, ebm_feat=8, ebm_hidden=16, K_x=3, K_z=2)


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEBM_RUNS_DIR", str(tmp_path / "runs"))


# ---------------------------------------------------------------- kernels against known answers
@pytest.mark.parametrize("step,noise", [(0.2, 0.2), (0.2, 0.1), (0.3, 0.06)])
def test_data_kernel_samples_the_tempered_gaussian(step, noise):
    "E(x) = (x - mu)^T P (x - mu) / 2 over two modalities; Langevin targets exp(-E/T): mean mu, covariance T P^-1."
    torch.manual_seed(0)
    mu = [torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.0])]
    A = torch.tensor([[1.0, 0.3, 0.0, 0.2], [0.3, 1.5, 0.1, 0.0], [0.0, 0.1, 0.8, -0.2], [0.2, 0.0, -0.2, 1.2]])
    def energy(xs):
        d = torch.cat([xs[0] - mu[0], xs[1] - mu[1]], 1)
        return 0.5 * ((d @ A) * d).sum(1)
    T = temperature(step, noise)
    r = langevin_x(energy, [torch.zeros(6000, 2), torch.zeros(6000, 2)], n_steps=int(60 / step ** 2), step_size=step, noise=noise)
    x = torch.cat(r.samples, 1)
    target_cov = T * torch.linalg.inv(A)
    # tolerance: 4 standard errors of the mean plus discretisation bias (O(step^2) relative)
    assert torch.allclose(x.mean(0), torch.cat(mu), atol=4 * math.sqrt(target_cov.diag().max() / 6000) + 0.01)
    rel = (torch.cov(x.T) - target_cov).abs().max() / target_cov.abs().max()
    assert rel < 0.08, (torch.cov(x.T), target_cov)


def test_data_kernel_clamps_observed_modalities():
    energy = lambda xs: sum((x ** 2).flatten(1).sum(1) for x in xs)
    x0 = [torch.ones(4, 3, 2, 2), torch.ones(4, 3, 2, 2) * 2]
    r = langevin_x(energy, x0, n_steps=5, observed=[0])
    assert torch.equal(r.samples[0], x0[0]) and (r.samples[1] < 2).all()


def test_latent_kernel_matches_the_exact_linear_gaussian_posterior():
    "g(z) = W z + b for two observed modalities; the posterior of a linear-Gaussian model is exact."
    torch.manual_seed(1)
    W = [torch.randn(5, 3) * 0.7, torch.randn(4, 3) * 0.7]
    b = [torch.randn(5), torch.randn(4)]
    sigma = 0.8
    x = {0: torch.randn(1, 5).expand(5000, 5), 1: torch.randn(1, 4).expand(5000, 4)}
    decode = lambda z, mods: [z @ W[m].T + b[m] for m in mods]
    prec = torch.eye(3) + sum(W[m].T @ W[m] for m in (0, 1)) / sigma ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ sum(W[m].T @ (x[m][0] - b[m]) for m in (0, 1)) / sigma ** 2
    r = langevin_z(decode, torch.randn(5000, 3), x, n_steps=1500, step_size=0.1, noise=0.1, sigma=sigma)
    z = r.samples[0]
    assert (z.mean(0) - mean).abs().max() < 0.03, (z.mean(0), mean)
    assert ((torch.cov(z.T) - cov).abs().max() / cov.abs().max()) < 0.08, (torch.cov(z.T), cov)
    # and only the observed subset counts: with modality 1 dropped the posterior changes
    r1 = langevin_z(decode, torch.randn(5000, 3), {0: x[0]}, n_steps=1500, step_size=0.1, noise=0.1, sigma=sigma)
    cov0 = torch.linalg.inv(torch.eye(3) + W[0].T @ W[0] / sigma ** 2)
    assert ((torch.cov(r1.samples[0].T) - cov0).abs().max() / cov0.abs().max()) < 0.08


def test_kernel_trajectory_and_energies():
    torch.manual_seed(0)
    model = MMEBM(**TINY).eval()
    x0 = model.sample(3)
    r = model.revise_x(x0, K=6, record=True, record_every=2)
    assert r.steps == [0, 2, 4, 6] and len(r.trajectory) == 4 and r.energies.shape == (7, 3)
    assert all(torch.equal(a, b) for a, b in zip(r.trajectory[0], x0))
    assert torch.allclose(r.energies[0], model.ebm.energy(x0).detach())
    assert all(torch.allclose(a, b) for a, b in zip(r.trajectory[-1], r.samples))


# ---------------------------------------------------------------- gradient routing
def test_each_loss_reaches_only_its_model_and_no_gradient_enters_a_chain():
    torch.manual_seed(0)
    model = MMEBM(**TINY)
    x = [torch.rand(6, 3, 28, 28) * 2 - 1 for _ in range(5)]
    z = model.generator.prior(6)
    x0 = model.generator.decode(z)                         # carries the generator's graph
    res_x = model.revise_x(x0)
    res_z = model.infer(dict(enumerate(x)))
    assert not any(t.requires_grad for t in res_x.samples + res_z.samples)
    assert all(p.grad is None for p in model.parameters())  # running the kernels writes no .grad
    for name, loss in [("generator", generator_loss(model, x, res_z.samples[0], z, res_x.samples)),
                       ("inference", inference_loss(model, x, res_z.samples[0], z, res_x.samples)),
                       ("ebm", ebm_loss(model, x, res_x.samples))]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        norms = {n: grad_norm(getattr(model, n).parameters()) for n in ("ebm", "generator", "inference")}
        assert norms[name] > 0 and all(v == 0 for n, v in norms.items() if n != name), (name, norms)


def test_revision_step_updates_each_model_once():
    torch.manual_seed(0)
    model = MMEBM(**TINY)
    opts = [torch.optim.SGD(getattr(model, n).parameters(), lr=1e-3) for n in ("ebm", "generator", "inference")]
    before = {n: [p.detach().clone() for p in getattr(model, n).parameters()] for n in ("ebm", "generator", "inference")}
    log = RevisionStep(model, *opts)([torch.rand(4, 3, 28, 28) * 2 - 1 for _ in range(5)])
    for n, ps in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(ps, getattr(model, n).parameters())), n


# ---------------------------------------------------------------- ablation switches
def tiny_cfg(**kw):
    return profile("tiny", iterations=3, **kw)


@pytest.mark.parametrize("switch", [dict(latent="independent"), dict(inference="independent"), dict(ebm_init="noise"),
                                    dict(moe_init="stratified"), dict(temper=False), dict(resample_after_g=False),
                                    dict(likelihood="laplace"), dict(K_x=0, K_z=0)])
def test_every_switch_builds_and_trains(switch):
    t, status = train(tiny_cfg(**switch), progress=False)
    assert status["state"] == "completed" and status["iteration"] == 3
    log = pd.read_csv(t.run_dir / "log.csv")
    assert len(log) == 3 and np.isfinite(log[["loss_E", "loss_G", "loss_I"]].values).all()


def test_independent_latents_are_independent_per_modality():
    torch.manual_seed(0)
    m = MMEBM(latent="independent", **TINY)
    z = m.generator.prior(4)
    assert z.shape == (4, 5 * 8)
    for k in range(5):
        z2 = z.clone(); z2[:, k * 8:(k + 1) * 8] = torch.randn(4, 8)
        changed = [not torch.equal(a, b) for a, b in zip(m.decode(z), m.decode(z2))]
        assert changed == [j == k for j in range(5)]
    shared = MMEBM(**TINY)
    z = shared.generator.prior(4); z2 = z + 0.5
    assert all(not torch.equal(a, b) for a, b in zip(shared.decode(z), shared.decode(z2)))


def test_independent_inference_chains_see_only_their_own_modality():
    m = MMEBM(inference="independent", **TINY)
    x = [torch.rand(4, 3, 28, 28) * 2 - 1 for _ in range(2)]
    torch.manual_seed(0); a = m.infer({0: x[0], 1: x[1]}).samples[0]
    torch.manual_seed(0); b = m.infer({0: x[0], 1: torch.zeros_like(x[1])}).samples[0]
    assert a.shape == (8, 8)
    assert torch.equal(a[:4], b[:4]) and not torch.equal(a[4:], b[4:])   # chain 0 ignores modality 1
    moe = MMEBM(**TINY)
    torch.manual_seed(0); a = moe.infer({0: x[0], 1: x[1]}).samples[0]
    torch.manual_seed(0); b = moe.infer({0: x[0], 1: torch.zeros_like(x[1])}).samples[0]
    assert not torch.equal(a, b)                                           # the MoE chain aggregates


def test_noise_init_stratified_temper_and_resample_switches():
    x = [torch.rand(4, 3, 28, 28) * 2 - 1 for _ in range(5)]
    torch.manual_seed(0)
    noise = MMEBM(ebm_init="noise", **TINY)
    z = noise.generator.prior(4)
    x0 = noise.initial_x(z)
    assert all(-1 <= t.min() and t.max() <= 1 for t in x0) and not torch.allclose(x0[0], noise.decode(z)[0], atol=0.1)
    zero = MMEBM(**(TINY | dict(K_x=0)))
    assert all(torch.equal(a, b) for a, b in zip(zero.revise_x(x).samples, x))
    m = MMEBM(**TINY).eval()   # eval: the two loss evaluations below must see the same spectral norms
    x_rev = [t + 0.1 for t in x]
    assert ebm_loss(m, x, x_rev, temper=True).item() == pytest.approx(ebm_loss(m, x, x_rev, temper=False).item() / m.T, rel=1e-4)
    m.train()
    for resample, calls_expected in [(True, 2), (False, 1)]:
        calls = []
        orig = m.revise_x
        m.revise_x = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
        opts = [torch.optim.SGD(getattr(m, n).parameters(), lr=0) for n in ("ebm", "generator", "inference")]
        RevisionStep(m, *opts, resample_after_g=resample)(x)
        del m.revise_x
        assert len(calls) == calls_expected


def test_stratified_initialiser_draws_each_row_block_from_its_own_expert():
    "moe_init='stratified': rows k B .. (k + 1) B - 1 are expert k's draws; random_expert takes one expert's draw per row."
    from mmebm.model import MoEInference
    torch.manual_seed(0)
    inf = MoEInference(latent_dim=8, width=4, hidden=16)
    x = dict(enumerate(torch.rand(4, 3, 28, 28) * 2 - 1 for _ in range(5)))
    ex = inf.experts(x)                                   # deterministic: the same means and variances every call
    def draws(seed):                                      # each expert's draw, made as the sampler makes them
        torch.manual_seed(seed)
        return [mu + torch.exp(0.5 * lv) * torch.randn_like(mu) for mu, lv in ex.values()]
    torch.manual_seed(7); z, mu = inf.sample(x, "stratified", return_mean=True)
    expect = draws(7)
    assert z.shape == (20, 8)
    for k in range(5):
        assert torch.equal(z[4 * k:4 * (k + 1)], expect[k]) and torch.equal(mu[4 * k:4 * (k + 1)], ex[k][0]), k
    torch.manual_seed(7); mixed = inf.sample(x, "random_expert")
    owner = [[k for k in range(5) if torch.equal(mixed[i], expect[k][i])] for i in range(4)]
    assert all(len(o) == 1 for o in owner), owner   # each row is one expert's draw for its own example


def test_likelihood_and_lambda_switches_change_the_losses_as_documented():
    "Laplace: sum |x - g| / sigma (Gaussian: sum (x - g)^2 / 2 sigma^2); lambda_S and lambda_I weigh the revised-sample terms."
    torch.manual_seed(0)
    x = [torch.rand(3, 3, 28, 28) * 2 - 1 for _ in range(5)]
    z = torch.randn(3, 8); z_rev = torch.randn(3, 8)
    x_rev = [t + 0.05 * torch.randn_like(t) for t in x]
    for kind in ("gaussian", "laplace"):
        torch.manual_seed(1); m = MMEBM(likelihood=kind, sigma=0.5, **TINY)
        g = m.decode(z_rev)
        expect = sum(((a - b).abs().sum((1, 2, 3)) / 0.5 if kind == "laplace" else (a - b).pow(2).sum((1, 2, 3)) / (2 * 0.25))
                     for a, b in zip(x, g))
        assert torch.allclose(m.generator.neg_log_lik(dict(enumerate(x)), z_rev), expect, rtol=1e-5), kind
    torch.manual_seed(1); m = MMEBM(**TINY)
    base = generator_loss(m, x, z_rev, z, x_rev, lambda_S=0.0).item()
    catch_up = m.generator.neg_log_lik(dict(enumerate(x_rev)), z).mean().item()
    assert generator_loss(m, x, z_rev, z, x_rev, lambda_S=50.0).item() == pytest.approx(base + 50 * catch_up, rel=1e-5)
    i_base = inference_loss(m, x, z_rev, z, x_rev, lambda_I=0.0).item()
    i_term = -m.inference.log_q(z, dict(enumerate(x_rev))).mean().item()
    assert inference_loss(m, x, z_rev, z, x_rev, lambda_I=0.1).item() == pytest.approx(i_base + 0.1 * i_term, rel=1e-5)


# ---------------------------------------------------------------- checkpoints, resume, divergence
def test_resume_continues_exactly(tmp_path):
    cfg = profile("tiny", iterations=6, checkpoint_every=3)
    straight, _ = train(cfg, tmp_path / "straight", progress=False)
    half, st = train(cfg.replace(iterations=3), tmp_path / "halves", progress=False)
    assert st["iteration"] == 3
    resumed, st = train(cfg, tmp_path / "halves", progress=False)
    assert st["iteration"] == 6
    a, b = pd.read_csv(straight.run_dir / "log.csv"), pd.read_csv(resumed.run_dir / "log.csv")
    cols = ["loss_E", "loss_G", "loss_I", "E_data", "E_init", "E_revised", "grad_E", "grad_G", "grad_I"]
    assert len(a) == len(b) == 6
    assert (a[cols].values == b[cols].values).all()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_time_budget_stops_with_a_checkpoint_and_resumes(tmp_path):
    t, st = train(profile("tiny", iterations=50, max_minutes=1e-5), tmp_path / "r", progress=False)
    assert st["state"] == "stopped" and 1 <= st["iteration"] < 50 and (t.run_dir / "checkpoint.pt").exists()
    t2 = Trainer.resume(t.run_dir, max_minutes=None, iterations=st["iteration"] + 2)
    assert t2.iteration == st["iteration"] and t2.fit(progress=False)["iteration"] == st["iteration"] + 2


def test_divergence_stops_cleanly_names_the_model_and_keeps_the_last_good_checkpoint(tmp_path):
    # An EBM learning rate of 1e4 sends the energies (and |L_E T|) past the guard within a few iterations.
    cfg = profile("tiny", iterations=60, checkpoint_every=1, lr_E=1e4, sn_head=False)
    t, st = train(cfg, tmp_path / "boom", progress=False)
    assert st["state"] == "diverged" and st["diverged_model"] == "EBM", st
    good = Trainer.resume(t.run_dir)
    assert good.iteration == st["iteration"]
    assert all(torch.isfinite(p).all() for p in good.model.parameters())
    log = pd.read_csv(t.run_dir / "log.csv")
    assert len(log) == st["iteration"] and (log["loss_E_times_T"].abs() <= cfg.guard_threshold).all()


@pytest.mark.parametrize("part,name", [("G", "generator"), ("I", "inference model")])
def test_a_diverging_generator_or_inference_model_is_named_and_the_last_good_checkpoint_loads(part, name, tmp_path):
    "Its loss turns NaN at the fifth iteration: the run stops there, names the model, and its checkpoint of iteration 4 loads."
    t = Trainer(profile("tiny", iterations=10, checkpoint_every=2), tmp_path / "r")
    real, calls = t.step.loss[part], []
    def blow_up(*a, **k):
        calls.append(1); out = real(*a, **k)
        return out * float("nan") if len(calls) == 5 else out
    t.step.loss[part] = blow_up
    st = t.fit(progress=False)
    assert st["state"] == "diverged" and st["diverged_model"] == name and st["iteration"] == 4, st
    assert st["last_good_checkpoint"] == str(t.run_dir / "checkpoint.pt")
    good = Trainer.resume(t.run_dir)
    assert good.iteration == 4 and all(torch.isfinite(p).all() for p in good.model.parameters())
    assert list(pd.read_csv(t.run_dir / "log.csv")["iteration"]) == [1, 2, 3, 4]


def test_resume_refuses_to_change_what_a_run_computes(tmp_path):
    t, _ = train(profile("tiny", iterations=1), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="budget"):
        Trainer.resume(t.run_dir, K_x=7)
    with pytest.raises(ValueError, match="another config"):
        train(profile("tiny", iterations=2, K_x=7), tmp_path / "r", progress=False)


# ---------------------------------------------------------------- learning happens
def test_the_log_records_the_learning_diagnostics_and_the_probe_without_changing_training(tmp_path):
    "Every iteration logs the diagnostics; the probe fills its columns every probe_every iterations and draws no training randomness."
    calls = []
    def probe(model):
        calls.append(torch.rand(1).item())      # consumes random numbers: the trainer must fork the stream around it
        return {"probe_coh": 0.5, "probe_coh_mu": 0.25, "probe_uncond": 0.125}
    with_probe = Trainer(profile("tiny", iterations=6, probe_every=2), tmp_path / "a", probe=probe)
    with_probe.fit(progress=False)
    plain = Trainer(profile("tiny", iterations=6), tmp_path / "b"); plain.fit(progress=False)
    a, b = pd.read_csv(tmp_path / "a" / "log.csv"), pd.read_csv(tmp_path / "b" / "log.csv")
    assert len(calls) == 3 and list(a["probe_coh"].notna()) == [False, True] * 3 and b["probe_coh"].isna().all()
    train_cols = ["loss_E", "loss_G", "loss_I", "E_data", "z0_norm", "zrev_norm", "U_init", "U_revised", "rec_z_0", "x_move", "grad_x"]
    assert a[train_cols].equals(b[train_cols])
    assert (a["U_revised"] < a["U_init"]).all() and np.allclose(a["x_noise_floor"], 1e-3 * math.sqrt(3) * math.sqrt(2 / math.pi))
    assert ((a["x_move"] > 0.5 * a["x_noise_floor"]) & (a["rec_mu_4"] > 0)).all()


# ---------------------------------------------------------------- benchmark and command line
def test_benchmark_reports_every_part():
    tb = benchmark(profile("tiny"), repeats=1, warmup=0)
    parts = list(tb.part)
    assert parts[:2] == ["langevin_x (3 steps)", "langevin_z (2 steps)"] and parts[-2:] == ["iteration", "sum of parts"]
    # the summary rows are what the parts add up to (the data-space chain counted twice: before G and after it)
    secs = dict(zip(tb.part, tb.seconds)); counts = dict(zip(tb.part, tb["count"]))
    parts_only = [k for k in secs if k not in ("iteration", "sum of parts")]
    assert counts["langevin_x (3 steps)"] == 2 and (tb.seconds > 0).all()
    assert secs["sum of parts"] == pytest.approx(sum(secs[k] * counts[k] for k in parts_only))
    assert tb.attrs["ratio"] == pytest.approx(secs["iteration"] / secs["sum of parts"])


def test_cli_train_resume_and_bench(tmp_path):
    import subprocess, sys, os
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("mmebm"))
    env = os.environ | {"MMEBM_RUNS_DIR": str(tmp_path)}
    r = subprocess.run([exe, "train", "--profile", "tiny", "--iterations", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "completed at iteration 2/2" in r.stdout, r.stderr
    run = next(tmp_path.iterdir())
    assert (run / "config.yaml").exists() and (run / "status.json").exists()
    r = subprocess.run([exe, "train", "--resume", str(run), "--iterations", "4", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "completed at iteration 4/4" in r.stdout, r.stderr
    r = subprocess.run([exe, "bench", "--profile", "tiny", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "whole / sum of parts" in r.stdout and "E update" in r.stdout, r.stderr
    r = subprocess.run([exe, "train", "--profile", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "unknown profile" in r.stderr


def test_a_fresh_run_starts_its_log_afresh(tmp_path):
    "A log left by a process killed before its first checkpoint (here: empty, no header) is replaced, not appended to."
    run = tmp_path / "stale"; run.mkdir()
    (run / "log.csv").write_text("")
    Trainer(profile("tiny", iterations=4), run).fit(progress=False)
    log = pd.read_csv(run / "log.csv")
    assert list(log["iteration"]) == [1, 2, 3, 4] and "loss_G" in log.columns


def test_committed_runs_keep_their_config_hash():
    "Every committed run of ours hashes, at HEAD, to the hash its status recorded (fields added later stay out at their defaults)."
    import json, yaml
    from pathlib import Path
    from mmebm.config import load_config
    runs = [d for d in (Path(__file__).resolve().parent.parent / "results").glob("*/runs/*")
            if (d / "status.json").exists() and "model" not in (yaml.safe_load((d / "config.yaml").read_text()) or {})]
    assert len(runs) >= 10
    for d in runs:
        assert config_hash(load_config(d / "config.yaml")) == json.loads((d / "status.json").read_text())["config_hash"], d
