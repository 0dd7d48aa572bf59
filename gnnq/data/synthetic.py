"""Small generated datasets for smoke tests and examples: no files, same output every time."""

from __future__ import annotations

import random

import torch
from torch_geometric.data import Data
from torch_geometric.utils import degree, to_undirected

SEED = 0


def node_classification_graph(num_nodes: int = 400, num_classes: int = 4,
                              num_features: int = 32, p_in: float = 0.05,
                              p_out: float = 0.005, noise: float = 3.0) -> Data:
    """A stochastic block model (one block per class) with noisy class-centred features.

    The features alone are only partly informative (``noise`` blurs the class centres);
    neighbours share their class far more often than not, so a GNN that averages over
    neighbours does clearly better than a model of the features alone.
    """
    generator = torch.Generator().manual_seed(SEED)
    y = torch.arange(num_nodes) % num_classes
    same_class = y.view(-1, 1) == y.view(1, -1)
    edge_prob = torch.where(same_class, p_in, p_out)
    upper = torch.bernoulli(edge_prob, generator=generator).triu(diagonal=1)
    edge_index = to_undirected(upper.nonzero().t(), num_nodes=num_nodes)
    centres = torch.randn(num_classes, num_features, generator=generator)
    x = centres[y] + noise * torch.randn(num_nodes, num_features, generator=generator)
    return Data(x=x, edge_index=edge_index, y=y)


def _ring_of_cliques(num_nodes: int, rng: random.Random) -> list[tuple[int, int]]:
    """Cliques of 3-5 nodes joined in a ring: every node has degree >= 2, many cycles."""
    sizes = []
    while sum(sizes) < num_nodes:
        sizes.append(rng.randint(3, 5))
    sizes[-1] -= sum(sizes) - num_nodes
    if sizes[-1] < 3:  # fold a too-small last piece into the clique before it
        last = sizes.pop()
        sizes[-1] += last
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    edges = [(start + i, start + j) for start, size in zip(starts, sizes)
             for i in range(size) for j in range(i + 1, size)]
    edges += [(starts[k] + sizes[k] - 1, starts[(k + 1) % len(sizes)]) for k in range(len(sizes))]
    return edges


def _random_tree(num_nodes: int, rng: random.Random) -> list[tuple[int, int]]:
    """Each node hangs off a random earlier one: no cycles, many leaves of degree 1."""
    return [(rng.randrange(v), v) for v in range(1, num_nodes)]


def graph_classification_set(num_graphs: int = 120, min_nodes: int = 10,
                             max_nodes: int = 30) -> list[Data]:
    """Graphs of two classes that differ in structure: rings of cliques (0), trees (1).

    Sizes are drawn from the same range for both classes, so only structure tells them
    apart; the one node feature is the degree.
    """
    rng = random.Random(SEED)
    graphs = []
    for i in range(num_graphs):
        label = i % 2
        num_nodes = rng.randint(min_nodes, max_nodes)
        edges = (_random_tree if label else _ring_of_cliques)(num_nodes, rng)
        edge_index = to_undirected(torch.tensor(edges).t(), num_nodes=num_nodes)
        x = degree(edge_index[0], num_nodes).unsqueeze(-1)
        graphs.append(Data(x=x, edge_index=edge_index, y=torch.tensor([label])))
    return graphs
