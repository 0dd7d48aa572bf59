"""Train/validation/test splits as functions of the repeat: ``split(run, seed) -> Split``.

Random splits draw from their own ``torch.Generator`` (never the global RNG), seeded with
``split_seed`` when set and with the run's seed otherwise. Cross-validation folds are fixed
by ``fold_seed``; repeat ``run`` tests on fold ``run % folds``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from gnnq.data.task import Split, tested_fold
from gnnq.errors import GnnqError

SplitFn = Callable[[int, int], Split]


def fixed_split(split: Split) -> SplitFn:
    """The dataset's own split, the same in every run."""
    return lambda run, seed: split


def _generator(seed: int, split_seed: Optional[int]) -> torch.Generator:
    return torch.Generator().manual_seed(seed if split_seed is None else split_seed)


def _shuffled(index: Tensor, generator: torch.Generator) -> Tensor:
    return index[torch.randperm(index.numel(), generator=generator)]


def _sorted_cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts).sort().values


def per_class_split(y: Tensor, train_per_class: int, val_per_class: int,
                    split_seed: Optional[int]) -> SplitFn:
    """``train_per_class`` and ``val_per_class`` random nodes of every class, the rest test
    (Shchur et al.'s protocol for Coauthor and Amazon)."""
    def split(run: int, seed: int) -> Split:
        generator = _generator(seed, split_seed)
        train, val, test = [], [], []
        for label in y.unique():
            index = _shuffled((y == label).nonzero().view(-1), generator)
            train.append(index[:train_per_class])
            val.append(index[train_per_class:train_per_class + val_per_class])
            test.append(index[train_per_class + val_per_class:])
        return Split(_sorted_cat(train), _sorted_cat(val), _sorted_cat(test))

    return split


def planetoid_random_split(y: Tensor, train_per_class: int, num_val: int, num_test: int,
                           split_seed: Optional[int]) -> SplitFn:
    """``train_per_class`` random nodes of every class for training, then ``num_val`` and
    ``num_test`` random nodes of the rest (PyG's ``Planetoid(split="random")``)."""
    num_train = train_per_class * y.unique().numel()
    if num_train + num_val + num_test > y.numel():
        raise GnnqError(
            f"The random split asks for {num_train} training, {num_val} validation and "
            f"{num_test} test nodes but the graph has only {y.numel()} nodes. Lower "
            f"dataset.train_per_class, dataset.num_val or dataset.num_test.")

    def split(run: int, seed: int) -> Split:
        generator = _generator(seed, split_seed)
        train = _sorted_cat([_shuffled((y == label).nonzero().view(-1), generator)[:train_per_class]
                             for label in y.unique()])
        is_rest = torch.ones_like(y, dtype=torch.bool)
        is_rest[train] = False
        rest = _shuffled(is_rest.nonzero().view(-1), generator)
        return Split(train, rest[:num_val].sort().values,
                     rest[num_val:num_val + num_test].sort().values)

    return split


def stratified_folds(y: Tensor, folds: int, seed: int) -> list[Tensor]:
    """Split ``range(len(y))`` into ``folds`` disjoint folds with (within one) the same
    class counts, like scikit-learn's ``StratifiedKFold(folds, shuffle=True)``.

    Each class is shuffled and dealt out round-robin; the dealing carries on from class to
    class, so the fold sizes also differ by one at most.
    """
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(y)
    dealt = 0
    for label in y.unique():
        index = _shuffled((y == label).nonzero().view(-1), generator)
        fold_of[index] = (torch.arange(index.numel()) + dealt) % folds
        dealt += index.numel()
    return [(fold_of == k).nonzero().view(-1) for k in range(folds)]


def cross_validation_split(y: Tensor, folds: int, fold_seed: int) -> SplitFn:
    """Repeat ``run`` tests on fold ``k = run % folds``, validates on fold ``(k - 1) % folds``
    (the rule of the A2Q code) and trains on the rest."""
    if folds > y.numel():
        raise GnnqError(f"dataset.folds={folds} is more than the {y.numel()} graphs of the "
                        f"dataset. Use fewer folds.")
    parts = stratified_folds(y, folds, fold_seed)

    def split(run: int, seed: int) -> Split:
        test = tested_fold(run, folds)
        val = (test - 1) % folds
        train = _sorted_cat([part for k, part in enumerate(parts) if k not in (test, val)])
        return Split(train, parts[val], parts[test])

    return split
