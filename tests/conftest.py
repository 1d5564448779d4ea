"""Test session set-up.

The whole session runs offline against a real, empty Hugging Face cache and torch.hub cache in a
temporary folder (tests that need released files place them exactly where a download would). These
variables must be set before huggingface_hub is imported, hence at the top of conftest.
"""

import os
import shutil
import sys
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="metaformer-tests-")
os.environ["HF_HOME"] = os.path.join(_CACHE_ROOT, "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TORCH_HOME"] = os.path.join(_CACHE_ROOT, "torch")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("METAFORMER_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (README's `-n 2`) each worker has one intra-op thread, and so do the commands its tests
    # start: two workers on two cores with two OpenMP threads each spin at each other's barriers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The test files that share helpers.built_model's session-wide models (all 33 and their backbones: 4.8 GiB of
# weights). Under README's `-n 2 --dist loadfile` they run as one unit in one worker, so that only one worker
# builds and holds them: as separate files, both workers did (the machine peaked at 18-19 GB, against 14).
SHARED_MODEL_FILES = ("test_models.py", "test_parity.py", "test_surface.py")

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # pytest-xdist is not installed: one process, one cache
    pass
else:
    class _SharedModelsScheduling(LoadFileScheduling):
        """``--dist loadfile``, with the files of :data:`SHARED_MODEL_FILES` as one work unit."""

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "shared built models" if os.path.basename(scope) in SHARED_MODEL_FILES else scope

    @pytest.hookimpl(optionalhook=True)  # xdist installed but off (`-p no:xdist`): no such hook to validate
    def pytest_xdist_make_scheduler(config, log):
        return _SharedModelsScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_folded_weights_left():
    """Each test leaves no folded weights behind. The evaluation fast paths keep a folded copy of the
    weights of every model they ran (``metaformer.kernels.cache``), for as long as the model lives, and
    the shared models of ``helpers.built_model`` live all session: their copies took it to 17 GB."""
    yield
    from metaformer.kernels.cache import clear_cache

    clear_cache()


@pytest.fixture(scope="session")
def cache_root():
    """The session's temporary cache folder (HF_HOME and TORCH_HOME live under it)."""
    return _CACHE_ROOT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The small digits image folder of the command-line tests (one per test module; a module may define its own)."""
    from cli_utils import make_data

    return make_data(str(tmp_path_factory.mktemp("tiny")))
