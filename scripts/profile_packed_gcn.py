"""Where a packed 2-layer GCN forward spends its time: torch.profiler over the methods of
`gnnq bench`'s end-to-end measurement (same graphs, grids and random weights), plus the
device's copy bandwidth on a GPU.

    python scripts/profile_packed_gcn.py synthetic_1m 128            # on a CUDA machine
    python scripts/profile_packed_gcn.py synthetic_small 64 --device cpu
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gnnq.bench import compose_config, gcn_end_to_end, load_graph, mixed_node_bits
from gnnq.cli import EXIT_USER_ERROR
from gnnq.errors import GnnqError
from gnnq.kernels.backend import get_backend


def copy_bandwidth_gb_s(gib: int = 4, repeats: int = 10) -> float:
    """Device-to-device copy, bytes read plus bytes written per second."""
    x = torch.empty(gib * 2 ** 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", help="a bench graph: dataset name or conf/bench/synthetic entry")
    parser.add_argument("features", type=int)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precisions", default="fp32,int4,int2")
    parser.add_argument("--calls", type=int, default=5, help="profiled forward passes")
    args = parser.parse_args()
    try:
        profile_methods(args)
    except GnnqError as err:  # an unknown graph, missing data, no CUDA: one message
        print(f"gnnq: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def profile_methods(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    cfg = compose_config([f"bench={'gpu' if cuda else 'cpu'}", "tracking.backend=none",
                          f"precisions=[{args.precisions}]"])
    backend = get_backend(args.device)
    g = load_graph(args.graph, cfg)
    methods = gcn_end_to_end(g, args.features, cfg, backend, backend.device,
                             mixed_node_bits(g.rowptr, cfg.mixed_bits))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for m in methods:
        for _ in range(3):
            m.run()
        sync()
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                m.run()
            sync()
        print(f"=== {m.name} ({args.graph}, F={args.features}), {args.calls} calls")
        print(prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
            row_limit=12, max_name_column_width=60))
    if cuda:
        print(f"device copy bandwidth: {copy_bandwidth_gb_s():.0f} GB/s (read + write)")


if __name__ == "__main__":
    sys.exit(main())
