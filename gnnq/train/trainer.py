"""The trainer: fits one run (a seed, or a fold) and selects its epoch on validation.

Full-batch for node-level tasks, mini-batches for graph-level ones. Every epoch it measures
train/val/test, so it can report both protocols: the test metric at the best validation
epoch (primary) and the best test metric over all epochs (the official A²Q code's).
``trainer.select_max_bits`` limits both to the epochs whose ``avg_bits`` (measured on the
validation split) is within a bit budget: a checkpoint over the budget is not a result.
``trainer.val_ties`` settles equal validation scores: the earlier epoch, or the better
training score.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch_geometric.loader import DataLoader

from gnnq.config import TrainConfig
from gnnq.data.task import Split, Task
from gnnq.errors import GnnqError
from gnnq.models import build_model, divergence_hint
from gnnq.models.smp_prop import multiplier_metrics
from gnnq.quant.base import QuantizerFactory
from gnnq.quant.cost import ModelCost, model_cost
from gnnq.train import snapshot
from gnnq.train.metrics import metric_sums, task_loss
from gnnq.train.strategies import build_strategy

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]


class TrainingDiverged(GnnqError):
    """The loss became NaN or infinite at ``epoch`` of ``run``; ``last_metrics`` are the last
    finished epoch's (None when the first epoch diverged), kept in the job's summary."""

    def __init__(self, message: str, run: int, epoch: int,
                 last_metrics: Optional[dict[str, float]]) -> None:
        super().__init__(message)
        self.run, self.epoch, self.last_metrics = run, epoch, last_metrics

    def record(self) -> dict[str, Any]:
        return {"run": self.run, "epoch": self.epoch, "last_epoch_metrics": self.last_metrics}


@dataclass
class RunResult:
    run: int
    seed: int
    fold: Optional[int]
    best_epoch: int
    epochs: int
    val: float
    test: float
    best_test: float
    best_test_epoch: int
    avg_bits: float
    compression_ratio: float
    state_dict: dict = field(repr=False, default_factory=dict)
    # (epoch, metrics) of every epoch trained: replayed to the tracker when a job resumes.
    history: list = field(repr=False, default_factory=list)

    def record(self) -> dict[str, Any]:
        """The run's numbers (summary.json's ``runs`` entry), without weights or history."""
        return {k: v for k, v in asdict(self).items() if k not in ("state_dict", "history")}


@dataclass
class Selection:
    """The epochs the two rules have chosen so far: the best validation score's (``val``,
    with its ``train`` score for ties, its ``state``) and the best test score's."""

    val: Optional[float] = None
    train: Optional[float] = None
    epoch: int = 0
    state: dict = field(default_factory=dict)
    test: Optional[float] = None
    test_epoch: int = 0
    fewest_bits: float = math.inf  # over all epochs, for the bit limit's error message


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GnnqError(f"trainer.device={name!r} was requested but this machine has no CUDA "
                        f"device. Use trainer.device=cpu or trainer.device=auto.")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig, task: Task,
                 quantizers: Optional[QuantizerFactory] = None,
                 on_epoch: Optional[EpochCallback] = None,
                 snapshots: Optional[Path] = None) -> None:
        self.config = config
        self.task = task
        self.quantizers = quantizers
        self.on_epoch = on_epoch
        self.snapshots = snapshots  # the folder of unfinished runs' snapshots (None: none)
        self.progress = self._progress_mode()
        self.device = resolve_device(config.trainer.device)
        self.scale = 100.0 if task.metric == "acc" else 1.0  # accuracies are reported in %

    # -- one run -------------------------------------------------------------------------
    def fit(self, run: int) -> RunResult:
        cfg, task = self.config, self.task
        seed = cfg.seed + run
        seed_everything(seed)
        split = task.split(run, seed)
        model = build_model(cfg.model, task, self.quantizers).to(self.device)
        strategy = build_strategy(cfg.strategy)
        optimizer = torch.optim.Adam(strategy.param_groups(model, cfg.trainer), lr=cfg.trainer.lr)
        scheduler = self._scheduler(optimizer)
        shuffle = torch.Generator().manual_seed(seed)  # the mini-batch order
        step, evaluate = self._loops(model, split, shuffle)
        training = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        chosen, history = Selection(), []
        start = self._resume(run, training, chosen, history, shuffle)

        better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
        max_bits = cfg.trainer.select_max_bits
        epochs = self._epoch_iter(run, start)
        epoch = start - 1
        last_snapshot = time.monotonic()
        for epoch in epochs:
            loss = step(optimizer, strategy)
            diagnostics = multiplier_metrics(model)  # of the training pass, before evaluate()
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"Training diverged: the loss became {loss} at epoch {epoch} of run {run} "
                    f"(seed {seed}). Lower trainer.lr (now {cfg.trainer.lr}) or check the "
                    f"quantizer settings{divergence_hint(cfg.model)}; runs finished before this "
                    f"one are kept.", run, epoch, history[-1][1] if history else None)
            scores, costs = evaluate()
            bits = costs["val"].average_bits
            chosen.fewest_bits = min(chosen.fewest_bits, bits)
            eligible = max_bits is None or bits <= max_bits
            if eligible and self._improves(scores, chosen, better):
                chosen.val, chosen.train, chosen.epoch = scores["val"], scores.get("train"), epoch
                chosen.state = copy.deepcopy(model.state_dict())
            if eligible and (chosen.test is None or better(scores["test"], chosen.test)):
                chosen.test, chosen.test_epoch = scores["test"], epoch
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(scores["val_loss"])
                else:
                    scheduler.step()
            metrics = {"train_loss": loss, **scores, **diagnostics}
            if self.quantizers is not None:
                metrics["avg_bits"] = bits
            history.append((epoch, metrics))
            self._report(epochs, run, epoch, metrics)
            patience = cfg.trainer.early_stopping
            # Patience counts from the first epoch within the bit limit.
            if patience is not None and chosen.val is not None and epoch - chosen.epoch >= patience:
                break
            every = cfg.trainer.snapshot_minutes
            if (self.snapshots is not None and every is not None
                    and time.monotonic() - last_snapshot >= 60 * every):
                self._save_snapshot(run, epoch, training, chosen, history, shuffle)
                last_snapshot = time.monotonic()

        if chosen.val is None:
            raise GnnqError(
                f"No epoch of run {run} (seed {seed}) was within trainer.select_max_bits="
                f"{max_bits:g}: the fewest average bits in {epoch} epochs were "
                f"{chosen.fewest_bits:.2f}. Raise the limit, lower the method's bits (e.g. "
                f"quant.bit_budget) or train longer (trainer.epochs); runs finished before "
                f"this one are kept.")
        model.load_state_dict(chosen.state)
        selected, costs = evaluate()
        return RunResult(
            run=run, seed=seed, fold=task.fold(run),
            best_epoch=chosen.epoch, epochs=epoch, val=selected["val"], test=selected["test"],
            best_test=chosen.test, best_test_epoch=chosen.test_epoch,
            avg_bits=costs["test"].average_bits,
            compression_ratio=costs["test"].compression_ratio, state_dict=chosen.state,
            history=history)

    def _save_snapshot(self, run: int, epoch: int, training: dict[str, Any],
                       chosen: Selection, history: list, shuffle: torch.Generator) -> None:
        state = {name: target.state_dict() for name, target in training.items()
                 if target is not None}
        snapshot.save(snapshot.snapshot_path(self.snapshots, run),
                      {"run": run, "epoch": epoch, "history": history, "selection": asdict(chosen),
                       "rng": snapshot.rng_state(shuffle), **state}, self.config)

    def _resume(self, run: int, training: dict[str, Any], chosen: Selection,
                history: list, shuffle: torch.Generator) -> int:
        """With ``resume=true`` and a snapshot of ``run``: restore it (and replay its epochs
        to the tracker); the first epoch still to train."""
        if not self.config.resume or self.snapshots is None:
            return 1
        path = snapshot.snapshot_path(self.snapshots, run)
        saved = snapshot.load(path, self.config)
        if saved is None:
            return 1
        for name, target in training.items():
            if target is not None:
                target.load_state_dict(saved[name])
        for key, value in saved["selection"].items():
            setattr(chosen, key, value)
        snapshot.set_rng_state(saved["rng"], shuffle)
        history.extend(saved["history"])
        if self.on_epoch is not None:
            for epoch, metrics in history:
                self.on_epoch(run, epoch, metrics)
        log.info("run %d resumes after epoch %d (%s)", run, saved["epoch"], path)
        return saved["epoch"] + 1

    # -- loops ---------------------------------------------------------------------------
    def _loops(self, model: nn.Module, split: Split, shuffle: torch.Generator):
        return (self._node_loops if self.task.level == "node" else self._graph_loops)(
            model, split, shuffle)

    def _node_loops(self, model: nn.Module, split: Split, shuffle: torch.Generator):
        data = self.task.graph.to(self.device)
        metric = self.task.metric
        masks = {name: getattr(split, name).to(self.device) for name in ("train", "val", "test")}

        def step(optimizer, strategy) -> float:
            model.train()
            optimizer.zero_grad()
            out = model(data.x, data.edge_index)
            loss = task_loss(out[masks["train"]], data.y[masks["train"]], metric)
            strategy.backward(loss, model, self._penalty(model))
            optimizer.step()
            return loss.item()

        @torch.no_grad()
        def evaluate() -> tuple[dict[str, float], dict[str, ModelCost]]:
            """Scores of every split and the bit cost of the pass (one for the whole graph)."""
            model.eval()
            out = model(data.x, data.edge_index)
            scores = {}
            for name, idx in masks.items():
                total, count = metric_sums(out[idx], data.y[idx], metric)
                scores[name] = self.scale * total / max(count, 1)
            scores["val_loss"] = task_loss(out[masks["val"]], data.y[masks["val"]], metric).item()
            cost = model_cost(model)
            return scores, {"val": cost, "test": cost}

        return step, evaluate

    def _graph_loops(self, model: nn.Module, split: Split, shuffle: torch.Generator):
        graphs, metric, bs = self.task.graphs, self.task.metric, self.config.trainer.batch_size
        subset = lambda idx: [graphs[i] for i in idx.tolist()]  # noqa: E731
        train_loader = DataLoader(subset(split.train), batch_size=bs, shuffle=True,
                                  generator=shuffle)
        scored = ["val", "test"]
        if self.config.trainer.val_ties == "train":  # ties need the training graphs' score
            scored.insert(0, "train")
        eval_loaders = {name: DataLoader(subset(getattr(split, name)), batch_size=bs)
                        for name in scored}

        def forward(batch):
            batch = batch.to(self.device)
            return model(batch.x, batch.edge_index, batch.batch), batch.y

        def step(optimizer, strategy) -> float:
            model.train()
            total, count = 0.0, 0
            for batch in train_loader:
                optimizer.zero_grad()
                out, y = forward(batch)
                loss = task_loss(out, y, metric)
                strategy.backward(loss, model, self._penalty(model))
                optimizer.step()
                total += loss.item() * y.numel()
                count += y.numel()
            return total / max(count, 1)

        @torch.no_grad()
        def evaluate() -> tuple[dict[str, float], dict[str, ModelCost]]:
            """Scores of val and test (and train, to break ties) and their bit costs, summed
            over every batch (the bits NNS selects depend on the graphs)."""
            model.eval()
            scores, costs = {}, {}
            for name, loader in eval_loaders.items():
                total, count, loss_sum, cost = 0.0, 0, 0.0, ModelCost()
                for batch in loader:
                    out, y = forward(batch)
                    s, n = metric_sums(out, y, metric)
                    total, count = total + s, count + n
                    loss_sum += task_loss(out, y, metric).item() * n
                    cost = cost + model_cost(model)
                scores[name] = self.scale * total / max(count, 1)
                costs[name] = cost
                if name == "val":
                    scores["val_loss"] = loss_sum / max(count, 1)
            return scores, costs

        return step, evaluate

    # -- helpers -------------------------------------------------------------------------
    def _improves(self, scores: dict[str, float], chosen: Selection,
                  better: Callable[[float, float], bool]) -> bool:
        """Whether this epoch replaces the selected one: a better validation score or, with
        ``trainer.val_ties=train``, an equal one and a better training score."""
        if chosen.val is None or better(scores["val"], chosen.val):
            return True
        return (self.config.trainer.val_ties == "train" and scores["val"] == chosen.val
                and better(scores["train"], chosen.train))

    def _penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """The quantization method's own loss term for the last forward pass (e.g. A²Q's
        memory penalty), if its factory defines ``penalty(model)``."""
        penalty = getattr(self.quantizers, "penalty", None)
        return penalty(model) if penalty is not None else None

    def _scheduler(self, optimizer):
        sched = self.config.trainer.scheduler
        if sched.name == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, sched.step_size, sched.gamma)
        if sched.name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.config.trainer.epochs)
        if sched.name == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=sched.gamma, patience=sched.patience)
        return None

    def _progress_mode(self) -> str:
        mode = self.config.trainer.progress
        if mode == "auto":
            return "bar" if sys.stderr.isatty() else "log"
        return mode

    def _epoch_iter(self, run: int, start: int):
        epochs = range(start, self.config.trainer.epochs + 1)
        if self.progress == "bar":
            from tqdm.auto import tqdm
            return tqdm(epochs, desc=f"run {run}", leave=False, dynamic_ncols=True,
                        initial=start - 1, total=self.config.trainer.epochs)
        return epochs

    def _report(self, epochs, run: int, epoch: int, metrics: dict[str, float]) -> None:
        if self.on_epoch is not None:
            self.on_epoch(run, epoch, metrics)
        if self.progress == "bar":
            epochs.set_postfix(loss=f"{metrics['train_loss']:.3f}", val=f"{metrics['val']:.2f}")
        elif self.progress == "log":
            every = max(1, self.config.trainer.epochs // 10)
            if epoch % every == 0 or epoch == self.config.trainer.epochs:
                extra = "".join(f" {k} {v:.4g}" for k, v in metrics.items()
                                if k not in ("train_loss", "train", "val", "test", "val_loss"))
                log.info("run %d epoch %d: loss %.4f val %.2f test %.2f%s", run, epoch,
                         metrics["train_loss"], metrics["val"], metrics["test"], extra)
