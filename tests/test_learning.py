"""Does the method learn? A short CPU run must generate the right digit from a single modality far more often than
a model that always emits one digit. A test that passes when the model learns nothing is a defect: this one was
seen to fail on the settings the smoke profile used before the `cpu` profile existed (see nbs/05a_config)."""
import os

import numpy as np
import pytest
import torch

from mmebm.data import PolyMNIST
from mmebm.metrics import coherence_probe, constant_label_reference, get_classifiers
from mmebm.config import profile
from mmebm.train import Trainer
from mmebm.datasets import data_path_of

N_TEST = 500                  # test tuples scored
MARGIN = 0.05                 # how far above the constant-digit reference the run must be
# the `cpu` profile's settings at batch 32 for 250 iterations: 124-202 s with the probe on the 2-core CPU with nothing
# else of ours running (the machine's speed varies from run to run; 275 s with another job on the same cores); the
# issue asks for 3 minutes. The profile before s_z = 0.2 and
# lambda_S = 5 needed 400 iterations, and at 250 was seen at 0.187 against a threshold of 0.184; the current one at 200
# was 0.221 / 0.165 against 0.184 / 0.159: too close to cut
# (diagnostics off: they change nothing an iteration computes, see tests/test_method.py, and cost a few percent)
LEARN = dict(batch_size=32, iterations=250, probe_every=0, diagnostics=False)
# `MMEBM_LEARN_PROFILE=smoke pytest tests/test_learning.py` runs the same check on another profile's settings (the smoke
# profile's fail it: see nbs/05a_config)
PROFILE = os.environ.get("MMEBM_LEARN_PROFILE", "cpu")


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEBM_RUNS_DIR", str(tmp_path / "runs"))


def test_constant_digit_reference():
    assert constant_label_reference([3, 3, 3, 1]) == 0.75
    labels = PolyMNIST(data_path_of(profile("cpu")), "test").labels[:N_TEST]
    assert 0.1 <= constant_label_reference(labels) < 0.2      # ten digits, nearly balanced


@pytest.fixture(scope="module")
def classifiers():
    """The data set's coherence classifiers. In a fresh clone the first test that asks for them trains them (about
    2.5 CPU minutes): a set-up cost of the suite, which `--durations` then reports as this fixture's set-up rather than
    as part of the learning run."""
    return get_classifiers(data_path_of(profile(PROFILE)), progress=False)


def learned_coherence(cfg, tmp_path, classifiers):
    t = Trainer(cfg, tmp_path / "learn")
    status = t.fit(progress=False)
    assert status["state"] == "completed", status
    test = PolyMNIST(t.data_path, "test")
    torch.manual_seed(0)
    probe = coherence_probe(test, classifiers, n=N_TEST)(t.model.eval())
    return probe, constant_label_reference(test.labels[:N_TEST])


def test_a_short_cpu_run_is_coherent(tmp_path, classifiers):
    """About two CPU minutes of the `cpu` profile's settings: single-source coherence of the generator on 500 test
    tuples clears the constant-digit reference by a clear margin, from the latent chain and from the experts' means."""
    probe, reference = learned_coherence(profile(PROFILE, **LEARN), tmp_path, classifiers)
    print(f"{PROFILE}: {probe}; constant-digit reference {reference:.3f}")
    assert probe["probe_coh"] >= reference + MARGIN, (probe, reference)
    assert probe["probe_coh_mu"] >= reference + MARGIN / 2, (probe, reference)
