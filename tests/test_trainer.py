"""The trainer's epoch selection under a bit limit and its bit accounting over batches."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.loader import DataLoader

from gnnq.config import DatasetConfig, DataRootConfig, TrainConfig, TrainerConfig
from gnnq.data import load_task
from gnnq.errors import GnnqError
from gnnq.quant.base import BitCost, Quantizer
from gnnq.quant.cost import ModelCost
from gnnq.train.trainer import Trainer


class RisingBits(Quantizer):
    """The identity, reporting ``offset + (training passes so far)`` bits per element: epoch
    ``e`` is evaluated at ``offset + e`` bits. The count is a buffer, so the selected
    checkpoint restores it."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.register_buffer("passes", torch.tensor(0))
        self.elements = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.passes += 1
        self.elements = x.numel()
        return x

    def bit_cost(self) -> BitCost:
        return BitCost(float(self.elements), float(self.elements * (self.offset + self.passes)))


class RowsAsBits(Quantizer):
    """The identity, reporting one element per row at as many bits as the input has rows:
    batches of different sizes have different bits."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows = x.size(0)
        return x

    def bit_cost(self) -> BitCost:
        return BitCost(float(self.rows), float(self.rows ** 2))


def make_trainer(dataset: str, factory, **trainer):
    # The quant section only marks the model as quantized: the stub factory is its method.
    config = TrainConfig(dataset=DatasetConfig(name=dataset), data=DataRootConfig(),
                         trainer=TrainerConfig(progress="none", **trainer),
                         quant={"name": "stub"})
    task = load_task(config.data, config.dataset)
    return Trainer(config, task, factory), config, task


def fit(epochs: int, select_max_bits, offset: int = 0):
    trainer, _, _ = make_trainer("synthetic", lambda spec: {"input": RisingBits(offset)},
                                 epochs=epochs, select_max_bits=select_max_bits)
    return trainer.fit(0)


def test_only_epochs_within_the_bit_limit_are_selected():
    free = fit(epochs=8, select_max_bits=None)
    assert free.best_epoch > 3 and free.avg_bits == free.best_epoch  # the limit below binds
    limited = fit(epochs=8, select_max_bits=3)
    assert limited.best_epoch <= 3 and limited.best_test_epoch <= 3
    assert limited.avg_bits == limited.best_epoch  # the selected checkpoint's own bits


def test_an_unreachable_bit_limit_is_a_clean_error():
    with pytest.raises(GnnqError, match=r"select_max_bits=5\b.*fewest average bits in 3 "
                                        r"epochs were 6\.00"):
        fit(epochs=3, select_max_bits=5, offset=5)


def test_costs_of_several_passes_add_up_element_weighted():
    first = ModelCost(BitCost(10, 20), BitCost(20, 100))
    second = ModelCost(BitCost(30, 120), BitCost(30, 120))
    both = first + second
    assert both.average_bits == pytest.approx(140 / 40)
    assert both.compression_ratio == pytest.approx(32 * 50 / 220)
    assert ModelCost().average_bits == 32.0 and ModelCost().compression_ratio == 1.0


def test_graph_level_bits_count_every_test_batch():
    # Only the message-passing layers (their inputs have a row per node, not per graph).
    factory = lambda spec: {"input": RowsAsBits()} if spec.name.startswith("convs.") else {}  # noqa: E731
    trainer, config, task = make_trainer("synthetic_graphs", factory, epochs=1, batch_size=7)
    result = trainer.fit(0)
    test = task.split(0, config.seed).test
    sizes = [b.num_nodes for b in DataLoader([task.graphs[i] for i in test.tolist()],
                                             batch_size=7)]
    assert len(set(sizes)) > 1  # otherwise the last batch alone would give the same value
    assert result.avg_bits == pytest.approx(sum(n * n for n in sizes) / sum(sizes))


@pytest.mark.parametrize("ties, expected", [("first", 2), ("train", 3)])
def test_validation_ties_go_to_the_first_epoch_or_the_better_training_score(monkeypatch, ties,
                                                                            expected):
    val, train = [50.0, 70.0, 70.0, 60.0, 70.0], [40.0, 60.0, 80.0, 90.0, 80.0]
    passes = iter(range(len(val) + 1))  # the last evaluate() scores the selected checkpoint

    def scripted_loops(self, model, split, seed):
        def evaluate():
            i = min(next(passes), len(val) - 1)
            return {"train": train[i], "val": val[i], "test": 0.0, "val_loss": 1.0}, {
                "val": ModelCost(), "test": ModelCost()}
        return (lambda optimizer, strategy: 0.5), evaluate

    monkeypatch.setattr(Trainer, "_loops", scripted_loops)
    trainer, _, _ = make_trainer("synthetic", lambda spec: {}, epochs=len(val), val_ties=ties)
    assert trainer.fit(0).best_epoch == expected


def test_graph_level_ties_score_the_training_graphs():
    scored = []
    trainer, _, _ = make_trainer("synthetic_graphs", lambda spec: {}, epochs=1, val_ties="train")
    trainer.on_epoch = lambda run, epoch, metrics: scored.append(metrics)
    trainer.fit(0)
    assert 0.0 <= scored[0]["train"] <= 100.0
