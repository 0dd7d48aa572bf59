"""Average bitwidth and compression ratio: one definition for every method.

- ``avg_bits``: the element-weighted mean bitwidth of the quantizers marked
  ``counts_in_average`` (the method's learned or chosen feature bits), measured on a forward
  pass, or summed over several with :class:`ModelCost` (the trainer measures the selected
  model on the whole test split: every batch of a graph-level task counts).
- ``compression_ratio``: ``32 * elements / bits`` summed over every quantized tensor (all
  quantizers of the model: features, messages, weights...). Tensors without a quantizer are
  not counted, so a model with none is FP32: ``avg_bits = 32`` and ratio ``1.0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gnnq.quant.base import BitCost, Quantizer

FP32_BITS = 32.0


NO_COST = BitCost(0.0, 0.0)


@dataclass(frozen=True)
class ModelCost:
    """Elements and bits of a model's quantized tensors, over one or more forward passes:
    ``counted`` for the quantizers in ``avg_bits``, ``total`` for every quantizer."""

    counted: BitCost = NO_COST
    total: BitCost = NO_COST

    def __add__(self, other: "ModelCost") -> "ModelCost":
        return ModelCost(self.counted + other.counted, self.total + other.total)

    @property
    def average_bits(self) -> float:
        if self.counted.elements <= 0:
            return FP32_BITS
        return self.counted.bits / self.counted.elements

    @property
    def compression_ratio(self) -> float:
        if self.total.elements <= 0 or self.total.bits <= 0:
            return 1.0
        return FP32_BITS * self.total.elements / self.total.bits


def model_cost(model: nn.Module) -> ModelCost:
    """The cost of ``model``'s last forward pass (each quantizer's last input)."""
    cost = ModelCost()
    for module in model.modules():
        if isinstance(module, Quantizer):
            spent = module.bit_cost()
            if spent is not None and spent.elements > 0:
                cost = cost + ModelCost(spent if module.counts_in_average else NO_COST, spent)
    return cost


def average_bits(model: nn.Module) -> float:
    return model_cost(model).average_bits


def compression_ratio(model: nn.Module) -> float:
    return model_cost(model).compression_ratio
