"""Packed kernels: packing, integer grids, the integer reference vs the CPU kernels (every
instruction set this CPU has) and, where present, the CUDA kernels; every .cu file compiles
with nvcc for sm_80 and sm_90.

The comparison graph has the awkward cases: rows without in-edges, isolated nodes, duplicate
edges, one node with 10^5 in-edges, and feature widths that are not multiples of any packing.
Integer accumulations must agree exactly; scaled results within a float32 bound derived from
the sum of absolute terms (see ``tolerance``).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gnnq.kernels import cuda, reference
from gnnq.kernels.grid import Grid, affine_grid, symmetric_grid
from gnnq.kernels.packing import (PackedRows, codes_per_word, pack, pack_rows, unpack,
                                  words_per_row)

ALL_BITS = list(range(1, 9))
WIDTHS = (1, 37, 45)  # not multiples of any packing (45 > 32: several words at INT1)
HUB_DEGREE = 100_000


@pytest.fixture(scope="module")
def cpu_ext():
    from gnnq.kernels import cpu

    return cpu.load()


def isas(ext) -> list[str]:
    """Every instruction set of the CPU kernels this machine can run."""
    return ["baseline", "avx2"] if ext.isa() == "avx2" else ["baseline"]


@pytest.fixture(scope="module")
def graph():
    """CSR over destinations: 3000 nodes, random edges with duplicates; nodes 0..99 have no
    in-edges, nodes 100..149 no edges at all, node 2999 has 10^5 in-edges."""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    src = torch.randint(150, n, (20_000,), generator=gen)
    dst = torch.randint(150, n, (20_000,), generator=gen)
    dst[:500] = src[:500]                                        # some self-loops
    hub_src = torch.randint(150, n, (HUB_DEGREE,), generator=gen)
    hub_dst = torch.full((HUB_DEGREE,), n - 1)
    src, dst = torch.cat([src, hub_src]), torch.cat([dst, hub_dst])
    keep = ~((dst < 150))                                        # rows 0..149 stay empty
    src, dst = src[keep], dst[keep]
    from gnnq.kernels.model import csr_from_edges

    g = csr_from_edges(src, dst, n)
    degree = g.rowptr[1:] - g.rowptr[:-1]
    assert int(degree[:150].sum()) == 0 and int(degree.max()) >= HUB_DEGREE
    return g


def tolerance(bound: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """float32 accumulation error allowance per element: the kernels add each edge's product
    in float32 into a block of <= 128 edges and the blocks into the row total (CPU), or add
    sequentially (CUDA), so the error is at most ~(128 + deg / 128) eps (CPU) and deg eps
    (CUDA) times the sum of absolute terms; we allow 4 eps * (128 + deg) * bound."""
    eps = torch.finfo(torch.float32).eps
    return 4 * eps * (128 + degree.to(torch.float64).view(-1, 1)) * bound + 1e-30


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("width", (*WIDTHS, 64))
def test_pack_round_trip_and_layout(bits, width):
    gen = torch.Generator().manual_seed(bits * 100 + width)
    codes = torch.randint(0, 2 ** bits, (7, width), generator=gen)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (7, words_per_row(width, bits))
    assert torch.equal(unpack(words, bits, width), codes.to(torch.int32))
    # Code f sits in word f // P at bits (f % P) * b, least significant first.
    per = codes_per_word(bits)
    f = width - 1
    word = int(words[3, f // per]) & 0xFFFFFFFF
    assert (word >> ((f % per) * bits)) & (2 ** bits - 1) == int(codes[3, f])


def test_codes_per_word_matches_the_issue():
    assert codes_per_word(4) == 8 and codes_per_word(2) == 16 and codes_per_word(8) == 4
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)


def test_mixed_rows_are_grouped_by_bits_and_round_trip():
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(1, 9, (50,), generator=gen)
    codes = torch.randint(0, 256, (50, 37), generator=gen) % (2 ** bits.view(-1, 1))
    packed = pack_rows(codes, bits)
    assert packed.num_groups == len(torch.unique(bits))
    assert torch.equal(packed.bits, torch.unique(bits).to(torch.int32))
    assert torch.equal(packed.unpack(), codes.to(torch.int32))
    assert torch.equal(packed.row_bits(), bits.to(torch.int32))
    # Grouped rows keep their original order within a group (stable).
    first = packed.order[: int(packed.row_start[1])]
    assert torch.equal(first, torch.sort(first).values)


# -- grids -----------------------------------------------------------------------------------------
def test_grid_rounding_and_clipping():
    signed = symmetric_grid("tensor", torch.tensor([0.5]), torch.tensor([3]), unsigned=False)
    x = torch.tensor([[-2.0, -0.76, -0.25, 0.25, 0.26, 0.74, 0.75, 1.6, 5.0]])
    values = signed.dequantize(signed.quantize(x))
    assert torch.equal(values, 0.5 * torch.tensor([[-3.0, -2, -1, 1, 1, 1, 2, 3, 3]]))
    unsigned = symmetric_grid("tensor", torch.tensor([1.0]), torch.tensor([2]), unsigned=True)
    assert unsigned.quantize(torch.tensor([[-1.0, 0.5, 2.4, 9.0]])).tolist() == [[0, 1, 2, 3]]
    even = affine_grid("tensor", torch.tensor([1.0]), torch.tensor([8]), 4)
    assert even.quantize(torch.tensor([[0.5, 1.5, -0.5]])).tolist() == [[8, 10, 8]]
    # QLR's order: round(x / s + z); with an odd zero point ties go the other way.
    qlr = affine_grid("tensor", torch.tensor([1.0]), torch.tensor([7]), 4,
                      rounding="half_even_zero")
    assert qlr.quantize(torch.tensor([[0.5, 1.5, -0.5]])).tolist() == [[8, 8, 6]]


def _grids(rows: int, cols: int, seed: int) -> list[tuple[str, Grid]]:
    gen = torch.Generator().manual_seed(seed)
    row_bits = torch.randint(1, 9, (rows,), generator=gen)
    return [
        ("column signed 4", symmetric_grid("column", torch.rand(cols, generator=gen) + 0.05,
                                           torch.full((cols,), 4), unsigned=False)),
        ("row mixed unsigned", symmetric_grid("row", torch.rand(rows, generator=gen) + 0.05,
                                              row_bits, unsigned=True)),
        ("tensor affine 2", affine_grid("tensor", torch.tensor([0.3]), torch.tensor([1]), 2)),
        ("row affine 8", affine_grid("row", torch.rand(rows, generator=gen) + 0.01,
                                     torch.randint(0, 256, (rows,), generator=gen), 8)),
        ("tensor QLR 4", affine_grid("tensor", torch.tensor([0.25]), torch.tensor([7]), 4,
                                     rounding="half_even_zero")),
    ]


def test_quantize_pack_kernel_matches_reference(cpu_ext):
    from gnnq.kernels.backend import ExtensionBackend

    gen = torch.Generator().manual_seed(3)
    rows, cols = 300, 37
    x = torch.randn(rows, cols, generator=gen) * 2
    x[0, 0] = float("nan")
    x[1, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5])  # exact halves
    for isa in isas(cpu_ext):
        cpu_ext.set_isa(isa)
        backend = ExtensionBackend("cpu", cpu_ext, torch.device("cpu"))
        for name, grid in _grids(rows, cols, 4):
            want = reference.quantize_pack(x, grid)
            got = backend.quantize_pack(x, grid)
            assert torch.equal(got.words, want.words), (isa, name)
            assert torch.equal(got.unpack(), grid.quantize(x)), (isa, name)
    cpu_ext.set_isa(isas(cpu_ext)[-1])


# -- aggregation -----------------------------------------------------------------------------------
def _features(graph, width: int, bits, seed: int) -> tuple[torch.Tensor, PackedRows]:
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_nodes
    if isinstance(bits, int):
        codes = torch.randint(0, 2 ** bits, (n, width), generator=gen)
    else:
        codes = torch.randint(0, 256, (n, width), generator=gen) % (2 ** bits.view(-1, 1))
    return codes, pack_rows(codes, bits)


def _grouped_col(graph, packed: PackedRows) -> torch.Tensor:
    position = packed.inverse_order()
    return graph.col if position is None else position[graph.col.long()].to(torch.int32)


@pytest.mark.parametrize("width", WIDTHS)
def test_spmm_codes_exact_every_bitwidth_and_isa(cpu_ext, graph, width):
    gen = torch.Generator().manual_seed(width)
    mixed = torch.randint(1, 9, (graph.num_nodes,), generator=gen)
    for bits in [*ALL_BITS, mixed]:
        _, packed = _features(graph, width, bits, seed=width)
        col = _grouped_col(graph, packed)
        want = reference.spmm_codes(graph.rowptr, col, packed)
        assert int(want[-1].abs().max()) > 0  # the hub row is a real test
        for isa in isas(cpu_ext):
            cpu_ext.set_isa(isa)
            got = cpu_ext.spmm_codes(graph.rowptr, col, packed.words, packed.bits,
                                     packed.row_start, packed.word_start, width)
            assert torch.equal(got.to(torch.int64), want), (isa, bits if isinstance(bits, int)
                                                            else "mixed")
    cpu_ext.set_isa(isas(cpu_ext)[-1])


@pytest.mark.parametrize("case", ["column grid", "row grid mixed", "plain sum"])
def test_spmm_scaled_within_float_tolerance(cpu_ext, graph, case):
    from gnnq.kernels.backend import ExtensionBackend

    gen = torch.Generator().manual_seed(7)
    n, width = graph.num_nodes, 45
    dinv = graph.deg_inv_sqrt
    bias = torch.randn(width, generator=gen)
    if case == "row grid mixed":
        bits = torch.randint(1, 9, (n,), generator=gen)
        _, packed = _features(graph, width, bits, seed=8)
        order = packed.order
        kw = dict(src_scale=(dinv * (torch.rand(n, generator=gen) + 0.1))[order],
                  src_zero=torch.randint(0, 200, (n,), generator=gen).to(torch.float32)[order],
                  dst_scale=dinv, bias=bias, relu=True)
    elif case == "column grid":
        _, packed = _features(graph, width, 4, seed=9)
        kw = dict(src_scale=dinv, dst_scale=dinv, col_scale=torch.rand(width, generator=gen),
                  col_zero=torch.full((width,), 8, dtype=torch.int32), bias=bias)
    else:
        _, packed = _features(graph, width, 2, seed=10)
        kw = {}
    col = _grouped_col(graph, packed)
    want = reference.spmm(graph.rowptr, col, packed, dtype=torch.float64, **kw)
    bound = reference.spmm_abs_bound(graph.rowptr, col, packed, **{
        k: v for k, v in kw.items() if k not in ("bias", "relu")})
    degree = graph.rowptr[1:] - graph.rowptr[:-1]
    tol = tolerance(bound, degree)
    for isa in isas(cpu_ext):
        cpu_ext.set_isa(isa)
        got = ExtensionBackend("cpu", cpu_ext, torch.device("cpu")).spmm(
            graph.rowptr, col, packed, **kw).to(torch.float64)
        err = (got - want).abs()
        assert bool((err <= tol).all()), (isa, float(err.max()), float((err / tol).max()))
        assert torch.equal(got[:150], want[:150])  # empty rows: exactly bias (or 0)
    cpu_ext.set_isa(isas(cpu_ext)[-1])


def test_spmm_f32_kernel(cpu_ext, graph):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(graph.num_nodes, 37, generator=gen)
    dinv = graph.deg_inv_sqrt
    want = reference.spmm_f32(graph.rowptr, graph.col, x.to(torch.float64), src_scale=dinv,
                              dst_scale=dinv).to(torch.float64)
    bound = reference.spmm_f32(graph.rowptr, graph.col, x.abs().to(torch.float64),
                               src_scale=dinv, dst_scale=dinv).to(torch.float64)
    tol = tolerance(bound, graph.rowptr[1:] - graph.rowptr[:-1])
    for isa in isas(cpu_ext):
        cpu_ext.set_isa(isa)
        got = cpu_ext.spmm_f32(graph.rowptr, graph.col, x, dinv, dinv, None, False)
        assert bool(((got.to(torch.float64) - want).abs() <= tol).all()), isa
    cpu_ext.set_isa(isas(cpu_ext)[-1])


# -- dense transform --------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features", (37, 130))
def test_linear_exact_and_scaled(cpu_ext, in_features):
    from gnnq.kernels.backend import ExtensionBackend

    gen = torch.Generator().manual_seed(in_features)
    rows, out = 257, 19
    x_bits = torch.randint(1, 9, (rows,), generator=gen)
    x_codes = torch.randint(0, 256, (rows, in_features), generator=gen) % (2 ** x_bits.view(-1, 1))
    packed = pack_rows(x_codes, x_bits)
    w_codes = torch.randint(1, 16, (out, in_features), generator=gen)
    w_words = pack(w_codes, 4)
    exact = (x_codes.to(torch.int64) @ w_codes.to(torch.int64).t())
    assert torch.equal(reference.linear_codes(packed, w_words, 4), exact)
    x_grid = symmetric_grid("row", torch.rand(rows, generator=gen) + 0.1, x_bits, unsigned=True)
    w_grid = symmetric_grid("row", torch.rand(out, generator=gen) + 0.1, torch.full((out,), 4),
                            unsigned=False)
    bias = torch.randn(out, generator=gen)
    want = reference.linear(packed, x_grid, w_words, w_grid, bias, dtype=torch.float64)
    values = (x_grid.dequantize(x_codes, torch.float64) @
              w_grid.dequantize(w_codes, torch.float64).t()) + bias.to(torch.float64)
    assert torch.allclose(want, values, rtol=1e-12, atol=1e-9)
    bound = (x_grid.dequantize(x_codes, torch.float64).abs()
             @ w_grid.dequantize(w_codes, torch.float64).abs().t())
    for isa in isas(cpu_ext):
        cpu_ext.set_isa(isa)
        got = cpu_ext.linear_codes(packed.words, packed.bits, packed.row_start,
                                   packed.word_start, packed.order, in_features, w_words, 4)
        assert torch.equal(got.to(torch.int64), exact), isa
        scaled = ExtensionBackend("cpu", cpu_ext, torch.device("cpu")).linear(
            packed, x_grid, w_words, w_grid, bias)
        assert bool(((scaled.to(torch.float64) - want).abs()
                     <= 8 * torch.finfo(torch.float32).eps * (bound + want.abs()) + 1e-6).all())
    cpu_ext.set_isa(isas(cpu_ext)[-1])


# -- the extension machinery ------------------------------------------------------------------------
def test_build_cache_location(monkeypatch, tmp_path):
    from gnnq.kernels import cpu

    monkeypatch.setenv("GNNQ_CACHE", str(tmp_path))
    assert cpu.cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("GNNQ_CACHE")
    assert cpu.cache_dir() == Path("~/.cache/gnnq/kernels").expanduser()


def test_prebuild_reports_ready_and_survives_a_missing_compiler(monkeypatch, tmp_path, capsys):
    from gnnq.kernels import cpu
    from gnnq.kernels.__main__ import main

    if shutil.which(os.environ.get("CXX", "c++")):
        main()  # the session's cache: built by `make install` or by the tests before
        assert "packed CPU kernels ready, fused training ops ready" in capsys.readouterr().out
    for name, value in (("_module", None), ("_training", None), ("_training_failed", False)):
        monkeypatch.setattr(cpu, name, value)
    monkeypatch.setenv("GNNQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    main()
    assert "packed CPU kernels not built, fused training ops not built" in capsys.readouterr().out


def test_a_kernel_module_name_does_not_depend_on_what_the_process_built_before():
    # PyTorch appends to the flag lists it is given; shared lists edited that way renamed the
    # module built second, so the prebuilt fused training ops were rebuilt by every first job.
    from gnnq.kernels import cpu

    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler")
    packed, training = cpu.load(), cpu.training_ops()
    assert packed.__name__ == cpu.module_name("gnnq_packed_cpu", (*cpu.SOURCES, *cpu.HEADERS),
                                              cpu.PACKED_FLAGS)
    assert training.__name__ == cpu.module_name("gnnq_train_cpu", cpu.TRAINING_SOURCES,
                                                cpu.TRAINING_FLAGS)
    assert cpu.LDFLAGS == ["-fopenmp"]


def test_auto_backend_without_cuda_says_so(capsys, monkeypatch):
    from gnnq.kernels import backend as backend_module

    if cuda.available():
        pytest.skip("CUDA is present: auto picks the CUDA kernels")
    monkeypatch.setattr(cuda, "_noticed", False)
    chosen = backend_module.get_backend("auto")
    assert chosen.name == "cpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA kernels unavailable" in err[0] and "CPU" in err[0]


# -- CUDA -------------------------------------------------------------------------------------------
NVCC = cuda.find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine "
                                         "(looked in $CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    files = cuda.cu_files()
    assert files, "no .cu sources found"

    def compile_one(source: Path):
        return source, cuda.nvcc_compile(source, tmp_path / f"{source.stem}.o",
                                          archs=cuda.TEST_ARCHS, nvcc=NVCC)

    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        for source, proc in pool.map(compile_one, files):
            assert proc.returncode == 0, f"{source.name}:\n{proc.stderr[-4000:]}"
            assert (tmp_path / f"{source.stem}.o").stat().st_size > 0
            # Both architectures are in the fat binary.
            if shutil.which("cuobjdump") or (Path(NVCC).parent / "cuobjdump").exists():
                import subprocess

                tool = shutil.which("cuobjdump") or str(Path(NVCC).parent / "cuobjdump")
                listing = subprocess.run([tool, "--list-elf", str(tmp_path / f"{source.stem}.o")],
                                         capture_output=True, text=True).stdout
                assert "sm_80" in listing and "sm_90" in listing, listing


requires_cuda = pytest.mark.skipif(not cuda.available(),
                                   reason=f"CUDA kernels cannot run here: {cuda.why_unavailable()}")


@requires_cuda
def test_cuda_kernels_match_reference(graph):
    from gnnq.kernels.backend import get_backend

    gpu = get_backend("cuda")
    gen = torch.Generator().manual_seed(21)
    n, width = graph.num_nodes, 45
    dinv = graph.deg_inv_sqrt
    degree = graph.rowptr[1:] - graph.rowptr[:-1]
    for bits in [*ALL_BITS, torch.randint(1, 9, (n,), generator=gen)]:
        _, packed = _features(graph, width, bits, seed=22)
        col = _grouped_col(graph, packed)
        want = reference.spmm_codes(graph.rowptr, col, packed)
        got = gpu.spmm_codes(graph.rowptr, col, packed).cpu()
        assert torch.equal(got.to(torch.int64), want)
        scale = dinv if packed.order is None else dinv[packed.order]
        kw = dict(src_scale=scale, dst_scale=dinv, bias=torch.randn(width, generator=gen))
        ref = reference.spmm(graph.rowptr, col, packed, dtype=torch.float64, **kw)
        bound = reference.spmm_abs_bound(graph.rowptr, col, packed, src_scale=scale,
                                         dst_scale=dinv)
        out = gpu.spmm(graph.rowptr, col, packed, **kw).cpu().to(torch.float64)
        assert bool(((out - ref).abs() <= 32 * tolerance(bound, degree)).all())
    x = torch.randn(n, 37, generator=gen)
    for name, grid in _grids(n, 37, 23):
        assert torch.equal(gpu.quantize_pack(x, grid).words.cpu(),
                           reference.quantize_pack(x, grid).words), name
    x_bits = torch.randint(1, 9, (n,), generator=gen)
    x_codes = torch.randint(0, 256, (n, 70), generator=gen) % (2 ** x_bits.view(-1, 1))
    packed = pack_rows(x_codes, x_bits)
    w_codes = torch.randint(0, 16, (33, 70), generator=gen)
    got = gpu.linear_codes(packed, pack(w_codes, 4), 4).cpu()
    assert torch.equal(got.to(torch.int64), x_codes.to(torch.int64) @ w_codes.t().to(torch.int64))


@requires_cuda
def test_cuda_linear_takes_more_row_tiles_than_a_grid_y_dimension():
    """ogbn-products has 2.45 M rows: 76k tiles of 32, past gridDim.y's 65535."""
    from gnnq.kernels.backend import get_backend

    gen = torch.Generator().manual_seed(24)
    rows = 65535 * 32 + 33
    x_codes = torch.randint(0, 4, (rows, 5), generator=gen)
    w_codes = torch.randint(0, 16, (3, 5), generator=gen)
    packed = pack_rows(x_codes, torch.full((rows,), 2))
    got = get_backend("cuda").linear_codes(packed, pack(w_codes, 4), 4).cpu()
    assert torch.equal(got.to(torch.int64), x_codes @ w_codes.t())


def test_bad_column_indices_are_an_error_not_a_crash(cpu_ext, graph):
    _, packed = _features(graph, 16, 4, seed=30)
    col = graph.col.clone()
    col[5] = graph.num_nodes  # one past the end
    for call in (lambda: cpu_ext.spmm_codes(graph.rowptr, col, packed.words, packed.bits,
                                            packed.row_start, packed.word_start, 16),
                 lambda: cpu_ext.spmm_f32(graph.rowptr, col, torch.zeros(graph.num_nodes, 16),
                                          None, None, None, False)):
        with pytest.raises(RuntimeError, match="column indices must lie"):
            call()
    col[5] = -1
    with pytest.raises(RuntimeError, match="column indices must lie"):
        cpu_ext.spmm(graph.rowptr, col, packed.words, packed.bits, packed.row_start,
                     packed.word_start, 16, None, None, None, None, None, None, False)
