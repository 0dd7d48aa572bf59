"""Shared fixtures: the offline data mirror, a runner for the real `gnnq` command, and the
fused-versus-PyTorch comparison of the training ops."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GNNQ = [sys.executable, "-m", "gnnq.cli"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A writable mirror (symlinks) of ../shared/data, so processed/ never lands in shared."""
    root = tmp_path_factory.mktemp("data")
    if SHARED_DATA.is_dir():
        subprocess.run(["cp", "-rs", "--no-preserve=mode", f"{SHARED_DATA}/.", f"{root}/"], check=True)
    return root


def requires_shared_data(*parts: str):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not on this machine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gnnq(*args: str, cwd: Path, data: Path | None = None, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `gnnq ARGS` in a subprocess, the way a user would, with outputs under cwd."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if data is not None:
        full_env["GNNQ_DATA"] = str(data)
    return subprocess.run([*GNNQ, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, a message containing every fragment, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"


def fused_and_plain(monkeypatch, compute):
    """``compute()`` with the fused CPU training ops and with PyTorch's element-wise ops
    (gnnq/kernels/cpu.py); skipped where the fused ops cannot be built."""
    from gnnq.kernels.cpu import FUSED_ENV, training_ops

    if training_ops() is None:
        pytest.skip("the fused training ops could not be built here (no C++ compiler)")
    fused = compute()
    monkeypatch.setenv(FUSED_ENV, "0")
    return fused, compute()


def adversarial_values() -> torch.Tensor:
    """ReLU outputs (exact zeros), negatives, multiples of 0.5 (halfway between codes on unit
    grids: ties round to even), values far outside any range, and non-finite ones."""
    torch.manual_seed(3)
    return torch.cat([torch.relu(torch.randn(200_000)), torch.randn(50_000) * 4,
                      torch.arange(-600, 600) * 0.5, torch.tensor([1e30, -1e30, 5e6, -3e6, -0.0]),
                      torch.tensor([float("inf"), -float("inf"), float("nan")])])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (payloads and signs of NaN differ
    between instruction paths and carry nothing)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32),
                                                       b[~nan].view(torch.int32))
