"""The CPU kernels: a C++ extension (OpenMP) built on first use and cached.

``load()`` compiles ``csrc/packed_cpu.cpp`` with :func:`torch.utils.cpp_extension.load`
(``-O3 -fopenmp``, no ``-march``: the source carries an AVX2+FMA and a portable variant and
picks one at run time) into ``$GNNQ_CACHE/kernels`` (default ``~/.cache/gnnq/kernels``).
The module name carries a hash of the sources, so an edited kernel builds afresh and
several versions can share one cache; concurrent first uses wait on PyTorch's build lock.
The first build takes about half a minute; later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from gnnq.errors import GnnqError

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("packed_cpu.cpp", "packed_cpu_base.cpp", "packed_cpu_avx2.cpp")
HEADERS = ("packed_bind.h", "packed_layout.h", "packed_cpu.h", "packed_cpu_kernels.h")
CFLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
PACKED_FLAGS = {"extra_cflags": CFLAGS, "extra_ldflags": LDFLAGS}

_lock = threading.Lock()
_module: Optional[ModuleType] = None


def cache_dir() -> Path:
    """Where compiled kernels live: ``$GNNQ_CACHE/kernels`` or ``~/.cache/gnnq/kernels``."""
    root = os.environ.get("GNNQ_CACHE")
    base = Path(root).expanduser() if root else Path("~/.cache/gnnq").expanduser()
    return (base / "kernels").absolute()


def source_hash(names: tuple[str, ...], flags: tuple[str, ...] = ()) -> str:
    """Hash of the named ``csrc/`` files and compiler flags: part of the module name."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()[:12]


def module_name(prefix: str, files: tuple[str, ...], load_kwargs: dict) -> str:
    """``<prefix>_<hash of the csrc/ files and the compiler flags>``."""
    return f"{prefix}_{source_hash(files, tuple(str(v) for v in load_kwargs.values()))}"


def build_extension(prefix: str, sources: tuple[str, ...], headers: tuple[str, ...],
                    what: str, verbose: bool, **load_kwargs) -> ModuleType:
    """Build (or load the cached build of) ``sources`` as the module
    ``<prefix>_<source hash>`` under :func:`cache_dir`; ``what`` names it in errors."""
    from torch.utils import cpp_extension

    name = module_name(prefix, (*sources, *headers), load_kwargs)
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    # Copies: PyTorch appends its own flags to the lists it is given, and a shared list
    # edited that way would change the next module's name (a rebuild in every process).
    flags = {key: list(value) for key, value in load_kwargs.items()}
    try:
        return cpp_extension.load(name=name, sources=[str(CSRC / s) for s in sources],
                                  extra_include_paths=[str(CSRC)], build_directory=str(build),
                                  verbose=verbose, **flags)
    except (RuntimeError, OSError, ImportError) as err:
        message = str(err).strip()
        raise GnnqError(f"Building {what} in {build} failed: "
                        f"{message.splitlines()[-1] if message else err}. "
                        f"Run with GNNQ_KERNEL_VERBOSE=1 to see the compiler output; "
                        f"ninja and a C++17 compiler are required.") from err


def check_compiler(what: str) -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise GnnqError(f"Building {what} needs a C++ compiler (c++ / g++ on PATH, or $CXX); "
                        f"none was found. Install g++ (Debian/Ubuntu: apt-get install g++).")


def load(verbose: bool = False) -> ModuleType:
    """The compiled CPU extension (built on the first call of the process if not cached)."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        missing = [n for n in (*SOURCES, *HEADERS) if not (CSRC / n).is_file()]
        if missing:
            raise GnnqError(f"The CPU kernel sources {', '.join(missing)} are missing from "
                            f"{CSRC}. Reinstall gnnq (its package data includes csrc/).")
        check_compiler("gnnq's CPU kernels")
        _module = build_extension("gnnq_packed_cpu", SOURCES, HEADERS, "gnnq's CPU kernels",
                                  verbose, **PACKED_FLAGS)
        log.debug("gnnq CPU kernels loaded (instruction set %s)", _module.isa())
        return _module


def available() -> bool:
    """Whether the CPU kernels load (builds them if needed); never raises."""
    try:
        load(verbose=bool(os.environ.get("GNNQ_KERNEL_VERBOSE")))
        return True
    except GnnqError as err:
        log.warning("%s", err)
        return False


# -- fused training ops ------------------------------------------------------------------------
TRAINING_SOURCES = ("fake_quant_cpu.cpp",)
# Lets GCC turn the clamps' branches into vector selects (traps are never enabled).
TRAINING_FLAGS = {"extra_cflags": [*CFLAGS, "-fno-trapping-math"], "extra_ldflags": LDFLAGS}
#: Set to 0 to train with PyTorch's element-wise ops only (same results, slower).
FUSED_ENV = "GNNQ_FUSED_OPS"
_training: Optional[ModuleType] = None
_training_failed = False


def training_ops() -> Optional[ModuleType]:
    """The fused fake-quantization ops of ``csrc/fake_quant_cpu.cpp`` (built on first use),
    or None where they are switched off (``GNNQ_FUSED_OPS=0``) or cannot be built: callers
    then use PyTorch's ops, which give the same results. A failed build is logged once."""
    global _training, _training_failed
    if os.environ.get(FUSED_ENV, "1") == "0":
        return None
    with _lock:
        if _training is None and not _training_failed:
            try:
                check_compiler("gnnq's fused training ops")
                _training = build_extension(
                    "gnnq_train_cpu", TRAINING_SOURCES, (), "gnnq's fused training ops",
                    bool(os.environ.get("GNNQ_KERNEL_VERBOSE")), **TRAINING_FLAGS)
            except GnnqError as err:
                _training_failed = True
                log.warning("Training with PyTorch's element-wise ops, which are slower: %s",
                            err)
        return _training


def training_ops_for(*tensors: torch.Tensor) -> Optional[ModuleType]:
    """:func:`training_ops` where they apply to ``tensors`` (contiguous float32 on the CPU;
    a bool mask may be among them), else None."""
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bool)
           or not t.is_contiguous() for t in tensors):
        return None
    return training_ops()
