"""Packed INT1..INT8 inference: formats, the integer reference, CPU and CUDA kernels.

==========================  ===========================================================
module                      holds
==========================  ===========================================================
:mod:`.packing`             codes packed along the features in 32-bit words (INT4: 8 per
                            word, INT2: 16), rows grouped by bitwidth for mixed precision
:mod:`.grid`                integer grids (scale, zero point, code range, bits, rounding):
                            what every quantizer exports
:mod:`.reference`           the exact arithmetic in PyTorch, ground truth for every kernel
:mod:`.cpu`                 the C++/OpenMP extension (``csrc/packed_cpu*.cpp``), built on
                            first use (or by ``python -m gnnq.kernels``) into
                            ``$GNNQ_CACHE/kernels`` (``~/.cache/gnnq/kernels``); also the
                            fused DQ, QLR and A²Q training ops (``fake_quant_cpu.cpp``)
:mod:`.cuda`                the CUDA kernels (``csrc/packed_cuda.cu``, plain CUDA C++), loaded
                            where CUDA is present; ``nvcc_compile`` for compile-only checks
:mod:`.backend`             one interface over reference / cpu / cuda (``get_backend``)
:mod:`.model`               the packed GCN (graph + layers) and its inference
:mod:`.format`              the ``.safetensors`` + JSON header file, validated on load
==========================  ===========================================================

Design in one paragraph: aggregation is a CSR SpMM over destination rows with int32 column
indices and no edge values: GCN's ``D^{-1/2}`` is folded into per-node factors, applied per
source (together with a per-node scale) and per destination. Packed rows are gathered whole
(INT4 at F = 128 is one 64-byte line instead of 512 bytes), decoded with shifts of 32-bit
words into float lanes and accumulated in float32 (exact small-integer codes times per-node
factors); zero points are corrected once per output row. Where all factors are 1 the kernels
sum codes exactly in int32 (``spmm_codes``). The dense transform multiplies unpacked codes in
integers (int16 dot products on the CPU, ``__dp4a`` on the GPU: Hopper has no INT4 tensor
cores) and applies scales and zero points in the epilogue.
"""
