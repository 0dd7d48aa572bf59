// AVX2 + FMA build of the kernels (chosen at run time where the CPU has them).
#include "packed_cpu.h"
#ifdef GNNQ_MULTI_ISA
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#pragma GCC target("avx2,fma,bmi2")
#define GNNQ_VL 8
#define GNNQ_ISA isa_avx2
#include "packed_cpu_kernels.h"
#endif
