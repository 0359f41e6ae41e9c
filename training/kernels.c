/* Fused CPU kernels for the GRU4Rec training step (loaded by training/native.py via ctypes).
 *
 * Why: at batch 32 a step is ~40 small tensor ops; on 2 CPU cores the per-op dispatch and the
 * extra passes over [2080 x 32] / [U x H] temporaries cost more than the matrix products
 * (profile in benchmarks/README_gru4rec.md). These kernels do in one pass what took 5-12 torch
 * ops: coalescing the touched item rows, the sampled softmax cross-entropy (+logQ) gradient
 * scattered straight onto the unique rows, and the Adagrad(+momentum/Nesterov) update of the
 * touched rows in place. The matrix products stay in torch (MKL).
 *
 * Plain C, no torch headers: compiles in about a second; every pointer is a contiguous
 * float32 / int64 / uint8 buffer owned by a torch tensor on the Python side.
 * Build: gcc -O3 -march=native -ffp-contract=fast -fno-math-errno -fno-trapping-math -shared -fPIC (training/native.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* work below this many floats runs on one thread: waking the OpenMP team costs more */
#define PAR_MIN 32768
#ifdef _OPENMP
#include <omp.h>
static int n_threads(int64_t work) { return work >= PAR_MIN ? omp_get_max_threads() : 1; }
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int n_threads(int64_t work) { (void)work; return 1; }
static int thread_id(void) { return 0; }
#endif

/* rows = a[0..ka) followed by b[0..kb) -> unique rows in first-occurrence order (uniq[0..U))
 * and each row's position among them (inv[ka + kb]). slot: scratch of n_items int64 that must hold -1 everywhere on entry;
 * restored to -1 on exit. Returns U. */
int64_t rnn_coalesce2(const int64_t *a, int64_t ka, const int64_t *b, int64_t kb, int64_t *slot,
                      int64_t *uniq, int64_t *inv) {
    int64_t U = 0;
    for (int64_t i = 0; i < ka + kb; i++) {
        int64_t r = i < ka ? a[i] : b[i - ka];
        int64_t s = slot[r];
        if (s < 0) {
            s = U++;
            slot[r] = s;
            uniq[s] = r;
        }
        inv[i] = s;
    }
    for (int64_t u = 0; u < U; u++) slot[uniq[u]] = -1;
    return U;
}

/* exp(x) for x <= 0 (callers subtract the row max first), Cephes-style polynomial on the
 * range-reduced argument: ~1 ulp, and written so that gcc vectorises the loop (glibc's expf
 * is scalar without -ffast-math, which we avoid so NaN checks stay meaningful). */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const float n = t - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t i = ((int32_t)n + 127) << 23; /* 2^n */
    float f;
    memcpy(&f, &i, sizeof f);
    return p * f;
}

static inline float exp_nonpos(float x) { return exp_clamped(x); }

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

/* tanh via exp: absolute error ~1e-7 (relative error grows near 0, irrelevant here) */
static inline float tanhf_(float x) { return 1.0f - 2.0f / (exp_clamped(2.0f * x) + 1.0f); }

/* Sampled softmax cross-entropy (+ logQ) on the U unique output rows, in place.
 *
 * The softmax runs over C = M + n_sample columns, but several columns are the same item
 * (popular items are sampled often). Column c is item y[c] = unique row col[c], with logQ
 * offset q[c] = w * logp[y[c]] (w = w_in for the in-batch columns c < M, w_extra for the
 * extra samples; logp == NULL: no correction). Since exp(s - q[c]) = exp(s) * exp(-q[c]), the
 * softmax over the C columns equals a softmax over the U unique rows, row u weighted by
 * wsum[u] = sum of exp(-q[c]) over its columns: [U x M] work instead of [C x M], with no
 * gather of the scores and no scatter of their gradient.
 *
 * S [U, M]: scores O X^T (bias NOT included: added here from the bias table by at the
 * unique rows uniq) of the unique rows for the M mini-batch rows, whose targets are
 * columns 0..M-1. On return S holds d loss / d S; dby [U] its row sums (bias
 * gradient); in_out [U] = 1 for rows used as an output column (rows only used as inputs get
 * no bias update). Scratch: wsum [U], q [C]. Returns
 *   loss = inv_b * sum_r (logsumexp_c (S[col[c], r] - q[c]) - (S[col[r], r] - q[r])),
 * or NaN if any score is not finite. */
double rnn_xe_softmax(float *S, const float *by, const int64_t *uniq, int64_t U, int64_t M,
                      const int64_t *col, const int64_t *y, const float *logp, float w_in,
                      float w_extra, int64_t C, float inv_b, float *dby, uint8_t *in_out,
                      float *wsum, float *q) {
    float mx[M], sum[M], diag[M], scale[M];
    memset(wsum, 0, sizeof(float) * U);
    memset(in_out, 0, (size_t)U);
    for (int64_t c = 0; c < C; c++) {
        q[c] = logp ? (c < M ? w_in : w_extra) * logp[y[c]] : 0.0f;
        wsum[col[c]] += expf(-q[c]);
        in_out[col[c]] = 1;
    }
    /* per-thread partial max / sums over the unique rows, combined in thread order: the
     * result is the same on every run with the same thread count (resume == uninterrupted) */
    const int nt = n_threads(U * M);
    float pmx[nt][M], psum[nt][M], pchk[nt];
#pragma omp parallel num_threads(nt)
    {
        const int t = thread_id();
        float *lmx = pmx[t];
        float lchk = 0.0f;
        for (int64_t r = 0; r < M; r++) lmx[r] = -INFINITY;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < U; u++) {
            float *s = S + u * M;
            const float bu = by[uniq[u]]; /* the bias is added here: addmm with a broadcast
                                             bias measured 1.8x slower than the plain product */
            for (int64_t r = 0; r < M; r++) {
                s[r] += bu;
                lchk += s[r] * 0.0f; /* stays 0 unless NaN/inf */
            }
            if (in_out[u])
                for (int64_t r = 0; r < M; r++) lmx[r] = s[r] > lmx[r] ? s[r] : lmx[r];
        }
        pchk[t] = lchk;
    }
    float chk = 0.0f;
    for (int64_t r = 0; r < M; r++) { mx[r] = -INFINITY; sum[r] = 0.0f; }
    for (int t = 0; t < nt; t++) {
        chk += pchk[t];
        for (int64_t r = 0; r < M; r++) mx[r] = pmx[t][r] > mx[r] ? pmx[t][r] : mx[r];
    }
    if (!isfinite(chk)) return NAN;
    for (int64_t r = 0; r < M; r++) diag[r] = S[col[r] * M + r] - q[r];
#pragma omp parallel num_threads(nt)
    {
        float *ls = psum[thread_id()];
        for (int64_t r = 0; r < M; r++) ls[r] = 0.0f;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < U; u++) {
            float *s = S + u * M;
            const float w = wsum[u];
            for (int64_t r = 0; r < M; r++) {
                float e = w * exp_nonpos(s[r] - mx[r]);
                s[r] = e;
                ls[r] += e;
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int64_t r = 0; r < M; r++) sum[r] += psum[t][r];
    double loss = 0.0;
    for (int64_t r = 0; r < M; r++) {
        loss += (double)(mx[r] + logf(sum[r]) - diag[r]);
        scale[r] = inv_b / sum[r];
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < U; u++) {
        float *s = S + u * M;
        for (int64_t r = 0; r < M; r++) s[r] *= scale[r];
    }
    for (int64_t r = 0; r < M; r++) S[col[r] * M + r] -= inv_b;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < U; u++) {
        const float *s = S + u * M;
        float part[8] = {0}; /* 8 independent partial sums: vectorisable without reassociation */
        int64_t r = 0;
        for (; r + 8 <= M; r += 8)
            for (int k = 0; k < 8; k++) part[k] += s[r + k];
        float t = 0.0f;
        for (; r < M; r++) t += s[r];
        for (int k = 0; k < 8; k++) t += part[k];
        dby[u] = t;
    }
    return loss * inv_b;
}

/* ---- GRU layer gates (PyTorch GRUCell convention, gates r, z, n), element-wise parts ----
 * The products gi = x W_ih^T and gh = h W_hh^T ([M, 3H] each, biases b_ih, b_hh added here)
 * and the weight / input gradients stay in torch (MKL); these fuse the ~25 element-wise ops
 * around them.
 *   r = sigma(gi_r + gh_r), z = sigma(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
 *   h' = n + z (h - n), out = h' * mask (mask = hidden dropout, already scaled, or NULL).
 * Forward writes out and the cache r, z, n, ghn = gh_n ([M, H] each). */
void rnn_gru_gates_fwd(const float *restrict gi, const float *restrict gh,
                       const float *restrict b_ih, const float *restrict b_hh,
                       const float *restrict h, const float *restrict mask, int64_t M, int64_t H,
                       float *restrict out, float *restrict r_, float *restrict z_,
                       float *restrict n_, float *restrict ghn) {
    for (int64_t i = 0; i < M; i++) {
        const float *a = gi + i * 3 * H, *g = gh + i * 3 * H, *hh = h + i * H;
        const float *mk = mask ? mask + i * H : NULL;
        float *o = out + i * H, *rr = r_ + i * H, *zz = z_ + i * H, *nn = n_ + i * H;
        float *gg = ghn + i * H;
        for (int64_t j = 0; j < H; j++) {
            float rv = sigmoidf_((a[j] + b_ih[j]) + (g[j] + b_hh[j]));
            float zv = sigmoidf_((a[H + j] + b_ih[H + j]) + (g[H + j] + b_hh[H + j]));
            float gn = g[2 * H + j] + b_hh[2 * H + j];
            float nv = tanhf_((a[2 * H + j] + b_ih[2 * H + j]) + rv * gn);
            float hv = nv + zv * (hh[j] - nv);
            rr[j] = rv; zz[j] = zv; nn[j] = nv; gg[j] = gn;
            o[j] = mk ? hv * mk[j] : hv;
        }
    }
}

/* Backward of the gates: dout [M, H] = d loss / d out -> dgi, dgh [M, 3H] (d loss / d gi, gh)
 * and the bias gradients gb_ih, gb_hh [3H] (column sums, overwritten). */
void rnn_gru_gates_bwd(const float *restrict dout, const float *restrict mask,
                       const float *restrict h, const float *restrict r_, const float *restrict z_,
                       const float *restrict n_, const float *restrict ghn, int64_t M, int64_t H,
                       float *restrict dgi, float *restrict dgh, float *restrict gb_ih,
                       float *restrict gb_hh) {
    memset(gb_ih, 0, sizeof(float) * 3 * H);
    memset(gb_hh, 0, sizeof(float) * 3 * H);
    for (int64_t i = 0; i < M; i++) {
        const float *d = dout + i * H, *hh = h + i * H, *rr = r_ + i * H, *zz = z_ + i * H;
        const float *nn = n_ + i * H, *gg = ghn + i * H;
        const float *mk = mask ? mask + i * H : NULL;
        float *di = dgi + i * 3 * H, *dh = dgh + i * 3 * H;
        for (int64_t j = 0; j < H; j++) {
            float dv = mk ? d[j] * mk[j] : d[j];
            float rv = rr[j], zv = zz[j], nv = nn[j];
            float dpn = dv * (1.0f - zv) * (1.0f - nv * nv);
            float dpr = dpn * gg[j] * (rv * (1.0f - rv));
            float dpz = dv * (hh[j] - nv) * (zv * (1.0f - zv));
            di[j] = dpr; di[H + j] = dpz; di[2 * H + j] = dpn;
            dh[j] = dpr; dh[H + j] = dpz; dh[2 * H + j] = dpn * rv;
        }
        for (int64_t j = 0; j < 3 * H; j++) { gb_ih[j] += di[j]; gb_hh[j] += dh[j]; }
    }
}

/* Adagrad (+ momentum, + Nesterov) on rows of a [n, D] table, in place:
 *   acc += g^2 ; upd = -lr * g / sqrt(acc + eps)
 *   momentum: mom = momentum * mom + upd ; upd = nesterov ? momentum * mom + upd : mom
 *   W += upd
 * rows == NULL: rows 0..U-1 (dense parameters). mom == NULL: no momentum. mask != NULL: only
 * rows u with mask[u] != 0 are updated (the bias of rows used only as inputs). G is [U, D]. */
static void adagrad_row(float *restrict w, float *restrict a, float *restrict m,
                        const float *restrict g, int64_t D, float lr, float eps, float momentum,
                        int nesterov) {
    int64_t d = 0;
#ifdef __AVX__
    /* 1/sqrt by the hardware estimate plus one Newton step (relative error ~2e-7, i.e. float
     * rounding): sqrt + divide were the slowest part of the update on CPUs with 128-bit FP units */
    const __m256 veps = _mm256_set1_ps(eps), vnlr = _mm256_set1_ps(-lr);
    const __m256 vmo = _mm256_set1_ps(momentum), vhalf = _mm256_set1_ps(0.5f);
    const __m256 v3h = _mm256_set1_ps(1.5f);
    for (; d + 8 <= D; d += 8) {
        const __m256 gv = _mm256_loadu_ps(g + d);
        const __m256 av = _mm256_add_ps(_mm256_loadu_ps(a + d), _mm256_mul_ps(gv, gv));
        _mm256_storeu_ps(a + d, av);
        const __m256 x = _mm256_add_ps(av, veps);
        __m256 y = _mm256_rsqrt_ps(x);
        y = _mm256_mul_ps(y, _mm256_sub_ps(v3h, _mm256_mul_ps(_mm256_mul_ps(vhalf, x),
                                                               _mm256_mul_ps(y, y))));
        __m256 up = _mm256_mul_ps(_mm256_mul_ps(gv, y), vnlr);
        if (m) {
            const __m256 md = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(m + d), vmo), up);
            _mm256_storeu_ps(m + d, md);
            up = nesterov ? _mm256_add_ps(_mm256_mul_ps(md, vmo), up) : md;
        }
        _mm256_storeu_ps(w + d, _mm256_add_ps(_mm256_loadu_ps(w + d), up));
    }
#endif
    for (; d < D; d++) {
        float ad = a[d] + g[d] * g[d];
        a[d] = ad;
        float up = (g[d] / sqrtf(ad + eps)) * -lr;
        if (m) {
            float md = m[d] * momentum + up;
            m[d] = md;
            up = nesterov ? md * momentum + up : md;
        }
        w[d] += up;
    }
}

void rnn_adagrad_rows(float *W, float *acc, float *mom, const int64_t *rows, const uint8_t *mask,
                      int64_t U, int64_t D, const float *G, float lr, float eps, float momentum,
                      int nesterov) {
    const int64_t AHEAD = 4; /* rows are scattered over the table: prefetch a few rows ahead,
                                otherwise every row waits for its cache misses one by one */
    if (!rows && U == 1 && D >= PAR_MIN) {
        /* one dense block (the GRU weights): split it into chunks across the threads */
        const int64_t CH = 4096;
#pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < D; c0 += CH)
            adagrad_row(W + c0, acc + c0, mom ? mom + c0 : NULL, G + c0, D - c0 < CH ? D - c0 : CH,
                        lr, eps, momentum, nesterov);
        return;
    }
    /* rows are unique, so threads never write the same row */
#pragma omp parallel for schedule(static) if (U * D >= PAR_MIN)
    for (int64_t u = 0; u < U; u++) {
        if (rows && u + AHEAD < U) {
            const int64_t p = rows[u + AHEAD] * D;
            for (int64_t d = 0; d < D; d += 16) {
                __builtin_prefetch(W + p + d, 1);
                __builtin_prefetch(acc + p + d, 1);
                if (mom) __builtin_prefetch(mom + p + d, 1);
            }
        }
        if (mask && !mask[u]) continue;
        const int64_t r = rows ? rows[u] : u;
        adagrad_row(W + r * D, acc + r * D, mom ? mom + r * D : NULL, G + u * D, D, lr, eps,
                    momentum, nesterov);
    }
}

/* dst[idx[i], :] += src[i, :] for i < k (duplicates accumulate in order) */
void rnn_add_rows(float *dst, const int64_t *idx, const float *src, int64_t k, int64_t D) {
    for (int64_t i = 0; i < k; i++) {
        float *d = dst + idx[i] * D;
        const float *s = src + i * D;
        for (int64_t j = 0; j < D; j++) d[j] += s[j];
    }
}

/* ---------------------------------------------------------------------------------------------
 * Matrix products on both cores at once.
 *
 * At batch 32 every product of the step is skinny (one dimension 32 or 100): MKL splitting one
 * such product over two threads gains little (measured: 2 threads slower than 1 at batch 32).
 * But the step has independent products (the two GRU input/hidden products; the output layer's
 * dX = dS^T O and dO = dS X; the GRU weight gradients and the input gradient) and the score
 * product splits by rows. rnn_mm_jobs runs a list of products as two groups, one per OpenMP
 * thread, each a single-threaded MKL sgemm (torch's own MKL: the address of its exported
 * Fortran `sgemm_` is handed over by training/native.py). With one thread it runs them in order.
 */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
typedef int (*mkl_threads_local_fn)(int);
static sgemm_fn g_sgemm = 0;
static mkl_threads_local_fn g_mkl_local = 0;

void rnn_set_blas(void *sgemm, void *mkl_local) {
    g_sgemm = (sgemm_fn)sgemm;
    g_mkl_local = (mkl_threads_local_fn)mkl_local;
}

/* Row-major C[M,N] = op(A) op(B); ta: A is stored [K,M] (op = transpose), else [M,K];
 * tb: B is stored [N,K], else [K,N]. Column-major BLAS computes C^T = op(B)^T op(A)^T. */
static void mm_rowmajor(int ta, int tb, int M, int N, int K, const float *A, const float *B, float *C) {
    const float one = 1.0f, zero = 0.0f;
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    const int lda = ta ? M : K, ldb = tb ? K : N, ldc = N;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { memset(C, 0, sizeof(float) * (size_t)M * (size_t)N); return; }
    g_sgemm(&tB, &tA, &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

/* desc: n jobs x 8 int64 (ta, tb, M, N, K, A, B, C addresses); jobs [0, split) run on one
 * thread, [split, n) on the other. Returns 0, or -1 when no BLAS was handed over. */
int rnn_mm_jobs(int64_t n, int64_t split, const int64_t *desc) {
    if (!g_sgemm) return -1;
#ifdef _OPENMP
    int nt = omp_get_max_threads() >= 2 && split > 0 && split < n ? 2 : 1;
#pragma omp parallel num_threads(nt)
    {
        int t = thread_id();
        int64_t lo = nt == 1 ? 0 : (t == 0 ? 0 : split), hi = nt == 1 ? n : (t == 0 ? split : n);
        if (g_mkl_local) g_mkl_local(1);
        for (int64_t j = lo; j < hi; ++j) {
            const int64_t *d = desc + 8 * j;
            mm_rowmajor((int)d[0], (int)d[1], (int)d[2], (int)d[3], (int)d[4], (const float *)(intptr_t)d[5],
                        (const float *)(intptr_t)d[6], (float *)(intptr_t)d[7]);
        }
        if (g_mkl_local) g_mkl_local(0);
    }
#else
    for (int64_t j = 0; j < n; ++j) {
        const int64_t *d = desc + 8 * j;
        mm_rowmajor((int)d[0], (int)d[1], (int)d[2], (int)d[3], (int)d[4], (const float *)(intptr_t)d[5],
                    (const float *)(intptr_t)d[6], (float *)(intptr_t)d[7]);
    }
#endif
    return 0;
}
