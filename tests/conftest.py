"""Shared fixtures. Slow tests run with `--run-slow` (or MMEBM_SLOW=1); GPU tests only where CUDA exists."""
import os
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("MMEBM_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or MMEBM_SLOW=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def small_build(tmp_path_factory):
    "A reduced offline build (first 200 tuples of each split), shared by the data tests."
    from mmebm.data import build_polymnist
    return build_polymnist(tmp_path_factory.mktemp("cache"), seed=0, limit=200, progress=False)
