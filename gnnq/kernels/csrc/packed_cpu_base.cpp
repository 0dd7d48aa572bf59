// Portable build of the kernels (any architecture; on x86-64 the SSE2 baseline): 4-lane
// (128-bit) vectors, the width every SIMD instruction set has.
#include "packed_cpu.h"
#define GNNQ_VL 4
#define GNNQ_ISA isa_base
#include "packed_cpu_kernels.h"
