"""Quantization methods, each a factory of role -> quantizer mappings (see ``base``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from gnnq.errors import GnnqError, choice_error
from gnnq.quant.a2q import build_a2q
from gnnq.quant.base import QuantizerFactory
from gnnq.quant.degree_quant import build_degree_quant
from gnnq.quant.smoothness import build_smoothness

#: name -> builder(quant config dict) -> QuantizerFactory. Methods register here.
#: A factory may also define ``penalty(model) -> Tensor | None``, a loss term for the last
#: forward pass that the trainer hands to the strategy with the task loss, and
#: ``artifacts(model, task, folder) -> list[Path]``, files the experiment logs under
#: ``analysis/`` for the selected model of the last run.
METHODS: dict[str, Callable[[dict[str, Any]], QuantizerFactory]] = {
    "a2q": build_a2q,
    "degree_quant": build_degree_quant,
    "smoothness": build_smoothness,
}


def build_quantizers(quant: Optional[dict[str, Any]]) -> Optional[QuantizerFactory]:
    """The factory for ``quant`` (``None``: full precision, every role the identity). It needs
    no data, so a bad option fails before a dataset is loaded."""
    if quant is None:
        return None
    name = quant.get("name")
    if name not in METHODS:
        if not METHODS:
            raise GnnqError(f"Unknown quantization method {name!r}: this build of gnnq has no "
                            f"quantization methods yet; leave out +quant for FP32.")
        raise choice_error("quantization method (quant.name)", name, METHODS)
    return METHODS[name](quant)
