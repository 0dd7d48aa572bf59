"""GNN layers with quantizer hooks by tensor role, and the models built from them.

:func:`build_model` turns a :class:`~gnnq.config.ModelConfig` and a
:class:`~gnnq.data.task.Task` into a model. Every layer gets its quantizers from the factory
through :func:`~gnnq.quant.base.layer_quantizers` with a
:class:`~gnnq.quant.base.LayerSpec` named after its module path, so a method can place a
quantizer on any role of any layer without touching the layers. Without a factory the
model is FP32.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from gnnq.config import ModelConfig
from gnnq.data.task import Task
from gnnq.errors import GnnqError, choice_error
from gnnq.models.gat_conv import QGATConv
from gnnq.models.gcn_conv import QGCNConv, gcn_norm
from gnnq.models.gin_conv import QGINConv
from gnnq.models.graph import GraphGCN, GraphGIN
from gnnq.models.node import GAT, GCN, GIN
from gnnq.models.qlinear import QLinear
from gnnq.models.smp import SMP
from gnnq.models.smp_prop import SMPProp, stable_multiplier_bound
from gnnq.quant.base import QuantizerFactory

NODE_MODELS = ("gcn", "gin", "gat", "smp")
# Node-level models whose convs can drop their input after quantizing it.
DROPOUT_IN_CONVS = ("gcn", "gat")
GRAPH_MODELS = ("gcn", "gin")

__all__ = [
    "build_model", "divergence_hint", "NODE_MODELS", "GRAPH_MODELS",
    "QLinear", "QGCNConv", "QGINConv", "QGATConv", "gcn_norm",
    "GCN", "GIN", "GAT", "GraphGCN", "GraphGIN", "SMP", "SMPProp",
]


def build_model(cfg: ModelConfig, task: Task,
                quantizers: Optional[QuantizerFactory] = None) -> nn.Module:
    """The model ``cfg.name`` for ``task``: node-level (logits ``[N, C]``) or graph-level
    (``[B, C]``, or ``[B]`` for regression), quantized by ``quantizers`` (``None``: FP32)."""
    out_channels = 1 if task.metric == "mae" else task.num_classes
    if task.level == "node":
        return _node_model(cfg, task, out_channels, quantizers)
    return _graph_model(cfg, task, out_channels, quantizers)


def divergence_hint(cfg: ModelConfig) -> str:
    """A model-specific remedy to add to the trainer's divergence message ("" if none)."""
    if (cfg.name, cfg.propagation, cfg.multiplier_bound) == ("smp", "smp", None):
        # Deep SMP's known failure: the unbounded multiplier (gnnq/models/smp_prop.py).
        return (f", or bound SMP's multiplier with model.multiplier_bound="
                f"{stable_multiplier_bound(cfg.alpha):g} (1/(4 alpha))")
    return ""


def _node_model(cfg: ModelConfig, task: Task, out_channels: int,
                quantizers: Optional[QuantizerFactory]) -> nn.Module:
    if task.num_embeddings is not None:
        raise GnnqError(f"Dataset {task.name!r} has categorical node features; embedding them "
                        "is only supported for graph-level tasks.")
    if cfg.quantize_before_dropout and cfg.name not in DROPOUT_IN_CONVS:
        raise GnnqError(f"model.quantize_before_dropout=true is not available for model "
                        f"{cfg.name!r}: only the node-level {' and '.join(DROPOUT_IN_CONVS)} "
                        f"models drop their inputs inside the convs. Set it to false, or use "
                        f"model={' or model='.join(DROPOUT_IN_CONVS)}.")
    common = dict(in_channels=task.num_features, out_channels=out_channels,
                  hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout,
                  quantizers=quantizers, num_nodes=task.graph.num_nodes)
    if cfg.name == "gcn":
        return GCN(**common, quantize_before_dropout=cfg.quantize_before_dropout)
    if cfg.name == "gin":
        return GIN(**common, mlp_layers=cfg.mlp_layers, train_eps=cfg.train_eps)
    if cfg.name == "gat":
        return GAT(**common, heads=cfg.heads, out_heads=cfg.out_heads,
                   attn_dropout=cfg.attn_dropout,
                   quantize_before_dropout=cfg.quantize_before_dropout)
    if cfg.name == "smp":
        return SMP(task.num_features, out_channels, hidden=cfg.hidden, dropout=cfg.dropout,
                   steps=cfg.steps, alpha=cfg.alpha, propagation=cfg.propagation,
                   correction=cfg.correction, threshold=cfg.threshold,
                   multiplier_lr=cfg.multiplier_lr, slack_lr=cfg.slack_lr,
                   multiplier_bound=cfg.multiplier_bound,
                   quantizers=quantizers, num_nodes=task.graph.num_nodes)
    raise choice_error("model", cfg.name, NODE_MODELS)


def _graph_model(cfg: ModelConfig, task: Task, out_channels: int,
                 quantizers: Optional[QuantizerFactory]) -> nn.Module:
    if cfg.quantize_before_dropout:
        raise GnnqError(f"model.quantize_before_dropout=true is only available for node-level "
                        f"tasks (model={' or model='.join(DROPOUT_IN_CONVS)}); dataset "
                        f"{task.name!r} is graph-level. Set it to false.")
    common = dict(in_channels=task.num_features, out_channels=out_channels,
                  hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout,
                  pooling=cfg.pooling, batch_norm=cfg.batch_norm,
                  num_embeddings=task.num_embeddings, quantizers=quantizers)
    if cfg.name == "gin":
        return GraphGIN(**common, mlp_layers=cfg.mlp_layers, train_eps=cfg.train_eps)
    if cfg.name == "gcn":
        return GraphGCN(**common)
    raise GnnqError(f"Model {cfg.name!r} is not available for graph-level tasks (dataset "
                    f"{task.name!r}). Models for graph-level tasks: "
                    f"{', '.join(sorted(GRAPH_MODELS))}.")
