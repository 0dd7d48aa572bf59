"""Snapshots of an unfinished run, so a killed job continues where it stopped (``resume=true``).

A snapshot holds everything the next epoch depends on: the model (quantizer buffers
included), the optimizer and scheduler, the epochs each selection rule has chosen so far,
the per-epoch metrics (replayed to the tracker on resume), and every random generator the
run draws from (dropout, shuffling, Degree-Quant's protection masks). A resumed run is
therefore the run that was never stopped, to the bit on the same machine. Files are
replaced atomically, so a kill while writing leaves the previous snapshot intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from gnnq.config import TrainConfig
from gnnq.errors import GnnqError, load_failure
from gnnq.tracking.mlflow_tracker import flatten

FORMAT = 1
# Settings that do not change what a run computes: a run may continue under other values.
FREE_KEYS = ("task_name", "runs", "first_run", "resume", "tags", "optimized_metric", "data",
             "tracking", "trainer.progress", "trainer.snapshot_minutes", "trainer.checkpoint",
             "trainer.device")


def snapshot_path(folder: Path, run: int) -> Path:
    return folder / f"run{run}.snapshot.pt"


def finished_checkpoints(folder: Path) -> list[Path]:
    """The finished runs' checkpoints in ``folder`` (``run<r>.pt``, not the snapshots of
    unfinished runs), by run index."""
    found = [p for p in folder.glob("run*.pt") if p.stem[3:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[3:]))


def training_settings(config: TrainConfig | dict[str, Any]) -> dict[str, str]:
    """The config (or its plain-dict form, as checkpoints keep it) as flat ``{dotted key:
    value}`` strings (the tracker's params), less :data:`FREE_KEYS`."""
    if isinstance(config, TrainConfig):
        config = OmegaConf.to_container(OmegaConf.structured(config))
    return {k: v for k, v in flatten(config).items()
            if not any(k == free or k.startswith(f"{free}.") for free in FREE_KEYS)}


def check_same_training(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """A clean error when ``path`` was made under settings that change the run."""
    saved, current = flatten(saved), training_settings(config)
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k}={saved.get(k)} there but {current.get(k)} now"
                          for k in differing[:5])
        more = f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""
        raise GnnqError(
            f"resume=true cannot continue {path}: it was made with {shown}{more}. Resume with "
            f"the same overrides, or train into a new folder (another hydra.run.dir, or "
            f"without resume=true).")


def rng_state(loader: torch.Generator) -> dict[str, Any]:
    """Every generator a run draws from, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "loader": loader.get_state()}


def set_rng_state(state: dict[str, Any], loader: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    loader.set_state(state["loader"])


def save(path: Path, state: dict[str, Any], config: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"format": FORMAT, "settings": training_settings(config), **state}, partial)
    os.replace(partial, path)  # atomic: a kill mid-write keeps the previous snapshot


def load(path: Path, config: TrainConfig) -> Optional[dict[str, Any]]:
    """The snapshot at ``path`` (None if there is none), checked against ``config``."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of several types
        raise GnnqError(
            f"resume=true cannot read the snapshot {path} (a damaged file; {load_failure(err)})."
            f" Delete it to train that run from its first epoch.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GnnqError(f"{path} is not a gnnq snapshot of format {FORMAT}. Delete it to "
                        f"train that run from its first epoch.")
    check_same_training(state["settings"], config, path)
    return state
