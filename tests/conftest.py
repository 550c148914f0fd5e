import os
import shutil
import sys

import pytest
from helpers import ROOT, gpu_available


def pytest_configure(config):
    """Run under a fixed string hash seed: Gemma-3's forward computes its rotary tables in the order of a set of layer
    kinds, so the order of those ops in its IR (not their sizes or signatures) follows the seed, and its golden was
    written under seed 0."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_ir_cache(tmp_path_factory):
    """Compiled IRs are cached per test session, never in the user's home."""
    import os

    os.environ["DOOLY_CACHE"] = str(tmp_path_factory.mktemp("dooly-cache"))


@pytest.fixture(scope="session")
def shipped(tmp_path_factory):
    """A copy of the shipped H100 store: fitting writes its models beside the store, never into data/."""
    path = tmp_path_factory.mktemp("shipped") / "h100.sqlite"
    shutil.copy(ROOT / "data" / "h100.sqlite", path)
    return path
