"""The CUDA kernels: plain CUDA C++ in ``csrc/*.cu``, loaded through PyTorch's extension
machinery where CUDA is present.

``csrc/packed_cuda.cu`` holds the kernels and C++ launchers and includes no PyTorch header,
so it compiles with plain ``nvcc`` anywhere (:func:`nvcc_compile`, used by the test suite for
sm_80 and sm_90); ``csrc/packed_cuda_bind.cpp`` wraps the launchers for PyTorch and is only
built where a CUDA build of PyTorch finds a GPU. Without one, :func:`available` is false and
callers fall back to the CPU kernels after printing a one-line notice (:func:`notice`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from gnnq.errors import GnnqError
from gnnq.kernels.cpu import CSRC, build_extension

log = logging.getLogger(__name__)

CUDA_SOURCES = ("packed_cuda_bind.cpp", "packed_cuda.cu")
CUDA_HEADERS = ("packed_bind.h", "packed_layout.h", "packed_cuda.h")
NVCC_FLAGS = ["-O3", "-std=c++17"]  # no --use_fast_math: IEEE division and rounding
#: Architectures the suite compiles for: Ampere (A100) and Hopper (H100/H200).
TEST_ARCHS = ("80", "90")

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_noticed = False


def cu_files() -> list[Path]:
    """Every CUDA source of the package (the suite compiles each one with nvcc)."""
    return sorted(CSRC.glob("*.cu"))


def find_nvcc() -> Optional[str]:
    """``nvcc`` from ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin`` or the PATH."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("nvcc")


def gencode_flags(archs: Sequence[str]) -> list[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def nvcc_compile(source: Path, output: Path, archs: Sequence[str] = TEST_ARCHS,
                 nvcc: Optional[str] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``nvcc -c`` one ``.cu`` file for ``archs`` (no GPU and no PyTorch needed)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise GnnqError("nvcc was not found (looked in $CUDA_HOME/bin, /usr/local/cuda/bin "
                        "and the PATH); install the CUDA toolkit to compile gnnq's kernels.")
    cmd = [nvcc, "-c", *NVCC_FLAGS, *gencode_flags(archs), f"-I{CSRC}", str(source),
           "-o", str(output)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def why_unavailable() -> Optional[str]:
    """``None`` when the CUDA kernels can run here, else the reason in a few words."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "PyTorch is not installed"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if find_nvcc() is None:
        return "nvcc was not found to build the kernels"
    return None


def available() -> bool:
    return why_unavailable() is None


def notice() -> None:
    """Print once per process why the packed kernels run on the CPU instead of CUDA."""
    global _noticed
    if not _noticed:
        _noticed = True
        print(f"gnnq: CUDA kernels unavailable ({why_unavailable()}); using the CPU kernels.",
              file=sys.stderr)


def load(verbose: bool = False) -> ModuleType:
    """The CUDA extension, built for the visible GPU on first use and cached."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        reason = why_unavailable()
        if reason is not None:
            raise GnnqError(f"gnnq's CUDA kernels cannot run here: {reason}.")
        _module = build_extension("gnnq_packed_cuda", CUDA_SOURCES, CUDA_HEADERS,
                                  "gnnq's CUDA kernels", verbose,
                                  extra_cflags=["-O3", "-std=c++17"],
                                  extra_cuda_cflags=NVCC_FLAGS)
        return _module
