"""Shared fixtures: the offline data mirror and a runner for the real `gnnq` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
