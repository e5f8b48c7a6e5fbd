"""The fast path on CUDA (issue 8): each switch of `Config` against the plain path on the GPU, and one training
iteration of the paper profile through the CLI. Marked `gpu`: skipped where there is no CUDA (CI, this CPU machine);
`reproduce/gpu_session.sh` runs them on a lent GPU. The same checks run on CPU in nbs/04b_scale.ipynb.

Tolerances: the plain path is the float32 reference with TF32 off (cuDNN and matmuls would otherwise round to 10
bits of mantissa on both sides, differently per algorithm); channels-last and inductor are the same arithmetic
reordered, so fp32 tolerance, looser than on CPU by the GPU's reduction orders; bf16 as in 04b_scale: the generator's
and inference model's losses and updates within a few percent; the EBM's update is an open defect on CPU (bf16 moves
it beyond minibatch noise; its source, the generator's bf16 forward, is shown there), expected to fail here too
(strict xfail)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmebm import scale

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def float32_reference():
    "TF32 off for the comparisons (restored afterwards)."
    keep = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = keep


def report(name, err):
    print(name, {k: f"{v:.1e}" for k, v in err.items()})     # pytest -s shows the measured differences


@pytest.mark.parametrize("switch", [dict(channels_last=True), dict(compile="inductor"), dict(channels_last=True, compile="inductor")],
                         ids=["channels_last", "inductor", "channels_last+inductor"])
def test_a_reordering_switch_keeps_fp32_results_on_cuda(switch):
    plain = scale.switch_step(device="cuda")
    err = scale.switch_errors(scale.switch_step(device="cuda", **switch), plain)
    report(switch, err)
    assert max(err[k] for k in scale.SWITCH_KEYS) < 1e-3 and max(v for k, v in err.items() if k.startswith("update_")) < 1e-2, err


def test_the_plain_path_repeats_on_cuda():
    "Two plain steps from one seed agree (up to cuDNN's non-deterministic reductions): the reference is a reference."
    err = scale.switch_errors(scale.switch_step(device="cuda"), scale.switch_step(device="cuda"))
    report("plain again", err)
    assert max(err.values()) < 1e-3, err


def test_bf16_autocast_on_cuda_keeps_the_generator_and_inference_updates():
    plain = scale.switch_step(device="cuda")
    err = scale.switch_errors(scale.switch_step(device="cuda", amp=True), plain)
    report("bf16", err)
    assert err["loss_G"] < 5e-2 and err["loss_I"] < 5e-2
    assert err["update_generator"] < 5e-2 and err["update_inference"] < 5e-2, err


@pytest.mark.xfail(strict=True, reason="open defect (nbs/04b_scale): on CPU bf16 moves the EBM update by ~1.1 relative, "
                                       "another minibatch by ~0.25; an unexpected pass on CUDA fails here, to be looked at")
def test_bf16_autocast_on_cuda_keeps_the_ebm_update_within_minibatch_noise():
    plain = scale.switch_step(device="cuda")
    err = scale.switch_errors(scale.switch_step(device="cuda", amp=True), plain)["update_ebm"]
    batches = scale.switch_errors(scale.switch_step(device="cuda", batch_seed=1), plain)["update_ebm"]
    report("bf16 EBM", {"bf16": err, "another batch": batches})
    assert err < batches


def test_paper_profile_trains_two_iterations_through_the_cli_with_the_fast_path(tmp_path):
    "`mmebm train --profile paper` with every switch on: it runs, and its status names the GPU."
    env = os.environ | {"MMEBM_RUNS_DIR": str(tmp_path / "runs")}
    r = subprocess.run([sys.executable, "-m", "mmebm", "train", "--profile", "paper", "--iterations", "2", "--quiet",
                        "--set", "amp=true", "channels_last=true", "compile=inductor"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["iteration"] == 2 and not status["device"].startswith("CPU"), status
