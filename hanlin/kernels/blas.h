// The Fortran BLAS sgemm that libtorch carries (MKL on x86 builds; OpenBLAS elsewhere), looked up at run time: ATen
// does not export its own gemm wrapper, and linking a missing symbol would lose every kernel, not just the ones that
// multiply. Called inside an OpenMP parallel region, MKL runs single-threaded on the calling thread; outside one, with
// its own threads.
#pragma once
#include <dlfcn.h>

#include <cstdint>

namespace hanlin {

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

inline SgemmFn sgemm() {
  static const SgemmFn found = [] {
    for (const char* name : {"sgemm_", "SGEMM", "sgemm"}) {
      if (void* symbol = dlsym(RTLD_DEFAULT, name)) return reinterpret_cast<SgemmFn>(symbol);
    }
    return static_cast<SgemmFn>(nullptr);
  }();
  return found;
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C (column-major BLAS: C^T = op(B)^T op(A)^T).
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm()(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

}  // namespace hanlin
