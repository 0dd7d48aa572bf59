"""gnnq: config-driven experiments for quantized graph neural networks."""

__version__ = "0.1.0"
