/* Fused CPU kernels for the GRU4Rec training step (loaded by training/native.py via ctypes).
 *
 * Why: at batch 32 a step is ~40 small tensor ops; on 2 CPU cores the per-op dispatch and the
 * extra passes over [2080 x 32] / [U x H] temporaries cost more than the matrix products
 * (profile in benchmarks/README_gru4rec.md). These kernels do in one pass what took 5-12 torch
 * ops: coalescing the touched item rows, the sampled softmax cross-entropy (+logQ) gradient
 * scattered straight onto the unique rows, and the Adagrad(+momentum/Nesterov) update of the
 * touched rows in place. The matrix products go through torch's own MKL sgemm, called from
 * here (rnn_mm_jobs: independent products on both cores). rnn_train_chunk (end of the file)
 * runs whole steps of the official best setting, a chunk of them per call.
 *
 * Plain C, no torch headers: compiles in about a second; every pointer is a contiguous
 * float32 / int64 / uint8 buffer owned by a torch tensor on the Python side.
 * Build: gcc -O3 -march=native -ffp-contract=fast -fno-math-errno -fno-trapping-math -shared -fPIC (training/native.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* rows = a[0..ka) followed by b[0..kb) and c[0..kc) -> unique rows in first-occurrence order
 * (uniq[0..U)) and each row's position among them (inv[ka + kb + kc]). slot: scratch of n_items
 * int64 that must hold -1 everywhere on entry; restored to -1 on exit. Returns U. */
static int64_t coalesce3(const int64_t *a, int64_t ka, const int64_t *b, int64_t kb, const int64_t *c,
                         int64_t kc, int64_t *slot, int64_t *uniq, int64_t *inv) {
    int64_t U = 0;
    for (int64_t i = 0; i < ka + kb + kc; i++) {
        int64_t r = i < ka ? a[i] : (i < ka + kb ? b[i - ka] : c[i - ka - kb]);
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

int64_t rnn_coalesce2(const int64_t *a, int64_t ka, const int64_t *b, int64_t kb, int64_t *slot,
                      int64_t *uniq, int64_t *inv) {
    return coalesce3(a, ka, b, kb, NULL, 0, slot, uniq, inv);
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

/* sum of s[0..n) with 8 independent partial sums: vectorisable without reassociation */
static inline float row_sum8(const float *s, int64_t n) {
    float part[8] = {0};
    int64_t r = 0;
    for (; r + 8 <= n; r += 8)
        for (int k = 0; k < 8; k++) part[k] += s[r + k];
    float t = 0.0f;
    for (; r < n; r++) t += s[r];
    for (int k = 0; k < 8; k++) t += part[k];
    return t;
}

/* Rows of the folded softmax (shared by rnn_xe_softmax and rnn_train_chunk). */
/* s[0..M) += bu (the bias: addmm with a broadcast bias measured 1.8x slower than the plain
 * product); into lmx[r] the running max when the row is an output column (in_out); returns the
 * sum of s * 0, which stays 0 unless a score is NaN/inf */
static inline float softmax_bias_max_row(float *s, float bu, int in_out, int64_t M, float *lmx) {
    float chk = 0.0f;
    for (int64_t r = 0; r < M; r++) {
        s[r] += bu;
        chk += s[r] * 0.0f;
    }
    if (in_out)
        for (int64_t r = 0; r < M; r++) lmx[r] = s[r] > lmx[r] ? s[r] : lmx[r];
    return chk;
}

/* s[r] = w exp(s[r] - mx[r]), added into ls[r] */
static inline void softmax_exp_row(float *s, float w, const float *mx, int64_t M, float *ls) {
    for (int64_t r = 0; r < M; r++) {
        const float e = w * exp_nonpos(s[r] - mx[r]);
        s[r] = e;
        ls[r] += e;
    }
}

static inline void scale_row(float *s, const float *scale, int64_t M) {
    for (int64_t r = 0; r < M; r++) s[r] *= scale[r];
}

/* The official code's cross-entropy of one mini-batch row (gru4rec_pytorch.py
 * xe_loss_with_softmax: -sum(log(diag(softmax) + 1e-24))): -log(p + 1e-24), p = the softmax
 * probability of the row's target column = exp(diag - mx) / sum. Returns that loss and in *g
 * the factor of its gradient, p / (p + 1e-24) times (softmax - one-hot): 1 to float precision
 * while p > 1e-17, ~0 once the target is hopeless (p < 1e-24, loss capped at 55.26). Without
 * the epsilon a row whose hidden state has blown up (the dropped-out output is the carried
 * state, so a unit with z ~ 1 grows 1/(1-p_drop) per step along a long session) reported
 * losses in the thousands and pushed its full gradient into the item rows and GRU weights
 * (issue 13, benchmarks/README_gru4rec.md). */
#define XE_EPS 1e-24
static inline double xe_row_loss(float mx, float sum, float diag, float *g) {
    const double lp = (double)diag - (double)mx - log((double)sum);
    const double p = exp(lp);
    *g = (float)(p / (p + XE_EPS));
    return lp > -30.0 ? -lp - log1p(XE_EPS / p) : -log(p + XE_EPS);
}

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
 *   loss = inv_b * sum_r -log(p_r + 1e-24), p_r = softmax_c (S[col[c], r] - q[c]) at c = r
 * (the official code's form: xe_row_loss), or NaN if any score is not finite. */
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
        for (int64_t u = 0; u < U; u++) lchk += softmax_bias_max_row(S + u * M, by[uniq[u]], in_out[u], M, lmx);
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
        for (int64_t u = 0; u < U; u++) softmax_exp_row(S + u * M, wsum[u], mx, M, ls);
    }
    for (int t = 0; t < nt; t++)
        for (int64_t r = 0; r < M; r++) sum[r] += psum[t][r];
    double loss = 0.0;
    float g[M];
    for (int64_t r = 0; r < M; r++) {
        loss += xe_row_loss(mx[r], sum[r], diag[r], &g[r]);
        scale[r] = inv_b * g[r] / sum[r];
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < U; u++) scale_row(S + u * M, scale, M);
    for (int64_t r = 0; r < M; r++) S[col[r] * M + r] -= inv_b * g[r];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < U; u++) dby[u] = row_sum8(S + u * M, M);
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

/* Backward of the gates on M rows: dout [M, H] = d loss / d out -> dgi, dgh [M, 3H]
 * (d loss / d gi, gh). */
static void gru_gates_bwd_rows(const float *restrict dout, const float *restrict mask,
                               const float *restrict h, const float *restrict r_,
                               const float *restrict z_, const float *restrict n_,
                               const float *restrict ghn, int64_t M, int64_t H,
                               float *restrict dgi, float *restrict dgh) {
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
    }
}

/* Bias gradients gb_ih, gb_hh [3H] = column sums of dgi, dgh [M, 3H] (row order), columns
 * [lo, hi) only (overwritten). */
static void gru_bias_grads(const float *dgi, const float *dgh, int64_t M, int64_t H, int64_t lo,
                           int64_t hi, float *gb_ih, float *gb_hh) {
    for (int64_t j = lo; j < hi; j++) {
        float a = 0.0f, b = 0.0f;
        for (int64_t i = 0; i < M; i++) { a += dgi[i * 3 * H + j]; b += dgh[i * 3 * H + j]; }
        gb_ih[j] = a;
        gb_hh[j] = b;
    }
}

/* The same, plus the bias gradients gb_ih, gb_hh [3H] (column sums, overwritten). */
void rnn_gru_gates_bwd(const float *restrict dout, const float *restrict mask,
                       const float *restrict h, const float *restrict r_, const float *restrict z_,
                       const float *restrict n_, const float *restrict ghn, int64_t M, int64_t H,
                       float *restrict dgi, float *restrict dgh, float *restrict gb_ih,
                       float *restrict gb_hh) {
    gru_gates_bwd_rows(dout, mask, h, r_, z_, n_, ghn, M, H, dgi, dgh);
    gru_bias_grads(dgi, dgh, M, H, 0, 3 * H, gb_ih, gb_hh);
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

/* Row u of the U rows of G onto table row rows[u] (u itself when rows is NULL), skipped when
 * mask[u] == 0; prefetches the table row AHEAD positions later (below `end`): the rows are
 * scattered over the table, otherwise every row waits for its cache misses one by one. */
static inline void adagrad_table_row(float *W, float *acc, float *mom, const int64_t *rows,
                                     const uint8_t *mask, int64_t u, int64_t end, int64_t D,
                                     const float *G, float lr, float eps, float momentum, int nesterov) {
    const int64_t AHEAD = 4;
    if (rows && u + AHEAD < end) {
        const int64_t p = rows[u + AHEAD] * D;
        for (int64_t d = 0; d < D; d += 16) {
            __builtin_prefetch(W + p + d, 1);
            __builtin_prefetch(acc + p + d, 1);
            if (mom) __builtin_prefetch(mom + p + d, 1);
        }
    }
    if (mask && !mask[u]) return;
    const int64_t r = rows ? rows[u] : u;
    adagrad_row(W + r * D, acc + r * D, mom ? mom + r * D : NULL, G + u * D, D, lr, eps, momentum,
                nesterov);
}

void rnn_adagrad_rows(float *W, float *acc, float *mom, const int64_t *rows, const uint8_t *mask,
                      int64_t U, int64_t D, const float *G, float lr, float eps, float momentum,
                      int nesterov) {
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
    for (int64_t u = 0; u < U; u++)
        adagrad_table_row(W, acc, mom, rows, mask, u, U, D, G, lr, eps, momentum, nesterov);
}

/* dst[idx[i], :] += src[i, :] (* mask[i, :] when mask is not NULL) for i < k (duplicates
 * accumulate in order) */
static void add_rows(float *dst, const int64_t *idx, const float *src, const float *mask, int64_t k,
                     int64_t D) {
    for (int64_t i = 0; i < k; i++) {
        float *d = dst + idx[i] * D;
        const float *s = src + i * D;
        if (mask) {
            const float *m = mask + i * D;
            for (int64_t j = 0; j < D; j++) {
                /* rounded product, then the sum (no FMA contraction): bit-compatible with the
                 * per-step path, whose dx * mask is a separate torch op */
                float p = s[j] * m[j];
                __asm__("" : "+x"(p));
                d[j] += p;
            }
        } else {
            for (int64_t j = 0; j < D; j++) d[j] += s[j];
        }
    }
}

void rnn_add_rows(float *dst, const int64_t *idx, const float *src, int64_t k, int64_t D) {
    add_rows(dst, idx, src, NULL, k, D);
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

/* Row-major C[M,N] = op(A) op(B) on sub-blocks of larger row-major matrices (leading dimensions
 * lda, ldb, ldc); ta: A is stored [K,M] (op = transpose), else [M,K]; tb: B is stored [N,K], else
 * [K,N]. Column-major BLAS computes C^T = op(B)^T op(A)^T. */
static void mm_rowmajor_ld(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                           float *C, int ldc) {
    const float one = 1.0f, zero = 0.0f;
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
    g_sgemm(&tB, &tA, &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

/* the same on whole matrices */
static void mm_rowmajor(int ta, int tb, int M, int N, int K, const float *A, const float *B, float *C) {
    mm_rowmajor_ld(ta, tb, M, N, K, A, ta ? M : K, B, tb ? K : N, C, N);
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

/* ---------------------------------------------------------------------------------------------
 * A run of whole training steps in one call (the official best setting's path: tied
 * embedding, sampled softmax cross-entropy (+logQ), Adagrad (+momentum / Nesterov), any number
 * of GRU layers).
 *
 * Why: at batch 32 one step is ~1-2 ms of arithmetic, and driving it from Python (~40 tensor
 * ops and ctypes calls per step, plus the per-step loop of the epoch) added ~0.5-0.7 ms. Here
 * the steps of a chunk run inside ONE OpenMP parallel region: the same products (torch's MKL
 * sgemm, single-threaded per thread) and the same element-wise kernels as the per-step path
 * (FastStep in training/gru4rec.py, which stays the reference and runs the shrunk tail batches),
 * with each phase split between the threads and a barrier between phases:
 *   A  coalesce [x, targets, samples] into unique rows (thread 0) | reset states (all)
 *   B  gather the unique output rows O and the inputs Wy[x] (* embedding dropout)
 *   C  per layer: gi = x W_ih^T and gh = h W_hh^T, each thread for its own gate rows
 *      (gate_rows); gates by batch rows
 *   D  scores O out^T by halves of the unique rows; softmax folded onto the unique rows
 *      (as rnn_xe_softmax), loss, dS, bias gradients
 *   E  by the halves of the unique rows of D: dO = dS out for them, and their part of
 *      dout = dS^T O (summed by rows at the start of F)
 *   F  per layer, top down: gate backward by batch rows; then each thread's gate rows: bias
 *      and weight gradients and its part of dx (the two parts summed by rows afterwards)
 *   G  input rows' gradient added to dO (thread 0); the dense Adagrad of each thread's own
 *      gate rows; then the Adagrad update of the touched Wy / By rows by the halves of D / E
 * Threads: min(2, omp_get_max_threads()); results depend only on that number (fixed splits,
 * reductions in thread order), so a resumed run equals an uninterrupted one.
 * ------------------------------------------------------------------------------------------- */
#define RNN_MAXL 8

typedef struct {
    int64_t B, S, L, n_items, D, n_flat, nesterov;
    int64_t H[RNN_MAXL];
    float *Wy, *By, *Wy_acc, *Wy_mom, *By_acc, *By_mom;     /* *_mom NULL: no momentum */
    float *flat, *gflat, *dacc, *dmom;                       /* dense block (all GRU weights) */
    float *W_ih[RNN_MAXL], *W_hh[RNN_MAXL], *b_ih[RNN_MAXL], *b_hh[RNN_MAXL];
    float *gW_ih[RNN_MAXL], *gW_hh[RNN_MAXL], *gb_ih[RNN_MAXL], *gb_hh[RNN_MAXL];
    const float *logp;      /* [n_items] log support, NULL: no logQ correction */
    const float *eq_in;     /* [n_items] exp(-w_in * logp) (NULL when logp is NULL) */
    const float *eq_ex;     /* [n_items] exp(-w_extra * logp) */
    int64_t *slot;          /* [n_items] scratch, all -1 */
    float lr, eps, momentum, w_in, w_extra, inv_b;
    int64_t loss_kind;      /* RNN_LOSS_XE | RNN_LOSS_BPRMAX */
    int64_t act_kind;       /* final activation before a bpr-max loss: RNN_ACT_LINEAR | RNN_ACT_ELU */
    float act_alpha, bpreg; /* ELU alpha (> 0); bpr-max score regularisation */
} rnn_ctx;

#define RNN_LOSS_XE 0
#define RNN_LOSS_BPRMAX 1
#define RNN_ACT_LINEAR 0
#define RNN_ACT_ELU 1
#define BPR_EPS 1e-24

static void split_range(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* optional wall-clock time per phase (thread 0's view, barrier waits included) */
static int g_prof = 0;
static double g_pt[12];
static double wall_now(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return 0.0;
#endif
}
/* thread t's busy time per phase (from leaving one barrier to reaching the next, summed over
 * the phase's barriers): g_busy[t][k]; a phase's wall time minus a thread's busy time is what
 * that thread waited */
static double g_busy[2][12];
#define PT(k) do { if (g_prof) { double now_ = wall_now(); if (t == 0) g_pt[k] += now_ - t_last; \
                                  t_last = now_; if (t < 2) g_busy[t][k] += busy; busy = 0.0; } } while (0)
/* a barrier of rnn_train_chunk; while profiling, it adds the time since the previous one to busy */
#define BAR() do { if (g_prof) busy += wall_now() - t_dep; _Pragma("omp barrier") if (g_prof) t_dep = wall_now(); } while (0)

/* on: profile the phases from now on (0: stop); out[36] (or NULL) receives the seconds so far:
 * out[0..12) the wall time per phase (A; C products; D; E; F; G1; G2; B gather (+ a barrier,
 * only while profiling); C gates; unused x3 -- see rnn_train_chunk), out[12..24) thread 0's and
 * out[24..36) thread 1's busy time per phase; then zeroes them */
void rnn_chunk_profile(int on, double *out) {
    if (out) {
        memcpy(out, g_pt, sizeof g_pt);
        memcpy(out + 12, g_busy, sizeof g_busy);
    }
    memset(g_pt, 0, sizeof g_pt);
    memset(g_busy, 0, sizeof g_busy);
    g_prof = on;
}

/* the per-row max over the threads' partial maxima into lmxa[B]; 0 when a thread's finiteness
 * sum (chk2) says some score was NaN / inf (every thread gets the same answer) */
static inline int merge_max_finite(const float *pmx, const float *chk2, int nt, int64_t B, float *lmxa) {
    for (int64_t r = 0; r < B; r++) {
        float m = -INFINITY;
        for (int k = 0; k < nt; k++) m = pmx[k * B + r] > m ? pmx[k * B + r] : m;
        lmxa[r] = m;
    }
    float tot = 0.0f;
    for (int k = 0; k < nt; k++) tot += chk2[k];
    return isfinite(tot);
}

/* bpr-max (rnn_train_chunk, phase D): one unique output row's contributions to each mini-batch
 * row r's sums over its negatives (softmax weight e, e*sig, e*r^2, e*sig*(1-sig)). The row
 * stands for w columns, one fewer for a row whose own target it is (own_u[r] == u). Branch-free
 * with restrict pointers so that gcc vectorises it (a `continue` on wr = 0 kept it scalar:
 * ~0.9 ms of a 2.8 ms retailrocket step); wr >= 0 (w counts its own target), and a column
 * that is no negative of row r (wr = 0) adds exact zeros since exp_clamped is finite. */
static inline void bprmax_sums_row(const float *restrict sr, float w, const int32_t *restrict own_u,
                                   int32_t u, const float *restrict lmx, const float *restrict diag,
                                   int64_t B, float *restrict ls, float *restrict la,
                                   float *restrict lq, float *restrict lg) {
    for (int64_t r = 0; r < B; r++) {
        const float wr = w - (own_u[r] == u ? 1.0f : 0.0f);
        const float e = wr * exp_nonpos(sr[r] - lmx[r]);
        const float sg = sigmoidf_(diag[r] - sr[r]);
        ls[r] += e;
        la[r] += e * sg;
        lq[r] += e * sr[r] * sr[r];
        lg[r] += e * sg * (1.0f - sg);
    }
}

/* Flush-to-zero / denormals-are-zero for the calling thread (x86 MXCSR), returning the old
 * mode for ftz_restore. The softmax weights of far-below-the-max scores underflow into
 * subnormals (exp_clamped bottoms out at 2^-126 times a factor < 1), and every multiply by a
 * subnormal takes a microcode assist on x86: the bpr-max sums of a retailrocket step spent
 * ~0.4 ms on them (issue 13). Flushed, such a weight is 0 instead of < 1.2e-38: nothing a
 * float sum that holds the row max's weight (1) could register. */
#if defined(__SSE__)
#include <xmmintrin.h>
static inline unsigned ftz_on(void) {
    const unsigned old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    return old;
}
static inline void ftz_restore(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned ftz_on(void) { return 0; }
static inline void ftz_restore(unsigned old) { (void)old; }
#endif

static float *salloc(size_t nfloat) {
    size_t bytes = (nfloat * sizeof(float) + 63) / 64 * 64;
    return (float *)aligned_alloc(64, bytes ? bytes : 64);
}

/* Adagrad (+ momentum) of the n dense values whose gradient starts at g (inside gflat) */
static void dense_adagrad(const rnn_ctx *c, const float *g, int64_t n) {
    const int64_t a = g - c->gflat;
    if (n > 0)
        adagrad_row(c->flat + a, c->dacc + a, c->dmom ? c->dmom + a : NULL, c->gflat + a, n, c->lr, c->eps,
                    c->momentum, (int)c->nesterov);
}

/* Thread t's rows [g0, g1) of a layer's 3H gate rows (of W_ih, W_hh, their gradients and
 * biases): halves at a multiple of 16, all with one thread. Each thread computes those rows'
 * products in C and F and updates them in G, so a weight matrix and its gradient never move
 * between the cores (measured on yoochoose's 480 units: with the dense update by halves of the
 * block, the thread updating W_ih, which both threads had read, took 660-740 us per step, the
 * other ~300). */
static inline void gate_rows(int64_t h, int t, int nt, int64_t *g0, int64_t *g1) {
    const int64_t mid = nt > 1 ? ((3 * h / 2 + 8) / 16) * 16 : 3 * h;
    const int64_t m = mid > 3 * h ? 3 * h : mid;
    *g0 = t ? m : 0;
    *g1 = t ? 3 * h : m;
}

/* Runs steps 0..n-1; every step is a full batch of B rows. X, Y [n, B] inputs / targets,
 * smp [n, S] extra negatives (NULL when S == 0), keep [n, B] (0: the slot starts a new
 * session), emb [n, B, D] embedding dropout mask or NULL, hid[l] [n, B, H_l] or NULL; state[l]
 * [B, H_l] is read and replaced by the final state. losses [n] receives each step's loss.
 * Returns the number of steps run: n, or (k + 1) when step k's scores were not finite (its
 * loss is NaN and no update was applied), or -1 when no BLAS was handed over / out of memory. */
int64_t rnn_train_chunk(const rnn_ctx *c, int64_t n, const int64_t *X, const int64_t *Y,
                        const int64_t *smp, const float *keep, const float *emb,
                        const float *const *hid, float *const *state, float *losses) {
    if (!g_sgemm) return -1;
    const int64_t B = c->B, S = c->S, C = B + S, L = c->L, D = c->D;
    const int64_t Umax = B + C;
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads() >= 2 ? 2 : 1;
#endif
    int64_t Hmax = D, Hsum = 0;
    for (int64_t l = 0; l < L; l++) { Hmax = c->H[l] > Hmax ? c->H[l] : Hmax; Hsum += c->H[l]; }
    /* scratch */
    int64_t *uniq = (int64_t *)malloc(sizeof(int64_t) * Umax);
    int64_t *inv = (int64_t *)malloc(sizeof(int64_t) * Umax);
    uint8_t *in_out = (uint8_t *)malloc((size_t)Umax);
    float *O = salloc(Umax * D), *dO = salloc(Umax * D), *Ssc = salloc(Umax * B);
    float *wsum = salloc(Umax), *dby = salloc(Umax), *inp = salloc(B * D);
    float *gi = salloc(B * 3 * Hmax), *gh = salloc(B * 3 * Hmax);
    float *dgi = salloc(B * 3 * Hmax), *dgh = salloc(B * 3 * Hmax);
    float *dA = salloc(B * Hmax), *dBuf = salloc(B * Hmax), *dn1 = salloc(B * Hmax);
    float *cache = salloc(4 * B * Hsum);          /* r, z, n, ghn per layer */
    float *spare = salloc(B * Hsum);              /* the other state buffer per layer */
    float *red = salloc(6 * 2 * B + 8);           /* per-thread max / sums; mx, sum, diag */
    float *bred = salloc(6 * B + 8);              /* bpr-max: per-thread sums of e*sig, e*r^2, e*sig*(1-sig) */
    int64_t U = 0, stop = n;
    float *cur[RNN_MAXL], *nxt[RNN_MAXL], *rC[RNN_MAXL], *zC[RNN_MAXL], *nC[RNN_MAXL], *gC[RNN_MAXL];
    if (!uniq || !inv || !in_out || !O || !dO || !Ssc || !wsum || !dby || !inp || !gi || !gh ||
        !dgi || !dgh || !dA || !dBuf || !dn1 || !cache || !spare || !red || !bred) {
        stop = -1;
        goto done;
    }
    for (int64_t l = 0, off = 0; l < L; off += c->H[l], l++) {
        const int64_t h = c->H[l];
        cur[l] = state[l];
        nxt[l] = spare + B * off;
        rC[l] = cache + 4 * B * off;
        zC[l] = rC[l] + B * h;
        nC[l] = zC[l] + B * h;
        gC[l] = nC[l] + B * h;
    }
    float *pmx = red, *psum = red + 2 * B, *mx = red + 4 * B;
    float *diag = red + 6 * B;
    float *pA = bred, *pQ = bred + 2 * B, *pG = bred + 4 * B;
    const int bprmax = c->loss_kind == RNN_LOSS_BPRMAX;
    float chk2[2] = {0.0f, 0.0f};

#pragma omp parallel num_threads(nt)
    {
        const int t = thread_id();
        double t_last = g_prof ? wall_now() : 0.0, t_dep = t_last, busy = 0.0;
        const unsigned csr = ftz_on();
        for (int64_t s = 0; s < n; s++) {
            const int64_t *x = X + s * B, *yt = Y + s * B, *ys = smp ? smp + s * S : NULL;
            const float *kp = keep + s * B;
            int64_t lo, hi;
            /* A: coalesce (thread 0) | state reset (by rows) */
            if (t == 0) {
                const int64_t u = coalesce3(x, B, yt, B, ys, S, c->slot, uniq, inv);
                memset(wsum, 0, sizeof(float) * u);
                memset(in_out, 0, (size_t)u);
                for (int64_t k = 0; k < C; k++) {
                    const int64_t item = k < B ? yt[k] : ys[k - B];
                    const int64_t q = inv[B + k];
                    wsum[q] += c->logp ? (k < B ? c->eq_in : c->eq_ex)[item] : 1.0f;
                    in_out[q] = 1;
                }
                U = u;
            }
            split_range(B, t, nt, &lo, &hi);
            for (int64_t l = 0; l < L; l++) {
                const int64_t h = c->H[l];
                for (int64_t i = lo; i < hi; i++) {
                    float *row = cur[l] + i * h;
                    const float k = kp[i];
                    for (int64_t j = 0; j < h; j++) row[j] *= k;
                }
            }
            /* inputs: rows of Wy (tied), times the embedding dropout mask */
            for (int64_t i = lo; i < hi; i++) {
                const float *w = c->Wy + x[i] * D;
                float *o = inp + i * D;
                if (emb) {
                    const float *m = emb + (s * B + i) * D;
                    for (int64_t j = 0; j < D; j++) o[j] = w[j] * m[j];
                } else {
                    memcpy(o, w, sizeof(float) * D);
                }
            }
            BAR();
            PT(0);
            /* B: the unique output rows */
            split_range(U, t, nt, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) memcpy(O + u * D, c->Wy + uniq[u] * D, sizeof(float) * D);
            if (g_prof) {  /* the same on every thread: the barrier only while profiling */
                BAR();
            }
            PT(7);
            /* C: GRU layers (the gathers above are not read until phase D) */
            const float *xin = inp;
            int64_t hin = D;
            for (int64_t l = 0; l < L; l++) {
                const int64_t h = c->H[l];
                int64_t g0, g1;  /* this thread's gate rows of W_ih / W_hh (gate_rows) */
                gate_rows(h, t, nt, &g0, &g1);
                mm_rowmajor_ld(0, 1, (int)B, (int)(g1 - g0), (int)hin, xin, (int)hin, c->W_ih[l] + g0 * hin,
                               (int)hin, gi + g0, (int)(3 * h));
                mm_rowmajor_ld(0, 1, (int)B, (int)(g1 - g0), (int)h, cur[l], (int)h, c->W_hh[l] + g0 * h, (int)h,
                               gh + g0, (int)(3 * h));
                BAR();
                PT(1);
                split_range(B, t, nt, &lo, &hi);
                if (hi > lo)
                    rnn_gru_gates_fwd(gi + lo * 3 * h, gh + lo * 3 * h, c->b_ih[l], c->b_hh[l],
                                      cur[l] + lo * h, hid[l] ? hid[l] + (s * B + lo) * h : NULL,
                                      hi - lo, h, nxt[l] + lo * h, rC[l] + lo * h, zC[l] + lo * h,
                                      nC[l] + lo * h, gC[l] + lo * h);
                BAR();
                PT(8);
                xin = nxt[l];
                hin = h;
            }
            const float *out = nxt[L - 1];
            /* D (bpr-max): scores of own unique rows, bias, the final activation; per mini-batch
             * row r the softmax runs over its negatives = every column but its own target's
             * (the official softmax_neg), folded onto the unique rows: row u stands for wsum[u]
             * columns, one fewer for a mini-batch row whose target it is (training/losses.py
             * bpr_max_loss is the reference; the per-step path computes it with autograd) */
            if (bprmax) {
                split_range(U, t, nt, &lo, &hi);
                if (hi > lo) mm_rowmajor(0, 1, (int)(hi - lo), (int)B, (int)D, O + lo * D, out, Ssc + lo * B);
                {
                    float *lmx = pmx + t * B;
                    float lchk = 0.0f;
                    for (int64_t r = 0; r < B; r++) lmx[r] = -INFINITY;
                    for (int64_t u = lo; u < hi; u++) {
                        float *sr = Ssc + u * B;
                        const float bu = c->By[uniq[u]];
                        for (int64_t r = 0; r < B; r++) {
                            sr[r] += bu;
                            lchk += sr[r] * 0.0f;
                        }
                        if (!in_out[u]) continue;
                        if (c->act_kind == RNN_ACT_ELU) {
                            const float al = c->act_alpha;
                            for (int64_t r = 0; r < B; r++)
                                sr[r] = sr[r] > 0.0f ? sr[r] : al * (exp_clamped(sr[r]) - 1.0f);
                        }
                        const float w = wsum[u];
                        for (int64_t r = 0; r < B; r++) {
                            const int own = inv[B + r] == u;
                            if (own) diag[r] = sr[r];
                            if (w - (own ? 1.0f : 0.0f) > 0.0f && sr[r] > lmx[r]) lmx[r] = sr[r];
                        }
                    }
                    chk2[t] = lchk;
                }
                BAR();
                {
                    float lmxa[B];
                    if (!merge_max_finite(pmx, chk2, nt, B, lmxa)) {
                        if (t == 0) { losses[s] = NAN; stop = s + 1; }
                        break;
                    }
                    float *ls = psum + t * B, *la = pA + t * B, *lq = pQ + t * B, *lg = pG + t * B;
                    int32_t own_u[B];  /* row r's own target's unique row (int32: vectorises) */
                    for (int64_t r = 0; r < B; r++) {
                        ls[r] = la[r] = lq[r] = lg[r] = 0.0f;
                        own_u[r] = (int32_t)inv[B + r];
                    }
                    for (int64_t u = lo; u < hi; u++) {
                        if (!in_out[u]) continue;
                        const float *sr = Ssc + u * B;
                        const float w = wsum[u];
                        bprmax_sums_row(sr, w, own_u, (int32_t)u, lmxa, diag, B, ls, la, lq, lg);
                    }
                    if (t == 0) memcpy(mx, lmxa, sizeof(float) * B);
                }
                BAR();
                {
                    /* loss_r = -log(P + 1e-24) + bpreg Q, P = sum_j s_j sig(t - r_j), Q = sum_j s_j r_j^2;
                     * d/dr_j = s_j [(sig_j (1 - sig_j) - sig_j + P) / (P + eps) + bpreg (2 r_j + r_j^2 - Q)],
                     * d/dt = -sum_j s_j sig_j (1 - sig_j) / (P + eps); then times the activation's slope */
                    float iz[B], P[B], Q[B], Gt[B], ipe[B];
                    double lossr = 0.0;
                    for (int64_t r = 0; r < B; r++) {
                        float z = 0.0f, a = 0.0f, q = 0.0f, g = 0.0f;
                        for (int k = 0; k < nt; k++) {
                            z += psum[k * B + r]; a += pA[k * B + r]; q += pQ[k * B + r]; g += pG[k * B + r];
                        }
                        iz[r] = z > 0.0f ? 1.0f / z : 0.0f;  /* no negative at all: no gradient */
                        P[r] = a * iz[r];
                        Q[r] = q * iz[r];
                        Gt[r] = g * iz[r];
                        const double pe = (double)P[r] + BPR_EPS;
                        ipe[r] = (float)(1.0 / pe);
                        lossr += -log(pe) + (double)c->bpreg * (double)Q[r];
                    }
                    if (t == 0) losses[s] = (float)(lossr * c->inv_b);
                    const float al = c->act_alpha, bpreg = c->bpreg, ib = c->inv_b;
                    const int elu = c->act_kind == RNN_ACT_ELU;
                    for (int64_t u = lo; u < hi; u++) {
                        float *sr = Ssc + u * B;
                        if (!in_out[u]) {
                            memset(sr, 0, sizeof(float) * B);
                            dby[u] = 0.0f;
                            continue;
                        }
                        const float w = wsum[u];
                        for (int64_t r = 0; r < B; r++) {
                            const float R = sr[r];
                            const int own = inv[B + r] == u;
                            const float wr = w - (own ? 1.0f : 0.0f);
                            float g = 0.0f;
                            if (wr > 0.0f) {
                                const float sm = wr * exp_nonpos(R - mx[r]) * iz[r];
                                const float sg = sigmoidf_(diag[r] - R);
                                g = sm * ((sg * (1.0f - sg) - sg + P[r]) * ipe[r] + bpreg * (2.0f * R + R * R - Q[r]));
                            }
                            if (own) g -= Gt[r] * ipe[r];
                            sr[r] = g * ib * (elu && R <= 0.0f ? R + al : 1.0f);
                        }
                        dby[u] = row_sum8(sr, B);
                    }
                }
            } else {
            /* D: scores of own unique rows, bias, max over the output rows, finiteness */
            split_range(U, t, nt, &lo, &hi);
            if (hi > lo) mm_rowmajor(0, 1, (int)(hi - lo), (int)B, (int)D, O + lo * D, out, Ssc + lo * B);
            {
                float *lmx = pmx + t * B;
                float lchk = 0.0f;
                for (int64_t r = 0; r < B; r++) lmx[r] = -INFINITY;
                for (int64_t u = lo; u < hi; u++)
                    lchk += softmax_bias_max_row(Ssc + u * B, c->By[uniq[u]], in_out[u], B, lmx);
                chk2[t] = lchk;
            }
            BAR();
            {
                float lmxa[B];
                if (!merge_max_finite(pmx, chk2, nt, B, lmxa)) {
                    if (t == 0) { losses[s] = NAN; stop = s + 1; }
                    break; /* every thread sees the same total: all leave together */
                }
                /* the target's score, before own rows are overwritten by the exponentials */
                for (int64_t r = 0; r < B; r++) {
                    const int64_t u = inv[B + r];
                    if (u >= lo && u < hi)
                        diag[r] = Ssc[u * B + r] - (c->logp ? c->w_in * c->logp[yt[r]] : 0.0f);
                }
                float *ls = psum + t * B;
                for (int64_t r = 0; r < B; r++) ls[r] = 0.0f;
                for (int64_t u = lo; u < hi; u++) softmax_exp_row(Ssc + u * B, wsum[u], lmxa, B, ls);
                if (t == 0) memcpy(mx, lmxa, sizeof(float) * B);
            }
            BAR();
            {
                float lsc[B], gr[B];
                double lossr = 0.0;
                for (int64_t r = 0; r < B; r++) {
                    float sm = 0.0f;
                    for (int k = 0; k < nt; k++) sm += psum[k * B + r];
                    lossr += xe_row_loss(mx[r], sm, diag[r], &gr[r]);  /* the same on every thread */
                    lsc[r] = c->inv_b * gr[r] / sm;
                }
                if (t == 0) losses[s] = (float)(lossr * c->inv_b);
                for (int64_t u = lo; u < hi; u++) scale_row(Ssc + u * B, lsc, B);
                for (int64_t r = 0; r < B; r++) {
                    const int64_t u = inv[B + r];
                    if (u >= lo && u < hi) Ssc[u * B + r] -= c->inv_b * gr[r];
                }
                for (int64_t u = lo; u < hi; u++) dby[u] = row_sum8(Ssc + u * B, B);
            }
            }
            BAR();
            PT(2);
            /* E: by the same halves of the unique rows as D (each thread reads only the score
             * rows it wrote and the output rows it gathered): their output rows' gradient dO, and
             * a partial gradient of the top layer's output (thread 0 into dA, thread 1 into dn1;
             * summed by rows at the start of F, like the partial input gradients of the layers) */
            split_range(U, t, nt, &lo, &hi);
            mm_rowmajor(1, 0, (int)B, (int)D, (int)(hi - lo), Ssc + lo * B, O + lo * D, t ? dn1 : dA);
            if (hi > lo) mm_rowmajor(0, 0, (int)(hi - lo), (int)D, (int)B, Ssc + lo * B, out, dO + lo * D);
            BAR();
            PT(3);
            /* F: layers top down; dA holds d loss / d (layer output) */
            float *dcur = dA, *dnext = dBuf;
            for (int64_t l = L - 1; l >= 0; l--) {
                const int64_t h = c->H[l], hi_in = l ? c->H[l - 1] : D;
                const float *lx = l ? nxt[l - 1] : inp;
                split_range(B, t, nt, &lo, &hi);
                if (nt > 1)  /* the two parts of this layer's dout (E's, or the layer above's) */
                    for (int64_t i = lo * h; i < hi * h; i++) dcur[i] += dn1[i];
                if (hi > lo)
                    gru_gates_bwd_rows(dcur + lo * h, hid[l] ? hid[l] + (s * B + lo) * h : NULL,
                                       cur[l] + lo * h, rC[l] + lo * h, zC[l] + lo * h, nC[l] + lo * h,
                                       gC[l] + lo * h, hi - lo, h, dgi + lo * 3 * h, dgh + lo * 3 * h);
                BAR();
                /* this thread's gate rows (as in C): their bias gradients (column sums in row
                 * order, as rnn_gru_gates_bwd), weight gradients, and part of the input gradient
                 * dnext = dgi W_ih over them (thread 0 into dnext, thread 1 into dn1; summed by
                 * the next layer down / before phase G) */
                int64_t g0, g1;
                gate_rows(h, t, nt, &g0, &g1);
                gru_bias_grads(dgi, dgh, B, h, g0, g1, c->gb_ih[l], c->gb_hh[l]);
                mm_rowmajor_ld(1, 0, (int)(g1 - g0), (int)h, (int)B, dgh + g0, (int)(3 * h), cur[l], (int)h,
                               c->gW_hh[l] + g0 * h, (int)h);
                mm_rowmajor_ld(1, 0, (int)(g1 - g0), (int)hi_in, (int)B, dgi + g0, (int)(3 * h), lx, (int)hi_in,
                               c->gW_ih[l] + g0 * hi_in, (int)hi_in);
                mm_rowmajor_ld(0, 0, (int)B, (int)hi_in, (int)(g1 - g0), dgi + g0, (int)(3 * h),
                               c->W_ih[l] + g0 * hi_in, (int)hi_in, t ? dn1 : dnext, (int)hi_in);
                BAR();
                PT(4);
                float *tmp = dcur; dcur = dnext; dnext = tmp;
            }
            /* G: the input rows' gradient (times the embedding mask) onto dO, dense Adagrad */
            if (t == 0) {
                if (nt > 1)  /* layer 1's two parts of the input rows' gradient */
                    for (int64_t i = 0; i < B * D; i++) dcur[i] += dn1[i];
                add_rows(dO, inv, dcur, emb ? emb + s * B * D : NULL, B, D);
            }
            /* each thread updates its own gate rows of every layer (gate_rows): the weights it
             * read in C and F, and the gradients it wrote in F */
            for (int64_t l = 0; l < L; l++) {
                const int64_t h = c->H[l], hin = l ? c->H[l - 1] : D;
                int64_t g0, g1;
                gate_rows(h, t, nt, &g0, &g1);
                dense_adagrad(c, c->gW_ih[l] + g0 * hin, (g1 - g0) * hin);
                dense_adagrad(c, c->gW_hh[l] + g0 * h, (g1 - g0) * h);
                dense_adagrad(c, c->gb_ih[l] + g0, g1 - g0);
                dense_adagrad(c, c->gb_hh[l] + g0, g1 - g0);
            }
            BAR();
            PT(5);
            split_range(U, t, nt, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) {
                adagrad_table_row(c->Wy, c->Wy_acc, c->Wy_mom, uniq, NULL, u, hi, D, dO, c->lr, c->eps,
                                  c->momentum, (int)c->nesterov);
                adagrad_table_row(c->By, c->By_acc, c->By_mom, uniq, in_out, u, hi, 1, dby, c->lr, c->eps,
                                  c->momentum, (int)c->nesterov);
            }
            BAR();
            PT(6);
            if (t == 0)
                for (int64_t l = 0; l < L; l++) { float *tmp = cur[l]; cur[l] = nxt[l]; nxt[l] = tmp; }
            BAR();
        }
        ftz_restore(csr);
    }
    /* the final state where the caller expects it */
    for (int64_t l = 0; l < L; l++)
        if (cur[l] != state[l]) memcpy(state[l], cur[l], sizeof(float) * B * c->H[l]);
done:
    free(uniq); free(inv); free(in_out); free(O); free(dO); free(Ssc); free(wsum); free(dby);
    free(inp); free(gi); free(gh); free(dgi); free(dgh); free(dA); free(dBuf); free(dn1); free(cache);
    free(spare); free(red); free(bred);
    return stop;
}

/* ---- session-parallel slot assignment (training/batching.py parallel_slots is the reference
 * and the fallback): job i, in order, to the slot that falls free first (the lowest slot on
 * ties), a binary min-heap of (first free step, slot). The assignment depends only on which
 * pair is smallest at each job, so any heap gives Python's heapq result. Returns 0, or -1 when
 * out of memory. */
int rnn_parallel_slots(int64_t n, const int64_t *dur, int64_t n_slots, int64_t *slot_of, int64_t *start_of) {
    int64_t *hf = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    int64_t *hs = (int64_t *)malloc(sizeof(int64_t) * (n_slots > 0 ? n_slots : 1));
    if (!hf || !hs) { free(hf); free(hs); return -1; }
    for (int64_t b = 0; b < n_slots; b++) { hf[b] = 0; hs[b] = b; }  /* already a heap */
    for (int64_t i = 0; i < n; i++) {
        slot_of[i] = hs[0];
        start_of[i] = hf[0];
        const int64_t f = hf[0] + dur[i], sl = hs[0];
        int64_t k = 0;  /* sift the root's new pair down */
        for (;;) {
            int64_t c = 2 * k + 1;
            if (c >= n_slots) break;
            if (c + 1 < n_slots && (hf[c + 1] < hf[c] || (hf[c + 1] == hf[c] && hs[c + 1] < hs[c]))) c++;
            if (hf[c] < f || (hf[c] == f && hs[c] < sl)) {
                hf[k] = hf[c];
                hs[k] = hs[c];
                k = c;
            } else {
                break;
            }
        }
        hf[k] = f;
        hs[k] = sl;
    }
    free(hf);
    free(hs);
    return 0;
}

/* ---- counter-based random draws (training/rng.py is the reference and the fallback) -------
 * Value i of a stream with key k and start position s is splitmix64's output mix64(k + (s + i
 * + 1) * GOLDEN): independent of thread count and chunking, so C and numpy give the same bits. */
#define RNG_GOLDEN 0x9E3779B97F4A7C15ULL
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* inverted-dropout mask: out[i] = scale if u_i >= p else 0, u_i = (z_i >> 40) 2^-24 in [0, 1) */
void rnn_rand_mask(uint64_t key, uint64_t start, int64_t n, float p, float scale, float *out) {
    const int nt = n_threads(n);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < n; i++) {
        const uint64_t z = mix64(key + (start + (uint64_t)i + 1) * RNG_GOLDEN);
        const float u = (float)(z >> 40) * 0x1p-24f;
        out[i] = u >= p ? scale : 0.0f;
    }
}

/* Walker alias draws over n_items: bucket = high 32 bits of z scaled to [0, n_items) (multiply
 * and shift), u = low 32 bits 2^-32; out[i] = bucket if u < prob[bucket] else alias[bucket] */
void rnn_alias_draw(uint64_t key, uint64_t start, int64_t n, const double *prob, const int64_t *alias,
                    int64_t n_items, int64_t *out) {
    const int nt = n_threads(n);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < n; i++) {
        const uint64_t z = mix64(key + (start + (uint64_t)i + 1) * RNG_GOLDEN);
        const uint64_t b = ((z >> 32) * (uint64_t)n_items) >> 32;
        const double u = (double)(uint32_t)z * 0x1p-32;
        out[i] = u < prob[b] ? (int64_t)b : alias[b];
    }
}

/* ---- evaluation: one ranking pass over each score row (evaluation/loop.py "Fused ranking") ----
 * Row r's scores are v_j = S[r, j] + bias[j] (the caller passes zeros for no bias). In one read of
 * the row (two loops over it while it sits in L1/L2): the target's exact counts greater[r] =
 * #{j: v_j > t}, ties[r] = #{j: v_j == t} - 1 with t = v_target (the same float expression for
 * every item, so the counts are exact for these scores), the kk largest values with their items
 * (top_v / top_i, sorted descending, ties by the smaller item), and the scores of the F items
 * fut[r, :]. Returns the number of NaN scores seen (the caller refuses them). Rows in parallel. */
static inline float rank_score(const float *s, const float *bias, int64_t j) { return s[j] + bias[j]; }

/* v (item j) into the k largest so far, tv[0..*filled) descending (ti: their items, or NULL):
 * dropped unless the list is short or v beats its last. With items, equal values are ordered by
 * the smaller item (whatever order they are offered in); without, of equal values the one
 * offered first stays ahead */
static inline int rank_before(float v, int64_t j, const float *tv, const int64_t *ti, int64_t b) {
    return v > tv[b] || (ti && v == tv[b] && j < ti[b]);
}
static inline void topk_push(float *tv, int64_t *ti, int64_t k, int64_t *filled, float v, int64_t j) {
    if (*filled == k && !rank_before(v, j, tv, ti, k - 1)) return;
    int64_t b = *filled < k ? *filled : k - 1;
    while (b > 0 && rank_before(v, j, tv, ti, b - 1)) {
        tv[b] = tv[b - 1];
        if (ti) ti[b] = ti[b - 1];
        b--;
    }
    tv[b] = v;
    if (ti) ti[b] = j;
    if (*filled < k) (*filled)++;
}

/* the k-th largest (1-based, k <= n) of a[0..n), kept in buf[0..k); most values fail the first
 * comparison */
static float kth_largest(const float *a, int64_t n, int64_t k, float *buf) {
    int64_t filled = 0;
    for (int64_t i = 0; i < n; i++) topk_push(buf, NULL, k, &filled, a[i], i);
    return buf[k - 1];
}

/* Items are split into ng = ceil(N / 16) groups, group b = {b, b + ng, b + 2 ng, ...} (up to 16
 * items): the group maxima are element-wise maxima of the row's 16 consecutive stretches of ng
 * scores, so both loops below vectorise with no per-group horizontal reduction (consecutive
 * 16-score blocks took one horizontal max and three horizontal sums per block: 2-3x slower) */
#define RANK_GROUP 16

/* row s + b against t: #greater, #equal, #NaN into *g, *e, *nn; gm[0..ng) the group maxima */
static void rank_row_pass(const float *restrict s, const float *restrict b, int64_t N, int64_t ng, float t,
                          int32_t *g, int32_t *e, int32_t *nn, float *restrict gm) {
    int32_t gl = 0, el = 0, nl = 0;
    for (int64_t k = 0; k < ng; k++) gm[k] = -INFINITY;
    for (int64_t j0 = 0; j0 < N; j0 += ng) {  /* 16 stretches (the last one may be shorter) */
        const int64_t len = N - j0 < ng ? N - j0 : ng;
        const float *restrict sj = s + j0, *restrict bj = b + j0;
#pragma omp simd reduction(+ : gl, el, nl)
        for (int64_t k = 0; k < len; k++) {
            const float v = sj[k] + bj[k];
            gl += v > t;
            el += v == t;
            nl += v != v;
            gm[k] = v > gm[k] ? v : gm[k];
        }
    }
    *g = gl;
    *e = el;
    *nn = nl;
}

int64_t rnn_rank_rows(const float *S, const float *bias, int64_t R, int64_t N, const int64_t *target,
                      const int64_t *fut, int64_t F, int64_t kk, float *top_v, int64_t *top_i,
                      float *fut_s, int32_t *greater, int32_t *ties) {
    int64_t n_nan = 0, fail = 0;
    const int nt = n_threads(R * N);
    const int64_t nb = (N + RANK_GROUP - 1) / RANK_GROUP;  /* groups (rank_row_pass) */
#pragma omp parallel num_threads(nt) reduction(+ : n_nan, fail)
    {
        /* per thread: group maxima (+ kk to select in), candidates (values, items) */
        float *bm = salloc(nb + kk), *cv = salloc(N);
        int64_t *ci = (int64_t *)malloc(sizeof(int64_t) * (N > 0 ? N : 1));
        float *bsel = bm ? bm + nb : NULL;
        const int ok = bm && cv && ci;
        if (!ok) fail = 1;
#pragma omp for schedule(dynamic, 4)
        for (int64_t r = 0; r < R; r++) {
            if (!ok) continue;
            const float *s = S + r * N;
            const float t = rank_score(s, bias, target[r]);
            for (int64_t f = 0; f < F; f++) fut_s[r * F + f] = rank_score(s, bias, fut[r * F + f]);
            /* 1: the target's counts, NaNs, and each group's maximum (vectorised) */
            int32_t g = 0, e = 0, nn = 0;
            rank_row_pass(s, bias, N, nb, t, &g, &e, &nn, bm);
            greater[r] = g;
            ties[r] = e - 1;
            n_nan += nn;
            /* 2: a threshold T <= the kk-th largest score: the kk-th largest group maximum (kk
             * groups hold a score >= it); only groups whose maximum reaches T can hold a top
             * score, and only scores >= T are candidates (ties with T included) */
            float T = -INFINITY;
            if (kk <= nb) T = kth_largest(bm, nb, kk, bsel);
            int64_t C = 0;
            for (int64_t blk = 0; blk < nb; blk++) {
                if (!(bm[blk] >= T)) continue;
                for (int64_t j = blk; j < N; j += nb) {
                    const float v = rank_score(s, bias, j);
                    if (v >= T) { cv[C] = v; ci[C] = j; C++; } /* never a NaN: NaN >= T is false */
                }
            }
            /* 3: the kk best candidates, descending, ties by the smaller item (topk_push) */
            float *tv = top_v + r * kk;
            int64_t *ti = top_i + r * kk;
            int64_t filled = 0;
            for (int64_t c = 0; c < C; c++) topk_push(tv, ti, kk, &filled, cv[c], ci[c]);
            for (int64_t k = filled; k < kk; k++) { tv[k] = -INFINITY; ti[k] = 0; } /* N < kk or NaNs */
        }
        free(bm); free(cv); free(ci);
    }
    return fail ? -1 : n_nan;
}
