"""Shared fixtures. vLLM on CPU costs ~40 s per engine start, so integration tests share one
engine for the whole session (`engine`) and only the tests that must exercise process
boundaries (kill -9, the CLI, Slurm) start their own."""
from __future__ import annotations

import shutil

import pytest

# the one rule for skips (IVB_NO_SKIP, the gpu and cpu_only markers): tests/no_skip.py
from tests.no_skip import (pytest_collection_modifyitems, pytest_configure,  # noqa: F401
                           pytest_make_collect_report, pytest_runtest_makereport,
                           pytest_terminal_summary)


def _has_vllm() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except Exception:
        return False


HAS_VLLM = _has_vllm()
needs_vllm = pytest.mark.skipif(not HAS_VLLM,
                                reason="vLLM is not installed (scripts/install-cpu.sh)")


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ivb-cache")


@pytest.fixture(scope="session")
def tiny_model(cache_root):
    """A synthesized tiny InternVL checkpoint at a stable path (string)."""
    from internvl_batch.checkpoint import ensure

    return str(ensure("tiny", cache_root / "models"))


@pytest.fixture(scope="session")
def engine_spec(tiny_model):
    from internvl_batch.config import EngineSpec

    return EngineSpec(model=tiny_model, max_model_len=4096)


@pytest.fixture(scope="session")
def engine(engine_spec, cache_root):
    """One real CPU vLLM engine (and its compile-cache entry) for the whole session."""
    from internvl_batch.cache import CompileCache

    started = CompileCache(cache_root).start_engine(engine_spec, log=print)
    yield started
    started[0].close()


@pytest.fixture
def coco_bad(tmp_path):
    from tests.helpers import make_coco

    return make_coco(tmp_path / "coco", 20, bad=True)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_NTASKS", "SLURM_PROCID",
              "IVB_TASKS_ARE_SHARDS"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def pytest_report_header(config):
    return f"vllm installed: {HAS_VLLM}; slurm: {bool(shutil.which('sbatch'))}"
