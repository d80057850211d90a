"""One rule for skipped tests, loaded by tests/conftest.py.

- With IVB_NO_SKIP=1 (set by .ci/run) nothing skips: a test, fixture or module that calls
  pytest.skip, or a skipif that holds, is reported as a failure naming the reason. CI must run
  the Slurm, browser, Java and vLLM tests; a machine that quietly lacks one of them would
  otherwise pass green.
- Anywhere else a skip is allowed and listed in the summary (pyproject's `-ra`).
- What a machine cannot run by its nature is not skipped but deselected, and the summary says
  so: `@pytest.mark.gpu` (needs a CUDA GPU) on a machine without one, `@pytest.mark.cpu_only`
  (checks what happens without a GPU) on a machine with one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ENV = "IVB_NO_SKIP"
MARKERS = {"gpu": "needs a CUDA GPU (deselected on a machine without one)",
           "cpu_only": "checks behaviour without a GPU (deselected on a machine with one)"}


def no_skip() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def has_cuda() -> bool:
    """torch's answer, asked in a child: CUDA initialised in the test process would break the
    engines that tests fork later. Without nvidia-smi there is no driver, so no GPU."""
    if not shutil.which("nvidia-smi"):
        return False
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return p.stdout.strip() == "True"


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[_deselected] = {}


_deselected = pytest.StashKey[dict]()


def pytest_collection_modifyitems(config, items):
    marked = [i for i in items if any(i.get_closest_marker(m) for m in MARKERS)]
    if not marked:
        return
    wrong = "cpu_only" if has_cuda() else "gpu"
    drop = [i for i in marked if i.get_closest_marker(wrong)]
    if drop:
        config.stash[_deselected][wrong] = len(drop)
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if i not in drop]


def pytest_terminal_summary(terminalreporter, config):
    for marker, n in config.stash[_deselected].items():
        terminalreporter.write_line(f"deselected on this machine: {n} test(s) marked {marker} "
                                    f"({MARKERS[marker].split(' (')[0]})")


def _fail_if_skipped(report) -> None:
    if no_skip() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under {ENV}=1, where nothing may skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_if_skipped(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_if_skipped(report)
    return report
