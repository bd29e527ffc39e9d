"""Under CI a skipped ComfyUI test fails; locally it skips. Checked by running pytest on a small test
file next to a copy of this folder's conftest.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import PACK_ROOT

INNER = '''
import pytest

@pytest.fixture
def env(comfyui):
    return comfyui

def test_direct(comfyui):
    pytest.skip("pretend a ComfyUI piece is missing")

def test_through_a_fixture(env):
    pytest.skip("pretend a ComfyUI piece is missing")

def test_not_comfyui():
    pytest.skip("an optional library is missing")

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_failure(comfyui):
    assert False
'''


def _run(tmp_path, ci: str | None) -> str:
    shutil.copy(PACK_ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def test_skipped_comfyui_tests_fail_under_ci(tmp_path):
    out = _run(tmp_path, "true")
    assert "2 failed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED test_inner.py::test_direct" in out and "FAILED test_inner.py::test_through_a_fixture" in out
    assert "skipped under CI" in out and "pretend a ComfyUI piece is missing" in out


def test_skipped_comfyui_tests_only_skip_outside_ci(tmp_path):
    for ci in (None, "", "false", "0"):
        out = _run(tmp_path, ci)
        assert "3 skipped, 1 xfailed" in out, (ci, out)
