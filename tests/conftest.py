"""Shared test fixtures: where ComfyUI is, and how to import it for real (never mocked).

Under CI (``$CI`` set to anything but empty/0/false), a ComfyUI test that skips, for whatever reason,
is reported as a failure: a green CI must mean the integration ran. Locally such tests skip with
their reason.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from instantfamily_nodes.comfy_path import WHERE, comfyui_or_none

PACK_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_PATH = comfyui_or_none()
NO_COMFYUI_REASON = f"ComfyUI not found (looked at {WHERE}); set COMFYUI_PATH to run the ComfyUI tests"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """Puts the real ComfyUI on sys.path (CPU mode) or skips with the reason. Once found, import
    errors are failures, not skips: a broken ComfyUI environment must not pass as 'no ComfyUI'."""
    if COMFYUI_PATH is None:
        pytest.skip(NO_COMFYUI_REASON)
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return COMFYUI_PATH


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skipped test that uses the ``comfyui`` fixture (directly or through another
    fixture) fails instead, keeping the skip reason in the message."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and under_ci() and "comfyui" in getattr(item, "fixturenames", ()):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"ComfyUI test skipped under CI (CI={os.environ.get('CI')!r}), which counts as a failure: {reason}"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks (``pytestmark = pytest.mark.usefixtures("one_thread")``): per-op
    overhead dominates them, and on a shared 2-core CPU more threads only add contention (measured:
    0.6 s vs 2-18 s per training step with 2 threads under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
