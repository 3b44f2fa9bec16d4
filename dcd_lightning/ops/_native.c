/* One sample of a folded, eval-mode DCD layer (channel fusion, one block): the dynamic branch and
 * the sample's kernel in a single call.
 *
 * At batch 1 on a CPU each PyTorch call costs microseconds, and the branch plus the kernel
 * formation take a dozen of them per layer, which is more than the layer's arithmetic. This file
 * does the arithmetic of FoldedDCD._one_sample_1x1 (ops/_folded.py) in plain loops:
 *
 *     pooled  = adaptive average pool of x to pool x pool cells, flattened (c, i, j)
 *     hidden  = fc pooled;  hidden = relu(hidden)  or  hidden * hardsigmoid(se hidden)
 *     coef    = head hidden + head_bias          (Lambda logits, then Phi' = A2 Phi + I)
 *     lam     = gate(coef[:c_out])               (1 without channel attention)
 *     kernel  = lam W0' + P (Phi' Q1)            (added at the centre tap of a k x k kernel)
 *     bias    = lam b0 + P (Phi' c1) + P c2
 *
 * and returns kernel and bias for one ordinary convolution (dcd_one_sample). dcd_one_vector does
 * a 1x1 layer on a 1x1 map (the dynamic classifier) without forming a kernel, in matrix-vector
 * products. dcd_one_sample_apply is the activation route: after the caller's convolution with
 * W0', it runs the branch and adds the low-rank residual to that output in place,
 *
 *     out = lam out + P (Phi' (Q1 xs + c1)) + P c2      (xs: x at the centre taps)
 *
 * with small register-blocked matrix products (matmul), no kernel formed. dcd_one_sample_1x1 does
 * a whole 1x1, stride-1 layer, either route, its convolution included (for one sample a matrix
 * product, W x, by the same matmul).
 *
 * Matrices are row-major and contiguous; x is one sample (c_in, h, w). The branch's first two
 * products (fc, se: few outputs from many inputs) are dot products, four rows at a time (dots);
 * the heads (many outputs from few) come transposed (input-major), so their product is a sum of
 * scaled rows (vector operations along the output, see combine).
 *
 * Built at first use by ops/_native.py with -fopenmp-simd (vectorisation hints only: no threads
 * are started) and -ffp-contract=fast (a += b * c as one fused multiply-add; in ISO C mode GCC
 * otherwise leaves them apart, at ~2/3 of the speed); the PyTorch path stays where no C compiler
 * is found. The file includes itself once per floating-point type: the part below the #else is
 * the body, written for a type T.
 */

#ifndef T

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* the vector width of the blocked products: one register, 64 bytes with AVX-512, 32 with AVX, else
   16 (a generic vector wider than the target's registers is lowered to scalar code by GCC, ~50x
   slower) */
#if defined(__AVX512F__)
#define VEC_BYTES 64
#elif defined(__AVX__)
#define VEC_BYTES 32
#else
#define VEC_BYTES 16
#endif

/* The register block of the matrix products (see block): MR rows of a by up to WV vectors of
   columns, in MR x WV accumulators. With AVX-512's 32 vector registers 4 x 4 (16 accumulators and
   4 vectors of b). AVX and AVX2 have 16 registers, where 4 x 4 does not fit (its accumulators go
   through memory): 6 x 2 (12 accumulators, 2 of b, 1 broadcast value), in 0.69 of the time on an
   AVX2 CPU at MobileNetV2's 1x1 layer sizes. Elsewhere (SSE, Arm) 4 x 4, not measured there.
   Either can be chosen at build time (-DMR=.. -DWV=..; the tests do, to check both anywhere) */
#ifndef MR
#if defined(__AVX__) && !defined(__AVX512F__)
#define MR 6
#define WV 2
#else
#define MR 4
#define WV 4
#endif
#endif

/* VEC_BYTES of this build (the caller runs whole 1x1 layers here only where it is 32 or 64: measured) */
int dcd_vector_bytes(void) { return VEC_BYTES; }

/* this build's register block as 100 MR + WV (602: 6 rows by 2 vectors) */
int dcd_register_block(void) { return 100 * MR + WV; }

typedef struct {
    long c_in, c_out, latent, hidden, kernel_size, pool;
    long attention;  /* 1: channel attention (Lambda) present */
    long hard_gate;  /* 1: hard sigmoid gate, 0: sigmoid */
    const void *fc;           /* fc weight: hidden x (c_in pool^2) */
    const void *se;           /* squeeze-excite weight: hidden x hidden, or NULL (ReLU) */
    const void *head_t;       /* both heads transposed: hidden x (attention c_out + L^2) */
    const void *head_bias;    /* attention c_out + L^2 */
    const void *weight;       /* W0': c_out x c_in x k x k, gate range folded in */
    const void *bias;         /* b0: c_out, or NULL */
    const void *expand;       /* P: c_out x L */
    const void *compress;     /* Q1: L x c_in */
    const void *latent_bias;  /* c1: L, or NULL */
    const void *expand_bias;  /* P c2 (+ a folded norm's shift): c_out, or NULL */
} dcd_layer;

#define T float
#define NAME(name) name##_f32
#include "_native.c"
#undef T
#undef NAME

#define T double
#define NAME(name) name##_f64
#include "_native.c"
#undef T
#undef NAME

#else /* the body, for one type T */

/* One vector register's worth of T (VEC_BYTES), loadable from any address and allowed to alias
   arrays of T (they are read and written through it) */
typedef T NAME(vec) __attribute__((vector_size(VEC_BYTES), aligned(sizeof(T)), may_alias));
#define LANES ((long)(VEC_BYTES / sizeof(T)))

/* sum of n contiguous values, in four vector accumulators: with one, each add waits for the one
   before it (a pooling's plane sums ran at 8-11 G values/s on an AVX2 CPU, 11-20 with four) */
static T NAME(sum)(const T *values, long n) {
    NAME(vec) acc[4] = {{0}, {0}, {0}, {0}};
    long i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES)
        for (int q = 0; q < 4; ++q) acc[q] += ((const NAME(vec) *)(values + i))[q];
    for (; i + LANES <= n; i += LANES) acc[0] += *(const NAME(vec) *)(values + i);
    const NAME(vec) all = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    T total = 0;
    for (long q = 0; q < LANES; ++q) total += all[q];
    for (; i < n; ++i) total += values[i];
    return total;
}

/* out[:n] = scale base[:n] (or 0) + sum_j coefs[j] rows[j, :n], rows j at rows + j ld: every
   product here is this sum of scaled rows. The rows are read whole and in order, four per pass
   over out (which stays in the first-level cache), each added in turn: the matrix streams from
   memory front to back, as the hardware prefetchers like it. Blocks of out across all rows
   instead (the rows read a strip at a time, each strip a stride of ld apart) ran at ~10 GB/s from
   memory against ~19 here (ResNet-18's 512-channel heads, 1.3 MB: 129 -> 68 us, measured on an
   AVX2 machine with the matrix evicted; 46 -> 31 us with it in cache). The sums are taken in the
   same order either way. */
static void NAME(combine)(T *out, long n, const T *base, T scale, const T *coefs, const T *rows, long count,
                          long ld) {
    if (base) {
#pragma omp simd
        for (long i = 0; i < n; ++i) out[i] = scale * base[i];
    } else {
        for (long i = 0; i < n; ++i) out[i] = 0;
    }
    long j = 0;
    for (; j + 4 <= count; j += 4) {
        const T c0 = coefs[j], c1 = coefs[j + 1], c2 = coefs[j + 2], c3 = coefs[j + 3];
        const T *r0 = rows + j * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
#pragma omp simd
        for (long i = 0; i < n; ++i) out[i] = (((out[i] + c0 * r0[i]) + c1 * r1[i]) + c2 * r2[i]) + c3 * r3[i];
    }
    for (; j < count; ++j) {
        const T c = coefs[j], *row = rows + j * ld;
#pragma omp simd
        for (long i = 0; i < n; ++i) out[i] += c * row[i];
    }
}

/* dot product of n contiguous values */
static T NAME(dot)(const T *a, const T *b, long n) {
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (long i = 0; i < n; ++i) total += a[i] * b[i];
    return total;
}

/* out[r] = rows[r, :n] . x for r < count (rows r at rows + r ld), four rows at a time: four
   independent accumulators and four streams keep the loads in flight (one row's dot product waits
   on its own sum; a long matrix-vector product then runs at a fraction of the memory's speed). */
static void NAME(dots)(T *out, const T *rows, long ld, long count, const T *x, long n) {
    long r = 0;
    for (; r + 4 <= count; r += 4) {
        const T *r0 = rows + r * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (long i = 0; i < n; ++i) {
            const T v = x[i];
            s0 += r0[i] * v;
            s1 += r1[i] * v;
            s2 += r2[i] * v;
            s3 += r3[i] * v;
        }
        out[r] = s0, out[r + 1] = s1, out[r + 2] = s2, out[r + 3] = s3;
    }
    for (; r < count; ++r) out[r] = NAME(dot)(rows + r * ld, x, n);
}

static T NAME(hardsigmoid)(T v) { return v <= -3 ? 0 : (v >= 3 ? 1 : v / 6 + (T)0.5); }

/* cell i of pool along a side of length size, as adaptive pooling cuts it: [start, end) =
   [floor(i size / pool), ceil((i + 1) size / pool)) */
static void NAME(cell)(long i, long size, long pool, long *start, long *end) {
    *start = i * size / pool;
    *end = ((i + 1) * size + pool - 1) / pool;
}

/* adaptive average pooling of one (h, w) plane to pool x pool cells (see cell); the rows of a band
   of cells are first added into one row (vector adds along w), then each cell's columns of it are
   summed */
static void NAME(pool_plane)(const T *plane, long h, long w, long pool, T *band, T *out) {
    if (pool == 1) {
        out[0] = NAME(sum)(plane, h * w) / (T)(h * w);
        return;
    }
    for (long i = 0; i < pool; ++i) {
        long r0, r1;
        NAME(cell)(i, h, pool, &r0, &r1);
        for (long col = 0; col < w; ++col) band[col] = plane[r0 * w + col];
        for (long r = r0 + 1; r < r1; ++r) {
            const T *row = plane + r * w;
#pragma omp simd
            for (long col = 0; col < w; ++col) band[col] += row[col];
        }
        for (long j = 0; j < pool; ++j) {
            long c0, c1;
            NAME(cell)(j, w, pool, &c0, &c1);
            out[i * pool + j] = NAME(sum)(band + c0, c1 - c0) / (T)((r1 - r0) * (c1 - c0));
        }
    }
}

/* Whether pooling to pool x pool cells goes by dot products (pool_by_dots) rather than by bands
   of rows (pool_plane): where rows are shorter than two vectors, each row is too short for vector
   adds (a 256 x 14 x 14 input: 42 -> 18 us, 512 x 7 x 7: 57 -> 24, 128 x 28 x 28: 33 -> 19; at
   56 x 56, 27 -> 77, the bands win) */
static int NAME(pools_by_dots)(long pool, long w) { return pool > 1 && w < 2 * (long)(VEC_BYTES / sizeof(T)); }

/* pooled[c, cell] = sum_i x[c, i] avg[cell, i] for each of the c_in planes of h x w: avg holds
   each cell's averaging weights over the plane (1 / its size inside it, 0 elsewhere; see cell),
   and one pass of dots per plane gives its pool^2 cells */
static void NAME(pool_by_dots)(const T *x, long c_in, long h, long w, long pool, T *avg, T *pooled) {
    const long hw = h * w, cells = pool * pool;
    for (long i = 0; i < cells * hw; ++i) avg[i] = 0;
    for (long i = 0; i < pool; ++i) {
        long r0, r1;
        NAME(cell)(i, h, pool, &r0, &r1);
        for (long j = 0; j < pool; ++j) {
            long c0, c1;
            NAME(cell)(j, w, pool, &c0, &c1);
            const T value = (T)1 / (T)((r1 - r0) * (c1 - c0));
            for (long r = r0; r < r1; ++r)
                for (long c = c0; c < c1; ++c) avg[(i * pool + j) * hw + r * w + c] = value;
        }
    }
    for (long c = 0; c < c_in; ++c) NAME(dots)(pooled + c * cells, avg, hw, cells, x + c * hw, hw);
}

/* the branch's input: x pooled to pool x pool cells per channel, into the start of scratch */
static void NAME(pool_input)(const dcd_layer *layer, const T *x, long h, long w, T *scratch) {
    const long c_in = layer->c_in, pool = layer->pool;
    T *pooled = scratch, *band = pooled + c_in * pool * pool + 2 * layer->hidden;
    if (NAME(pools_by_dots)(pool, w))
        NAME(pool_by_dots)(x, c_in, h, w, pool, band, pooled);
    else
        for (long c = 0; c < c_in; ++c) NAME(pool_plane)(x + c * h * w, h, w, pool, band, pooled + c * pool * pool);
}

/* the branch and gates from pool_input's pooled values in scratch: coef = [lam (gated, if
   attention), Phi'] */
static void NAME(branch)(const dcd_layer *layer, T *coef, T *scratch) {
    const long hidden = layer->hidden, pool = layer->pool;
    const long n_att = layer->attention ? layer->c_out : 0, n_coef = n_att + layer->latent * layer->latent;
    const long n_pooled = layer->c_in * pool * pool;
    T *pooled = scratch, *hid = pooled + n_pooled, *se = hid + hidden;

    NAME(dots)(hid, (const T *)layer->fc, n_pooled, hidden, pooled, n_pooled);
    if (layer->se) {
        NAME(dots)(se, (const T *)layer->se, hidden, hidden, hid, hidden);
        for (long i = 0; i < hidden; ++i) hid[i] *= NAME(hardsigmoid)(se[i]);
    } else {
        for (long i = 0; i < hidden; ++i) hid[i] = hid[i] > 0 ? hid[i] : 0;
    }
    NAME(combine)(coef, n_coef, (const T *)layer->head_bias, 1, hid, (const T *)layer->head_t, hidden, n_coef);
    for (long o = 0; o < n_att; ++o)
        coef[o] = layer->hard_gate ? NAME(hardsigmoid)(coef[o]) : (T)1 / ((T)1 + (T)exp(-(double)coef[o]));
}

/* pooling, branch and gates of one sample: coef = [lam (gated, if attention), Phi']; scratch
   holds scratch_size values */
static void NAME(coefficients)(const dcd_layer *layer, const T *x, long h, long w, T *coef, T *scratch) {
    NAME(pool_input)(layer, x, h, w, scratch);
    NAME(branch)(layer, coef, scratch);
}

/* coefficients' scratch for an h x w input: the pooled input, two hidden vectors, then a band
   of w values (pool_plane) or the pool^2 x h w averaging weights (pool_by_dots) */
static long NAME(scratch_size)(const dcd_layer *layer, long h, long w) {
    const long pool = layer->pool;
    return layer->c_in * pool * pool + 2 * layer->hidden + (NAME(pools_by_dots)(pool, w) ? pool * pool * h * w : w);
}

/* Values of T in a 64-byte cache line */
#define LINE ((long)(64 / sizeof(T)))

/* How far ahead (in columns: two blocks of WV vectors) each block of matmul fetches the rows of
   `base` that a later block reads. Forming a kernel, lam W0' + P t, reads W0' only there: a few
   lines per block (6 rows x 64 bytes with AVX2's blocks), panel by panel down all the rows of W0',
   an order the hardware's stream prefetchers do not follow. With W0' out of the caches, as it is
   in a whole forward, each block waited on memory. Measured on an AVX2 CPU (one thread), W0'
   evicted before each call: 96 x 24 x 576, 100-127 -> 58-59 us (55-60 with W0' in cache);
   64 x 16 x 384, 41 -> 27 us. Whole models against the same build without it, in the same runs:
   MobileNetV2 x1.0 in 0.976 and 0.992 of its time, x0.5 in 0.992. */
#define BASE_AHEAD (2 * WV * LANES)

/* One block of matmul: rows r0 .. r0 + nr - 1 (nr = MR, or fewer for the last rows) and wv vectors
   of columns (wv = 1 to WV) from column i0 of a b, in nr x wv vector accumulators (each row of b
   loaded once for nr rows of a), then the epilogue for the columns below n. Called with
   constant nr and wv, so each use is compiled for its own sizes; a block needs at least eight
   accumulators to keep both FMA units busy (each add waits ~4 cycles for the one before it). */
static inline __attribute__((always_inline)) void NAME(block)(T *out, long ldo, const T *a, long lda, long k, const T *b,
                                                              long ldb, long i0, long n, long r0, const int nr,
                                                              const int wv, const T *scale, const T *base,
                                                              long ldbase, const T *shift) {
    NAME(vec) acc[MR][WV];
    for (int r = 0; r < nr; ++r)
        for (int q = 0; q < wv; ++q) acc[r][q] = (NAME(vec)){0};
    for (long j = 0; j < k; ++j) {
        const NAME(vec) *row = (const NAME(vec) *)(b + j * ldb + i0);
        NAME(vec) v[WV];
        for (int q = 0; q < wv; ++q) v[q] = row[q];
        for (int r = 0; r < nr; ++r) {
            const T c = a[(r0 + r) * lda + j];
            for (int q = 0; q < wv; ++q) acc[r][q] += c * v[q];
        }
    }
    const long len = n - i0 < wv * LANES ? n - i0 : wv * LANES;
    for (int r = 0; r < nr; ++r) {
        const long o = r0 + r;
        const T g = scale ? scale[o] : (T)1, s = shift ? shift[o] : (T)0;
        T *dst = out + o * ldo + i0, sums[WV * VEC_BYTES / sizeof(T)];
        const T *src = base ? base + o * ldbase + i0 : NULL;
        if (src && i0 + BASE_AHEAD + wv * LANES <= n) /* the row's base BASE_AHEAD columns on */
            for (long q = 0; q < wv * LANES; q += LINE) __builtin_prefetch(src + BASE_AHEAD + q);
        if (len == wv * LANES) { /* whole vectors */
            for (int q = 0; q < wv; ++q) {
                NAME(vec) value = acc[r][q] + s;
                if (src) value += g * ((const NAME(vec) *)src)[q];
                ((NAME(vec) *)dst)[q] = value;
            }
            continue;
        }
        for (int q = 0; q < wv; ++q) ((NAME(vec) *)sums)[q] = acc[r][q];
        for (long i = 0; i < len; ++i) dst[i] = (src ? g * src[i] : 0) + sums[i] + s;
    }
}

/* one block of wv (1 to WV) vectors at column i0, read from the padded copy `tail` of b's last
   columns when i0 is where that copy starts */
static inline __attribute__((always_inline)) void NAME(any_block)(T *out, long ldo, const T *a, long lda, long k,
                                                                  const T *b, long ldb, long n, long r0, const int nr,
                                                                  long i0, long wv, const T *tail, long i_tail,
                                                                  const T *scale, const T *base, long ldbase,
                                                                  const T *shift) {
    if (tail && i0 == i_tail) {
        out += i0, n -= i0, b = tail, ldb = wv * LANES, i0 = 0;
        base = base ? base + i_tail : NULL;
    }
    if (WV >= 4 && wv == 4) NAME(block)(out, ldo, a, lda, k, b, ldb, i0, n, r0, nr, 4, scale, base, ldbase, shift);
    if (WV >= 3 && wv == 3) NAME(block)(out, ldo, a, lda, k, b, ldb, i0, n, r0, nr, 3, scale, base, ldbase, shift);
    if (wv == 2) NAME(block)(out, ldo, a, lda, k, b, ldb, i0, n, r0, nr, 2, scale, base, ldbase, shift);
    if (wv == 1) NAME(block)(out, ldo, a, lda, k, b, ldb, i0, n, r0, nr, 1, scale, base, ldbase, shift);
}

/* rows of b per part of a long product: a panel of KC rows x 4 vectors (32 KB with AVX-512) stays in L1 */
#define KC 128

/* columns c0 .. n - 1 of matmul, one at a time: the column of b copied (k <= KC values), then
   dot products with a's rows, four rows at a time, and the epilogue of block */
static void NAME(columns_by_dots)(T *out, long ldo, const T *a, long lda, long rows, long k, const T *b, long ldb,
                                  long c0, long n, const T *scale, const T *base, long ldbase, const T *shift) {
    T column[KC], sums[4];
    for (long c = c0; c < n; ++c) {
        for (long j = 0; j < k; ++j) column[j] = b[j * ldb + c];
        for (long r0 = 0; r0 < rows; r0 += 4) {
            const long nr = rows - r0 < 4 ? rows - r0 : 4;
            NAME(dots)(sums, a + r0 * lda, lda, nr, column, k);
            for (long r = 0; r < nr; ++r) {
                const long o = r0 + r;
                const T g = scale ? scale[o] : (T)1, s = shift ? shift[o] : (T)0;
                out[o * ldo + c] = (base ? g * base[o * ldbase + c] : 0) + sums[r] + s;
            }
        }
    }
}

/* matmul for up to KC rows of b at a time (see matmul); a's rows are lda apart */
static int NAME(matmul_part)(T *out, long ldo, const T *a, long lda, long rows, long k, const T *b, long ldb,
                             long n, const T *scale, const T *base, long ldbase, const T *shift) {
    /* a last vector of columns at most a quarter full (a 7x7 map: 49 = 3 x 16 + 1 floats) would
       compute mostly padding: those columns go one at a time, the rest in whole vectors */
    const long spare = n % LANES;
    if (n > LANES && spare && 4 * spare <= LANES) {
        NAME(columns_by_dots)(out, ldo, a, lda, rows, k, b, ldb, n - spare, n, scale, base, ldbase, shift);
        n -= spare;
    }
    /* the columns in blocks of WV vectors, then up to two smaller ones (never a lone vector after
       blocks of 3 or 4: 4 + 1 becomes 3 + 2, as a block needs eight accumulators or more to be fast) */
    const long vectors = (n + LANES - 1) / LANES;
    long groups = vectors / WV, first = vectors % WV, second = 0;
    if (WV >= 3 && first == 1 && groups > 0) groups -= 1, first = WV - 1, second = 2;
    const long wide = groups * WV * LANES, last = second ? second : (first ? first : WV);
    const long i_tail = (vectors - last) * LANES;
    T *tail = NULL;
    if (ldb < vectors * LANES && n % LANES) { /* b's rows end inside the last vector: copy the last block */
        const long ld = last * LANES;
        tail = malloc(sizeof(T) * k * ld);
        if (!tail) return 1;
        for (long j = 0; j < k; ++j)
            for (long i = 0; i < ld; ++i) tail[j * ld + i] = i_tail + i < n ? b[j * ldb + i_tail + i] : 0;
    }
#define COLUMNS(r0, nr, i_from)                                                                                  \
    do {                                                                                                         \
        long i0 = (i_from);                                                                                      \
        for (; i0 < wide; i0 += WV * LANES)                                                                      \
            NAME(any_block)(out, ldo, a, lda, k, b, ldb, n, r0, nr, i0, WV, tail, i_tail, scale, base, ldbase, shift); \
        if (first) NAME(any_block)(out, ldo, a, lda, k, b, ldb, n, r0, nr, i0, first, tail, i_tail, scale, base, ldbase, shift); \
        if (second)                                                                                              \
            NAME(any_block)(out, ldo, a, lda, k, b, ldb, n, r0, nr, i0 + first * LANES, second, tail, i_tail, scale, \
                            base, ldbase, shift);                                                                \
    } while (0)
    long r0;
    if (k * ldb * (long)sizeof(T) <= (32 << 10)) { /* b fits in L1: MR rows of a at a time */
        for (r0 = 0; r0 + MR <= rows; r0 += MR) COLUMNS(r0, MR, 0);
    } else { /* panels of b (k x WV vectors) outermost, each kept in cache for all the rows of a */
        for (long i0 = 0; i0 < wide; i0 += WV * LANES)
            for (r0 = 0; r0 + MR <= rows; r0 += MR)
                NAME(any_block)(out, ldo, a, lda, k, b, ldb, n, r0, MR, i0, WV, tail, i_tail, scale, base, ldbase, shift);
        for (r0 = 0; r0 + MR <= rows; r0 += MR) COLUMNS(r0, MR, wide);
    }
    /* the last rows (fewer than MR): with MR = 6, four, then two at a time; then one at a time */
    if (MR > 4 && r0 + 4 <= rows) {
        COLUMNS(r0, 4, 0);
        r0 += 4;
    }
    if (MR > 4 && r0 + 2 <= rows) {
        COLUMNS(r0, 2, 0);
        r0 += 2;
    }
    for (; r0 < rows; ++r0) COLUMNS(r0, 1, 0);
#undef COLUMNS
    free(tail);
    return 0;
}

/* out[r, i] = scale[r] base[r, i] + shift[r] + sum_j a[r, j] b[j, i] for r < rows, i < n, with
   a (rows x k, row-major), b (k rows, ldb apart), scale, base and shift optional (1, 0, 0). b is read
   in whole vectors of LANES columns: where its rows can be read that far (ldb at least n rounded up
   to LANES, as in the padded scratch matrices) in place; otherwise the last, partial vector of
   columns is copied into a zero-padded block first. Over KC rows of b at a time: the first part
   writes out, the others add to it. base may be out (each value is read before it is written).
   Returns 1 when there is no memory for the padded block, else 0. */
static int NAME(matmul)(T *out, long ldo, const T *a, long rows, long k, const T *b, long ldb, long n,
                        const T *scale, const T *base, long ldbase, const T *shift) {
    int status = 0;
    for (long j0 = 0; j0 < k; j0 += KC) { /* k >= 1 */
        const long kc = k - j0 < KC ? k - j0 : KC;
        if (j0 == 0)
            status |= NAME(matmul_part)(out, ldo, a, k, rows, kc, b, ldb, n, scale, base, ldbase, shift);
        else
            status |= NAME(matmul_part)(out, ldo, a + j0, k, rows, kc, b + j0 * ldb, ldb, n, NULL, out, ldo, NULL);
    }
    return status;
}

/* t = Phi' Q1 (L x c_in, rows ld apart, zero past c_in) and v = Phi' c1 (L) */
static void NAME(latent_rows)(const dcd_layer *layer, const T *phi, T *t, long ld, T *v) {
    const long c_in = layer->c_in, latent = layer->latent;
    const T *compress = (const T *)layer->compress, *c1 = (const T *)layer->latent_bias;
    for (long a = 0; a < latent; ++a) {
        NAME(combine)(t + a * ld, c_in, NULL, 1, phi + a * latent, compress, latent, c_in);
        for (long i = c_in; i < ld; ++i) t[a * ld + i] = 0;
        v[a] = 0;
        if (c1)
            for (long b = 0; b < latent; ++b) v[a] += phi[a * latent + b] * c1[b];
    }
}

/* the sample's bias: bias[o] = lam[o] b0[o] + P[o] v + (P c2)[o] */
static void NAME(sample_bias)(const dcd_layer *layer, const T *lam, const T *v, T *bias_out) {
    const long c_out = layer->c_out, latent = layer->latent;
    const T *expand = (const T *)layer->expand, *b0 = (const T *)layer->bias, *c2 = (const T *)layer->expand_bias;
    for (long o = 0; o < c_out; ++o) {
        const T *p = expand + o * latent;
        T value = b0 ? (lam ? lam[o] : (T)1) * b0[o] : 0;
        for (long a = 0; a < latent; ++a) value += p[a] * v[a];
        bias_out[o] = c2 ? value + c2[o] : value;
    }
}

/* The activation route's latent input: z = Q1 xs + c1 (latent rows ld apart, zero from n to ld)
   for xs (c_in x n, rows ldx apart); ld is n rounded up to 16. Returns 1 when the product found
   no memory, else 0. It needs x only, not the branch: the callers run it while x is still in
   cache from the pooling, before the branch's weights stream through the caches. */
static int NAME(latent_input)(const dcd_layer *layer, const T *xs, long ldx, long n, long ld, T *z) {
    const int status = NAME(matmul)(z, ld, (const T *)layer->compress, layer->latent, layer->c_in, xs, ldx, n, NULL,
                                    NULL, 0, (const T *)layer->latent_bias);
    for (long a = 0; a < layer->latent; ++a) /* defined padding (lanes the last product computes, never stores) */
        for (long i = n; i < ld; ++i) z[a * ld + i] = 0;
    return status;
}

/* The activation route's residual, in place: out = lam out + P (Phi' z) + P c2 for z from
   latent_input and coef = [lam, Phi'] from the branch; fused is scratch like z. */
static int NAME(add_latent)(const dcd_layer *layer, const T *coef, const T *z, long n, long ld, T *fused, T *out) {
    const long c_out = layer->c_out, latent = layer->latent, n_att = layer->attention ? c_out : 0;
    NAME(matmul)(fused, ld, coef + n_att, latent, latent, z, ld, ld, NULL, NULL, 0, NULL);
    return NAME(matmul)(out, n, (const T *)layer->expand, c_out, latent, fused, ld, n, n_att ? coef : NULL, out, n,
                        (const T *)layer->expand_bias);
}

int NAME(dcd_one_sample)(const dcd_layer *layer, const T *x, long h, long w, T *kernel, T *bias_out) {
    const long c_in = layer->c_in, c_out = layer->c_out, latent = layer->latent, k = layer->kernel_size;
    const long taps = k * k, centre = (k / 2) * k + k / 2;
    const long n_att = layer->attention ? c_out : 0, n_coef = n_att + latent * latent;
    const long n_branch = NAME(scratch_size)(layer, h, w);
    const long ld = (c_in + 15) / 16 * 16; /* rows of t and of the residual, padded for matmul's blocks */
    const long n_residual = taps > 1 ? c_out * ld : 0;
    T *scratch = malloc(sizeof(T) * (n_branch + n_coef + latent * (ld + 1) + n_residual));
    if (!scratch) return 1;
    T *coef = scratch + n_branch, *t = coef + n_coef, *v = t + latent * ld, *residual = v + latent;

    NAME(coefficients)(layer, x, h, w, coef, scratch);
    /* kernel[o] = lam W0'[o] + P[o] t (at the centre tap of a k x k kernel) */
    const T *expand = (const T *)layer->expand, *weight = (const T *)layer->weight, *lam = n_att ? coef : NULL;
    NAME(latent_rows)(layer, coef + n_att, t, ld, v);
    if (taps == 1) { /* kernel = lam W0' + P t, all rows in one blocked product */
        NAME(matmul)(kernel, c_in, expand, c_out, latent, t, ld, c_in, lam, weight, c_in, NULL);
    } else { /* lam W0', then the 1x1 residual P t into the centre taps */
        NAME(matmul)(residual, ld, expand, c_out, latent, t, ld, c_in, NULL, NULL, 0, NULL);
        for (long o = 0; o < c_out; ++o) {
            const T g = lam ? lam[o] : (T)1, *w0 = weight + o * c_in * taps, *r = residual + o * ld;
            T *out = kernel + o * c_in * taps;
#pragma omp simd
            for (long i = 0; i < c_in * taps; ++i) out[i] = g * w0[i];
            for (long i = 0; i < c_in; ++i) out[i * taps + centre] += r[i];
        }
    }
    NAME(sample_bias)(layer, lam, v, bias_out);
    free(scratch);
    return 0;
}

/* The whole of a 1x1, stride-1 layer for one sample, its convolution included: out (c_out x h w)
   from x (c_in x h w). With `forms`, the sample's kernel and bias as in dcd_one_sample, then
   out = kernel x + bias; otherwise the activation route,
       out = lam (W0' x + b0) + P (Phi' (Q1 x + c1)) + P c2.
   A 1x1 convolution of one sample is a matrix product; doing it here spares the caller two
   allocations and a PyTorch call per layer. */
int NAME(dcd_one_sample_1x1)(const dcd_layer *layer, const T *x, long h, long w, long forms, T *out) {
    const long c_in = layer->c_in, c_out = layer->c_out, latent = layer->latent, n = h * w;
    const long n_att = layer->attention ? c_out : 0, n_coef = n_att + latent * latent;
    const long n_branch = NAME(scratch_size)(layer, h, w);
    const long ld = ((forms ? c_in : n) + 15) / 16 * 16; /* padded rows: t, or z and fused */
    const long n_work = forms ? latent * (ld + 1) + c_out * (c_in + 1) : 2 * latent * ld;
    T *scratch = malloc(sizeof(T) * (n_branch + n_coef + n_work));
    if (!scratch) return 1;
    T *coef = scratch + n_branch, *work = coef + n_coef, *lam = n_att ? coef : NULL;
    const T *weight = (const T *)layer->weight, *expand = (const T *)layer->expand;
    int status;

    if (forms) {
        T *t = work, *v = t + latent * ld, *kernel = v + latent, *bias = kernel + c_out * c_in;
        NAME(coefficients)(layer, x, h, w, coef, scratch);
        NAME(latent_rows)(layer, coef + n_att, t, ld, v);
        NAME(matmul)(kernel, c_in, expand, c_out, latent, t, ld, c_in, lam, weight, c_in, NULL);
        NAME(sample_bias)(layer, lam, v, bias);
        status = NAME(matmul)(out, n, kernel, c_out, c_in, x, n, n, NULL, NULL, 0, bias);
    } else { /* z = Q1 x + c1 while x is in cache from the pooling; the branch; out = W0' x + b0, then
                the residual in place */
        T *z = work, *fused = z + latent * ld;
        NAME(pool_input)(layer, x, h, w, scratch);
        status = NAME(latent_input)(layer, x, n, n, ld, z);
        NAME(branch)(layer, coef, scratch);
        status |= NAME(matmul)(out, n, weight, c_out, c_in, x, n, n, NULL, NULL, 0, (const T *)layer->bias);
        status |= NAME(add_latent)(layer, coef, z, n, ld, fused, out);
    }
    free(scratch);
    return status;
}

/* The activation route of one sample, after the caller's convolution with W0': given out =
   W0' x + b0 (c_out x h_out x w_out, the layer's own stride and padding), this computes the branch
   and, in place,
       out = lam out + P (Phi' (Q1 xs + c1)) + P c2,
   xs being the samples of x at the centre taps, x[:, s i, s j] (the residual is 1x1). No kernel is
   formed: at small maps (7x7) this is fewer operations than forming one. */
int NAME(dcd_one_sample_apply)(const dcd_layer *layer, const T *x, long h, long w, long stride, T *out) {
    const long c_in = layer->c_in, c_out = layer->c_out, latent = layer->latent;
    const long h_out = (h - 1) / stride + 1, w_out = (w - 1) / stride + 1, n = h_out * w_out;
    const long ld = (n + 15) / 16 * 16; /* columns of the scratch matrices, padded for matmul's blocks */
    const long n_att = layer->attention ? c_out : 0, n_coef = n_att + latent * latent;
    const long n_branch = NAME(scratch_size)(layer, h, w), n_xs = stride == 1 ? 0 : c_in * ld;
    T *scratch = malloc(sizeof(T) * (n_branch + n_coef + n_xs + 2 * latent * ld));
    if (!scratch) return 1;
    T *coef = scratch + n_branch, *xs = coef + n_coef, *z = xs + n_xs, *fused = z + latent * ld;

    NAME(pool_input)(layer, x, h, w, scratch);
    if (stride > 1) { /* the samples at the centre taps, gathered; at stride 1 they are x itself */
        for (long c = 0; c < c_in; ++c) {
            T *dst = xs + c * ld;
            const T *plane = x + c * h * w;
            for (long i = 0; i < h_out; ++i)
                for (long j = 0; j < w_out; ++j) dst[i * w_out + j] = plane[i * stride * w + j * stride];
            for (long i = n; i < ld; ++i) dst[i] = 0;
        }
    }
    /* z = Q1 xs + c1 while x is in cache from the pooling, then the branch, whose weights take
       the caches' place, then the residual */
    int status = NAME(latent_input)(layer, stride == 1 ? x : xs, stride == 1 ? n : ld, n, ld, z);
    NAME(branch)(layer, coef, scratch);
    status |= NAME(add_latent)(layer, coef, z, n, ld, fused, out);
    free(scratch);
    return status;
}

/* A plain linear layer of one sample, out = weight x + bias (bias may be NULL): dcd_one_vector's
   W0' x + b0, and (given by ops/static.py) static classifiers' too, so that a static model and its
   DCD model compute their classifiers' static part alike (as dcd_conv_1x1 does for 1x1 layers). */
int NAME(dcd_linear)(const T *weight, const T *bias, const T *x, long c_out, long c_in, T *out) {
    NAME(dots)(out, weight, c_in, c_out, x, c_in);
    if (bias)
        for (long o = 0; o < c_out; ++o) out[o] += bias[o];
    return 0;
}

/* A 1x1 layer on a 1x1 map (a dynamic linear layer, one sample): no kernel is formed, each term
   is a matrix-vector product,
       out = lam (W0' x + b0) + P (Phi' (Q1 x + c1)) + P c2                                      */
int NAME(dcd_one_vector)(const dcd_layer *layer, const T *x, T *out) {
    const long c_in = layer->c_in, c_out = layer->c_out, latent = layer->latent;
    const long n_att = layer->attention ? c_out : 0, n_coef = n_att + latent * latent;
    const long n_branch = NAME(scratch_size)(layer, 1, 1);
    T *scratch = malloc(sizeof(T) * (n_branch + n_coef + 2 * latent));
    if (!scratch) return 1;
    T *coef = scratch + n_branch, *z = coef + n_coef, *fused = z + latent;

    NAME(coefficients)(layer, x, 1, 1, coef, scratch);
    const T *phi = coef + n_att, *expand = (const T *)layer->expand, *compress = (const T *)layer->compress;
    const T *b0 = (const T *)layer->bias, *c1 = (const T *)layer->latent_bias, *c2 = (const T *)layer->expand_bias;
    const T *weight = (const T *)layer->weight;
    NAME(dots)(z, compress, c_in, latent, x, c_in);
    for (long a = 0; a < latent; ++a) z[a] += c1 ? c1[a] : 0;
    NAME(dots)(fused, phi, latent, latent, z, latent);
    NAME(dcd_linear)(weight, b0, x, c_out, c_in, out); /* W0' x + b0 */
    for (long o = 0; o < c_out; ++o) {
        const T lam = n_att ? coef[o] : (T)1;
        out[o] = lam * out[o] + NAME(dot)(expand + o * latent, fused, latent) + (c2 ? c2[o] : 0);
    }
    free(scratch);
    return 0;
}

/* A plain 1x1, stride-1 convolution of one sample, out = weight x + bias (bias may be NULL): the
   product of dcd_one_sample_1x1's whole layers without their branch. optimize_for_inference gives
   it to the static 1x1 convolutions that the same rule would send there (ops/static.py), so that a
   static model and its DCD model compute such layers alike. */
int NAME(dcd_conv_1x1)(const T *weight, const T *bias, const T *x, long c_out, long c_in, long n, T *out) {
    return NAME(matmul)(out, n, weight, c_out, c_in, x, n, n, NULL, NULL, 0, bias);
}

/* Max pooling of `planes` contiguous planes of h x w, kh x kw windows at strides sh, sw, padded by
   ph, pw (at most half a window, as PyTorch requires), no dilation, outputs rounded down: out holds
   the planes of oh x ow. Each output row's window rows are first reduced into one row (vector
   maxima along w, in a row padded with -inf), then each output is the maximum of kw of its values,
   for a whole output row at a time (strided vector loads; one output at a time, the compares'
   branches on random values took 3.1 ms for the stem below, against 0.4). A NaN anywhere in a
   window gives NaN, as in PyTorch. For the ResNet stem (64 x 112 x 112, 3 x 3, stride 2), whose
   NCHW pooling PyTorch's CPU kernel does with indices, in 8-9 ms on an AVX2 CPU (a tenth of a
   static ResNet-18 at batch 1). Returns 1 where no memory was left for the row. */
int NAME(dcd_max_pool)(const T *x, long planes, long h, long w, long kh, long kw, long sh, long sw, long ph, long pw,
                       T *out) {
    const long oh = (h + 2 * ph - kh) / sh + 1, ow = (w + 2 * pw - kw) / sw + 1, padded = w + 2 * pw;
    T *row = malloc(sizeof(T) * padded);
    if (!row) return 1;
    for (long j = 0; j < pw; ++j) row[j] = row[padded - 1 - j] = -(T)INFINITY;
    T *inner = row + pw;
    for (long plane = 0; plane < planes; ++plane) {
        const T *src = x + plane * h * w;
        T *dst = out + plane * oh * ow;
        for (long i = 0; i < oh; ++i) {
            long r0 = i * sh - ph, r1 = r0 + kh;
            r0 = r0 < 0 ? 0 : r0;
            r1 = r1 > h ? h : r1;
            memcpy(inner, src + r0 * w, sizeof(T) * w);
            for (long r = r0 + 1; r < r1; ++r) {
                const T *line = src + r * w;
#pragma omp simd
                for (long j = 0; j < w; ++j) {
                    const T v = line[j], m = inner[j];
                    inner[j] = (v > m || v != v) ? v : m;
                }
            }
            T *o = dst + i * ow;
#pragma omp simd
            for (long j = 0; j < ow; ++j) o[j] = row[j * sw];
            for (long t = 1; t < kw; ++t) {
#pragma omp simd
                for (long j = 0; j < ow; ++j) {
                    const T v = row[j * sw + t], m = o[j];
                    o[j] = (v > m || v != v) ? v : m;
                }
            }
        }
    }
    free(row);
    return 0;
}

#undef LANES
#undef LINE
#undef BASE_AHEAD
#undef KC

#endif
