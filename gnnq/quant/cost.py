"""Average bitwidth and compression ratio: one definition for every method.

- ``avg_bits``: the element-weighted mean bitwidth of the quantizers marked
  ``counts_in_average`` (the method's learned or chosen feature bits), measured on the last
  forward pass (the trainer runs one evaluation pass on the selected model first).
- ``compression_ratio``: ``32 * elements / bits`` summed over every quantized tensor (all
  quantizers of the model: features, messages, weights...). Tensors without a quantizer are
  not counted, so a model with none is FP32: ``avg_bits = 32`` and ratio ``1.0``.
"""

from __future__ import annotations

from torch import nn

from gnnq.quant.base import Quantizer

FP32_BITS = 32.0


def _costs(model: nn.Module, only_average: bool):
    for module in model.modules():
        if isinstance(module, Quantizer) and (module.counts_in_average or not only_average):
            cost = module.bit_cost()
            if cost is not None and cost.elements > 0:
                yield cost


def average_bits(model: nn.Module) -> float:
    costs = list(_costs(model, only_average=True))
    if not costs:
        return FP32_BITS
    return sum(c.bits for c in costs) / sum(c.elements for c in costs)


def compression_ratio(model: nn.Module) -> float:
    costs = list(_costs(model, only_average=False))
    bits = sum(c.bits for c in costs)
    if not costs or bits <= 0:
        return 1.0
    return FP32_BITS * sum(c.elements for c in costs) / bits
