/* Optional training speed-up on Linux, never used at run time.
 *
 * The mlx[cpu] wheel links the reference (netlib) BLAS: its cblas_sgemm runs at ~5 GFLOP/s,
 * ~35x slower than OpenBLAS. numpy's wheel ships OpenBLAS with prefixed 64-bit-int symbols,
 * so this shim forwards MLX's cblas_sgemm to it; load it with LD_PRELOAD (see train.py).
 */
#include <stdint.h>

extern void scipy_cblas_sgemm64_(int order, int trans_a, int trans_b, int64_t m, int64_t n,
                                 int64_t k, float alpha, const float *a, int64_t lda,
                                 const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    scipy_cblas_sgemm64_(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
