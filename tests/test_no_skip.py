"""The one rule for skips (tests/no_skip.py), run on a small suite in a child pytest: listed
where skips are allowed, failures under IVB_NO_SKIP=1, xfail untouched, and machine-bound tests
deselected (not skipped) by their marker."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest

@pytest.fixture
def missing_program():
    pytest.skip("no such program")

def test_skip_in_test():
    pytest.skip("not today")

@pytest.mark.skipif(True, reason="a condition held")
def test_skipif():
    pass

def test_skip_in_fixture(missing_program):
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.gpu
def test_needs_gpu():
    pass

@pytest.mark.cpu_only
def test_needs_no_gpu():
    pass

def test_plain():
    pass
'''


def _pytest(tmp_path: Path, no_skip: bool, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IVB_NO_SKIP"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if no_skip:
        env["IVB_NO_SKIP"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.no_skip", "-p",
                           "no:cacheprovider", "-rs", "-c", os.devnull, "--rootdir",
                           str(tmp_path), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_skips_are_listed_where_allowed(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    r = _pytest(tmp_path, False, "test_suite.py")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "2 passed, 3 skipped, 1 deselected, 1 xfailed" in out, out
    for reason in ("not today", "a condition held", "no such program"):
        assert "SKIPPED [1] test_suite.py" in out and reason in out, out
    # whichever this machine is, exactly one of the two machine-bound tests is deselected
    assert "deselected on this machine: 1 test(s) marked" in out, out


def test_under_no_skip_every_skip_fails(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    r = _pytest(tmp_path, True, "test_suite.py")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    # a skip in the test body fails it; one in setup (skipif, a fixture) is a setup error
    assert "1 failed, 2 passed, 1 deselected, 1 xfailed, 2 errors" in out, out
    assert "skipped" not in out.splitlines()[-1], out
    for reason in ("not today", "a condition held", "no such program"):
        assert f"skipped under IVB_NO_SKIP=1, where nothing may skip: {reason}" in out, out


def test_under_no_skip_a_module_level_skip_fails(tmp_path):
    (tmp_path / "test_mod.py").write_text(
        "import pytest\npytest.importorskip('no_module_of_this_name')\n\n"
        "def test_x():\n    pass\n")
    (tmp_path / "test_other.py").write_text("def test_y():\n    pass\n")
    allowed = _pytest(tmp_path, False)
    assert allowed.returncode == 0 and "1 passed, 1 skipped" in allowed.stdout, allowed.stdout
    strict = _pytest(tmp_path, True)
    assert strict.returncode != 0, strict.stdout
    assert "skipped under IVB_NO_SKIP=1" in strict.stdout and "1 error" in strict.stdout, \
        strict.stdout
