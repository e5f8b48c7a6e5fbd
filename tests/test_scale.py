"""Data parallelism with two real processes (gloo on CPU), and torch.compile with the code-generating backend.

The one-rank checks of every fast-path switch live in nbs/04b_scale.ipynb; here are the ones that need more
than one process, or minutes."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmebm import scale
from mmebm.model import MMEBM
from mmebm.revision import bound_losses

SMALL = dict(n_modalities=2, latent_dim=8, enc_width=8, enc_hidden=32, dec_width=8, ebm_width=8, ebm_feat=16,
             ebm_hidden=32, K_x=3, K_z=2)
B = 16


def fixed_step_inputs(model):
    "A global batch and its revised samples, drawn once from a fixed seed (the same on every rank)."
    g = torch.Generator().manual_seed(123)
    x = [torch.rand(B, 3, 28, 28, generator=g) * 2 - 1 for _ in range(2)]
    z = torch.randn(B, model.generator.latent_size, generator=g)
    x_rev = [t + 0.05 * torch.randn(t.shape, generator=g) for t in x]
    z_rev = torch.randn(B, model.generator.latent_size, generator=g)
    return x, z, x_rev, z_rev


def one_update(losses, model, x, z, x_rev, z_rev):
    "One SGD step of each model on its loss; each model's update (after minus before)."
    before = {k: [p.detach().clone() for p in getattr(model, k).parameters()] for k in ("generator", "inference", "ebm")}
    calls = {"generator": ("G", (x, z_rev, z, x_rev, 50.0)), "inference": ("I", (x, z_rev, z, x_rev, 0.1)),
             "ebm": ("E", (x, x_rev, True))}
    for name, (key, args) in calls.items():
        net = getattr(model, name)
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        opt.zero_grad()
        losses[key](*args).backward()
        opt.step()
    return {k: torch.cat([(p.detach() - b).flatten() for p, b in zip(getattr(model, k).parameters(), before[k])])
            for k in before}


def _rank_update(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MMEBM(**SMALL)
        x, z, x_rev, z_rev = fixed_step_inputs(model)
        r = scale.ranks()
        mine = lambda ts: scale.shard(ts, r)
        upd = one_update(scale.ddp_losses(model, torch.device("cpu")), model, mine(x), mine([z])[0], mine(x_rev),
                         mine([z_rev])[0])
        torch.save(upd, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_make_the_update_of_one_process_on_the_global_batch(tmp_path):
    "Given the same revised samples, two gloo ranks on halves of the batch update every model as one process on all of it."
    torch.manual_seed(0)
    model = MMEBM(**SMALL)
    ref = one_update(bound_losses(model), model, *fixed_step_inputs(model))
    mp.spawn(_rank_update, args=(2, str(tmp_path / "init"), str(tmp_path / "upd")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"upd.{r}") for r in range(2)]
    for k in ref:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k}: the ranks disagree"
        err = float((ranks[0][k] - ref[k]).norm() / ref[k].norm())
        assert err < 1e-4, f"{k}: relative difference {err:.1e} from one process"
    # and the check can fail: one rank alone (half the batch) is a different update
    half = one_update(bound_losses(model), model, *[t[:B // 2] if torch.is_tensor(t) else [u[:B // 2] for u in t]
                                                     for t in fixed_step_inputs(model)])
    assert float((half["ebm"] - ref["ebm"]).norm() / ref["ebm"].norm()) > 1e-2


def torchrun(args, env, nproc=2, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "mmebm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow     # minutes of CPU in CI's 15-minute budget: run with --run-slow / MMEBM_SLOW=1 (and on a GPU session)
def test_torchrun_two_processes_train_resume_and_stay_in_sync(tmp_path):
    "`torchrun --nproc-per-node 2 -m mmebm train`: one run directory, rank-0 files, ranks in sync, exact resume."
    env = os.environ | {"MMEBM_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    r = torchrun(["train", "--profile", "tiny", "--iterations", "4", "--device", "cpu", "--quiet"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-2ranks"), runs
    run = runs[0]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["ranks"] == 2 and status["ranks_in_sync"] is True
    log = (run / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 4 and log[0].startswith("iteration"), "rank 0 alone writes the log, once per iteration"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.yaml", "log.csv", "status.json"]
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    assert not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"]), "ranks draw their own chain noise"

    # resume to 6 iterations: the same as training 6 in one go (every rank's random state was kept)
    r = torchrun(["train", "--resume", str(run), "--iterations", "6", "--quiet"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env2 = env | {"MMEBM_RUNS_DIR": str(tmp_path / "runs2")}
    r = torchrun(["train", "--profile", "tiny", "--iterations", "6", "--device", "cpu", "--quiet"], env2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one_go = next((tmp_path / "runs2").iterdir())
    a = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(one_go / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a two-rank checkpoint does not resume on one process (its chains would be another run)
    r = subprocess.run([sys.executable, "-m", "mmebm", "train", "--resume", str(run), "--iterations", "8", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "rank" in (r.stdout + r.stderr)


@pytest.mark.slow
def test_inductor_compile_matches_eager_on_cpu():
    "torch.compile with the code-generating backend (inductor, C++ on CPU): the same iteration within fp32 tolerance."
    err = scale.switch_errors(scale.switch_step(compile="inductor"), scale.switch_step())
    assert all(err[k] <= 1e-4 for k in ("loss_G", "loss_I", "loss_E", "E_data")), err


@pytest.mark.slow     # minutes of CPU in CI's 15-minute budget: run with --run-slow / MMEBM_SLOW=1 (and on a GPU session)
def test_the_gpu_session_script_dry_runs_on_cpu_and_continues_its_training(tmp_path):
    """reproduce/gpu_session.sh (issue 8's prepared GPU command) with PROFILE=tiny on this CPU: the benchmark plain and
    with a switch, a training chunk, then a second command that continues that run and scores it."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"OUT": str(tmp_path / "out"), "PROFILE": "tiny", "FAST_SET": "channels_last=true",
                        "TRAIN_SET": "channels_last=true", "TRAIN_ITERATIONS": "3",
                        "TRAIN_MINUTES": "5", "MMEBM_RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable}
    run = lambda e, *stages: subprocess.run(["bash", str(root / "reproduce" / "gpu_session.sh"), *stages], env=e,
                                            capture_output=True, text=True, timeout=900)
    r = run(env, "bench", "train")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["run.tar.gz", "session.txt", "tiny-cpu-fast.csv", "tiny-cpu-fast.txt",
                                                      "tiny-cpu.csv", "tiny-cpu.txt"]
    session = (out / "session.txt").read_text()
    assert "device: no CUDA" in session and "done (exit 0" in session and '"iteration": 3' in session
    assert "channels_last" in (out / "tiny-cpu-fast.txt").read_text()
    # a second command on the same machine continues the run and scores it; the packed run has its metrics
    r = run(env | {"OUT": str(tmp_path / "out2"), "TRAIN_ITERATIONS": "5", "EVAL_N": "50"}, "train", "evaluate")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"iteration": 5' in (tmp_path / "out2" / "session.txt").read_text()
    with tarfile.open(tmp_path / "out2" / "run.tar.gz") as tar:
        names = sorted(Path(n).name for n in tar.getnames())
    assert names == ["config.yaml", "log.csv", "metrics.csv", "metrics.json", "status.json"], names
    assert run(env, "nonsense").returncode == 2


# The one expected-failure test of the open bf16 defect (nbs/04b_scale measures it and shows its source: the
# generator's bf16 forward of the chains' initialiser); tests/test_gpu.py has its CUDA counterpart.
@pytest.mark.xfail(strict=True, reason="open defect (nbs/04b_scale): bf16 autocast moves the EBM update by ~1.1 relative, "
                                       "another minibatch by ~0.25; a pass means the defect is fixed: drop this mark")
def test_bf16_autocast_keeps_the_ebm_update_within_minibatch_noise():
    plain = scale.switch_step()
    err = scale.switch_errors(scale.switch_step(amp=True), plain)["update_ebm"]
    batches = scale.switch_errors(scale.switch_step(batch_seed=1), plain)["update_ebm"]
    assert err < batches
