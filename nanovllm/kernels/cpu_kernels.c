/* nanovllm's CPU kernels for bfloat16: attention (decode over the paged KV cache, causal prefill), the per-layer
 * element-wise ops and the greedy argmax, each one pass over its data. Built at first use by
 * nanovllm/kernels/cpu.py (cc -O3 -march=native -fopenmp) for CPUs with AVX-512 (F, BW, VL); the PyTorch functions
 * they replace are the reference they are tested against.
 *
 * Tensors arrive as raw pointers with their strides in elements. bfloat16 values travel as uint16_t, 32 at a time
 * in one 512-bit load: each 32-bit lane holds an (even, odd) pair of elements, widened to two float vectors by a
 * shift and a mask and narrowed back the same way, with round-to-nearest-even (NaN kept NaN) as torch converts;
 * nothing shuffles. Every element-wise kernel rounds where the PyTorch reference rounds (each bf16 op there
 * computes in float and rounds its result), so it matches the reference's bits; reductions sum in their own
 * order. A function returns 0, or -1 for a shape it does not take or when memory runs out (the caller then runs
 * the reference). num_threads: the OpenMP team size, torch.get_num_threads() of the caller. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16  /* query heads per KV head */
#define MAX_PAIRS 8   /* head_dim up to 256, in loads of 32 values */

typedef uint16_t bf16;

/* 32 bf16 values as floats: the even-indexed elements and the odd-indexed ones */
typedef struct {
    __m512 even, odd;
} pair32;

static inline pair32 widen(__m512i w) {
    pair32 r = {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000)))};
    return r;
}

static inline pair32 load32(const bf16 *p) { return widen(_mm512_loadu_si512(p)); }

static inline pair32 maskz_load32(__mmask32 m, const bf16 *p) { return widen(_mm512_maskz_loadu_epi16(m, p)); }

static inline __mmask32 tail32(int64_t left) {
    return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
}

/* x rounded to bfloat16, to nearest even, kept in the lane's high half (the low half zero) */
static inline __m512i rne(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));  /* quiet NaN, not rounded into inf */
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000));
}

/* the value a bf16 tensor holds after an op that computed x */
static inline __m512 round_bf16(__m512 x) { return _mm512_castsi512_ps(rne(x)); }

static inline __m512i narrow(pair32 v) { return _mm512_or_si512(_mm512_srli_epi32(rne(v.even), 16), rne(v.odd)); }

static inline void store32(bf16 *p, pair32 v) { _mm512_storeu_si512(p, narrow(v)); }

static inline void mask_store32(__mmask32 m, bf16 *p, pair32 v) { _mm512_mask_storeu_epi16(p, m, narrow(v)); }

/* 2**x: 2**n * 2**f with n = round(x), f in [-1/2, 1/2] by a degree-6 polynomial (relative error ~2e-7);
 * scalef makes 0 far below and inf far above. x goes second into min/max, which return their second operand
 * when one is NaN: a NaN stays NaN (a NaN score then makes its softmax NaN, as in PyTorch) */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(150.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* ---- RMSNorm, with the residual add fused in ------------------------------------------------------------- */

/* out = weight * bf16(h * rsqrt(mean(h**2) + eps)) with h = x, or h = bf16(x + residual) (also written to
 * residual_out) when residual is given: layernorm.py's rms_norm and add_rms_norm. */
int nv_rms_norm(const bf16 *x, int64_t stride_x, const bf16 *residual, int64_t stride_r, const bf16 *weight,
                bf16 *out, int64_t stride_o, bf16 *residual_out, int64_t stride_ro, int64_t rows, int64_t cols,
                float eps, int num_threads) {
    if (cols < 1 || cols > 65536) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) if (rows * cols >= 65536) reduction(| : failed)
    {
        float *h = (float *)aligned_alloc(64, ((cols + 31) & ~(int64_t)31) * sizeof(float));
        failed |= h == NULL;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (h == NULL) continue;
            const bf16 *xr = x + r * stride_x, *rr = residual ? residual + r * stride_r : NULL;
            bf16 *ro = residual ? residual_out + r * stride_ro : NULL, *orow = out + r * stride_o;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < cols; c += 32) {  /* h (zero past the row), and its sum of squares */
                const __mmask32 m = tail32(cols - c);
                pair32 v = m == 0xffffffffu ? load32(xr + c) : maskz_load32(m, xr + c);
                if (rr) {
                    pair32 a = m == 0xffffffffu ? load32(rr + c) : maskz_load32(m, rr + c);
                    v.even = round_bf16(_mm512_add_ps(v.even, a.even));
                    v.odd = round_bf16(_mm512_add_ps(v.odd, a.odd));
                    if (m == 0xffffffffu) store32(ro + c, v); else mask_store32(m, ro + c, v);
                }
                _mm512_store_ps(h + c, v.even);
                _mm512_store_ps(h + c + 16, v.odd);
                acc = _mm512_fmadd_ps(v.odd, v.odd, _mm512_fmadd_ps(v.even, v.even, acc));
            }
            const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)cols + eps));
            for (int64_t c = 0; c < cols; c += 32) {
                const __mmask32 m = tail32(cols - c);
                pair32 w = m == 0xffffffffu ? load32(weight + c) : maskz_load32(m, weight + c), o;
                o.even = _mm512_mul_ps(w.even, round_bf16(_mm512_mul_ps(_mm512_load_ps(h + c), rstd)));
                o.odd = _mm512_mul_ps(w.odd, round_bf16(_mm512_mul_ps(_mm512_load_ps(h + c + 16), rstd)));
                if (m == 0xffffffffu) store32(orow + c, o); else mask_store32(m, orow + c, o);
            }
        }
        free(h);
    }
    return failed ? -1 : 0;  /* out of memory: the caller runs the reference */
}

/* ---- SiLU(gate) * up ------------------------------------------------------------------------------------ */

static inline __m512 silu_mul(__m512 g, __m512 u) {
    const __m512 e = exp2_ps(_mm512_mul_ps(g, _mm512_set1_ps(-1.4426950408889634f)));  /* exp(-g) */
    return _mm512_mul_ps(round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e))), u);
}

/* x: [rows, 2 * d] rows of [gate | up]; out: [rows, d] = bf16(bf16(silu(gate)) * up), activation.py's rounding */
int nv_silu_and_mul(const bf16 *x, int64_t stride_x, bf16 *out, int64_t stride_o, int64_t rows, int64_t d,
                    int num_threads) {
    const int64_t chunks = (d + 31) / 32;
    #pragma omp parallel for num_threads(num_threads) schedule(static) collapse(2) if (rows * d >= 32768)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t ch = 0; ch < chunks; ch++) {
            const int64_t c = ch * 32;
            const bf16 *gate = x + r * stride_x + c, *up = x + r * stride_x + d + c;
            const __mmask32 m = tail32(d - c);
            const int whole = m == 0xffffffffu;
            pair32 g = whole ? load32(gate) : maskz_load32(m, gate), u = whole ? load32(up) : maskz_load32(m, up);
            pair32 o = {silu_mul(g.even, u.even), silu_mul(g.odd, u.odd)};
            if (whole) store32(out + r * stride_o + c, o); else mask_store32(m, out + r * stride_o + c, o);
        }
    }
    return 0;
}

/* ---- (q/k RMSNorm and) rotary embedding, k and v stored to their cache slots ------------------------------ */

/* x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and the sum rounded as _rotate's bf16 ops round */
static inline void rotate(__m512 x1, __m512 x2, __m512 cs, __m512 sn, __m512 *o1, __m512 *o2) {
    *o1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, cs)), round_bf16(_mm512_mul_ps(x2, sn)));
    *o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, cs)), round_bf16(_mm512_mul_ps(x1, sn)));
}

/* w * bf16(x * rstd), rounded: rms_norm's last two ops */
static inline __m512 weigh(__m512 w, __m512 x, __m512 rstd) {
    return round_bf16(_mm512_mul_ps(w, round_bf16(_mm512_mul_ps(x, rstd))));
}

/* One head's row of head_dim values rotated (halves layout) into dst; RMS-normed first when w is given. */
static inline void rotate_row(const bf16 *src, const bf16 *w, float eps, const bf16 *cos, const bf16 *sin,
                              bf16 *dst, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    __m512 rstd = _mm512_set1_ps(1.0f);
    if (w) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < head_dim; c += 32) {
            pair32 v = maskz_load32(tail32(head_dim - c), src + c);
            acc = _mm512_fmadd_ps(v.odd, v.odd, _mm512_fmadd_ps(v.even, v.even, acc));
        }
        rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)head_dim + eps));
    }
    for (int64_t c = 0; c < half; c += 32) {
        const __mmask32 m = tail32(half - c);
        pair32 x1 = maskz_load32(m, src + c), x2 = maskz_load32(m, src + half + c);
        if (w) {
            pair32 w1 = maskz_load32(m, w + c), w2 = maskz_load32(m, w + half + c);
            x1.even = weigh(w1.even, x1.even, rstd), x1.odd = weigh(w1.odd, x1.odd, rstd);
            x2.even = weigh(w2.even, x2.even, rstd), x2.odd = weigh(w2.odd, x2.odd, rstd);
        }
        pair32 cs = maskz_load32(m, cos + c), sn = maskz_load32(m, sin + c), o1, o2;
        rotate(x1.even, x2.even, cs.even, sn.even, &o1.even, &o2.even);
        rotate(x1.odd, x2.odd, cs.odd, sn.odd, &o1.odd, &o2.odd);
        mask_store32(m, dst + c, o1);
        mask_store32(m, dst + half + c, o2);
    }
}

static inline void copy_row(bf16 *dst, const bf16 *src, int64_t n) {
    for (int64_t c = 0; c < n; c += 32) {
        const __mmask32 m = tail32(n - c);
        _mm512_mask_storeu_epi16(dst + c, m, _mm512_maskz_loadu_epi16(m, src + c));
    }
}

/* q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (strided views of the qkv projection) rotated
 * at their positions into q_out, k_out (contiguous); with q_w/k_w, Qwen3's per-head RMSNorm first. With a cache
 * (k_cache not NULL, [slots, kv_heads, head_dim] contiguous), the rotated k and v go to slot slot_mapping[t]
 * (none when it is -1). cos/sin: [max_position, head_dim / 2]. rotary_embedding.py's rope / norm_rope /
 * rope_store, with their rounding. */
int nv_rope_store(const int32_t *positions, const bf16 *q, int64_t sq_tok, int64_t sq_head, const bf16 *k,
                  int64_t sk_tok, int64_t sk_head, const bf16 *v, int64_t sv_tok, int64_t sv_head, const bf16 *q_w,
                  const bf16 *k_w, float eps, const bf16 *cos, const bf16 *sin, bf16 *q_out, bf16 *k_out,
                  bf16 *k_cache, bf16 *v_cache, const int32_t *slot_mapping, int64_t tokens, int64_t heads,
                  int64_t kv_heads, int64_t head_dim, int num_threads) {
    if (head_dim % 2 || head_dim > 1024) return -1;
    const int64_t half = head_dim / 2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) \
        if (tokens * (heads + kv_heads) * head_dim >= 65536)
    for (int64_t t = 0; t < tokens; t++) {
        const bf16 *cs = cos + (int64_t)positions[t] * half, *sn = sin + (int64_t)positions[t] * half;
        for (int64_t h = 0; h < heads; h++)
            rotate_row(q + t * sq_tok + h * sq_head, q_w, eps, cs, sn, q_out + (t * heads + h) * head_dim, head_dim);
        for (int64_t h = 0; h < kv_heads; h++)
            rotate_row(k + t * sk_tok + h * sk_head, k_w, eps, cs, sn, k_out + (t * kv_heads + h) * head_dim,
                       head_dim);
        if (k_cache && slot_mapping[t] >= 0) {
            const int64_t base = (int64_t)slot_mapping[t] * kv_heads * head_dim;
            for (int64_t h = 0; h < kv_heads; h++) {
                copy_row(k_cache + base + h * head_dim, k_out + (t * kv_heads + h) * head_dim, head_dim);
                copy_row(v_cache + base + h * head_dim, v + t * sv_tok + h * sv_head, head_dim);
            }
        }
    }
    return 0;
}

/* ---- attention: decode over the paged cache, causal prefill ---------------------------------------------- */

/* Where key j of one KV head lives: k + slot(j) * k_stride (v likewise), slot(j) = j in a plain run of rows, or
 * the cache slot of position j when a block table is given. */
typedef struct {
    const bf16 *k, *v;
    int64_t k_stride, v_stride;
    const int32_t *table;  /* NULL: consecutive rows */
    int64_t block_size;
} keys_t;

static inline int64_t key_slot(const keys_t *keys, int64_t j) {
    return keys->table ? (int64_t)keys->table[j / keys->block_size] * keys->block_size + j % keys->block_size : j;
}

/* The G query rows at q (row stride q_stride) attend to keys 0..n-1, into out (row stride o_stride); n = 0 gives
 * zeros. scores: room for G * round_up(n, 16) floats. Each key and value is read once for the G rows, which keep
 * their queries and accumulators in float registers when G and P (head_dim / 32) are compile-time constants:
 * attend_fixed below inlines this for the common shapes. */
static inline __attribute__((always_inline)) void attend(const bf16 *q, int64_t q_stride, const keys_t *keys,
                                                          int64_t n, __m512 log2e_scale, bf16 *out,
                                                          int64_t o_stride, float *scores, const int64_t G,
                                                          const int64_t P) {
    pair32 qv[MAX_GROUP][MAX_PAIRS], acc[MAX_GROUP][MAX_PAIRS];
    float sums[MAX_GROUP];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < P; c++) {
            qv[g][c] = load32(q + g * q_stride + c * 32);
            qv[g][c].even = _mm512_mul_ps(qv[g][c].even, log2e_scale);
            qv[g][c].odd = _mm512_mul_ps(qv[g][c].odd, log2e_scale);
            acc[g][c].even = acc[g][c].odd = _mm512_setzero_ps();
        }
    const int64_t width = (n + 15) & ~(int64_t)15;
    for (int64_t j = 0; j < n; j++) {  /* scores, in log2 units */
        const bf16 *kp = keys->k + key_slot(keys, j) * keys->k_stride;
        pair32 kr[MAX_PAIRS];
        for (int64_t c = 0; c < P; c++) kr[c] = load32(kp + c * 32);
        for (int64_t g = 0; g < G; g++) {
            __m512 dot = _mm512_mul_ps(qv[g][0].even, kr[0].even);
            dot = _mm512_fmadd_ps(qv[g][0].odd, kr[0].odd, dot);
            for (int64_t c = 1; c < P; c++) {
                dot = _mm512_fmadd_ps(qv[g][c].even, kr[c].even, dot);
                dot = _mm512_fmadd_ps(qv[g][c].odd, kr[c].odd, dot);
            }
            scores[g * width + j] = _mm512_reduce_add_ps(dot);
        }
    }
    for (int64_t g = 0; g < G; g++) {  /* softmax weights, unnormalised */
        float *sg = scores + g * width;
        for (int64_t j = n; j < width; j++) sg[j] = -INFINITY;
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < width; j += 16) m = _mm512_max_ps(m, _mm512_load_ps(sg + j));
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        for (int64_t j = 0; j < width; j += 16) {
            __m512 e = exp2_ps(_mm512_sub_ps(_mm512_load_ps(sg + j), mx));
            _mm512_store_ps(sg + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        sums[g] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t j = 0; j < n; j++) {  /* weighted values */
        const bf16 *vp = keys->v + key_slot(keys, j) * keys->v_stride;
        pair32 vr[MAX_PAIRS];
        for (int64_t c = 0; c < P; c++) vr[c] = load32(vp + c * 32);
        for (int64_t g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(scores[g * width + j]);
            for (int64_t c = 0; c < P; c++) {
                acc[g][c].even = _mm512_fmadd_ps(w, vr[c].even, acc[g][c].even);
                acc[g][c].odd = _mm512_fmadd_ps(w, vr[c].odd, acc[g][c].odd);
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const __m512 inv = _mm512_set1_ps(n > 0 ? 1.0f / sums[g] : 0.0f);
        for (int64_t c = 0; c < P; c++) {
            pair32 o = {_mm512_mul_ps(acc[g][c].even, inv), _mm512_mul_ps(acc[g][c].odd, inv)};
            store32(out + g * o_stride + c * 32, o);
        }
    }
}

#define ATTEND_CASE(g, p) \
    case (g) * 16 + (p): attend(q, q_stride, keys, n, log2e_scale, out, o_stride, scores, g, p); return;

/* attend() with G and P as constants for groups of 1-8 and head_dim 32, 64 or 128, else with them as variables */
static void attend_fixed(const bf16 *q, int64_t q_stride, const keys_t *keys, int64_t n, __m512 log2e_scale,
                         bf16 *out, int64_t o_stride, float *scores, int64_t G, int64_t P) {
    switch (G * 16 + P) {
        ATTEND_CASE(1, 2) ATTEND_CASE(2, 2) ATTEND_CASE(3, 2) ATTEND_CASE(4, 2)
        ATTEND_CASE(5, 2) ATTEND_CASE(6, 2) ATTEND_CASE(7, 2) ATTEND_CASE(8, 2)
        ATTEND_CASE(1, 4) ATTEND_CASE(2, 4) ATTEND_CASE(3, 4) ATTEND_CASE(4, 4)
        ATTEND_CASE(5, 4) ATTEND_CASE(6, 4) ATTEND_CASE(7, 4) ATTEND_CASE(8, 4)
        ATTEND_CASE(1, 1) ATTEND_CASE(2, 1) ATTEND_CASE(4, 1) ATTEND_CASE(8, 1)
        default: attend(q, q_stride, keys, n, log2e_scale, out, o_stride, scores, G, P);
    }
}

static int attention_shape_ok(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t G = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
    return head_dim % 32 == 0 && head_dim / 32 <= MAX_PAIRS && G >= 1 && G <= MAX_GROUP
           && G * num_kv_heads == num_heads;
}

/* A thread's scores buffer grown to hold at least `floats` (at least 16); NULL (and cap 0) when memory runs out */
static inline float *grow(float *buf, int64_t *cap, int64_t floats) {
    if (buf && floats <= *cap) return buf;
    free(buf);
    floats = floats < 16 ? 16 : (floats + 15) & ~(int64_t)15;
    buf = (float *)aligned_alloc(64, floats * sizeof(float));
    *cap = buf ? floats : 0;
    return buf;
}

/* q [seqs, heads, head_dim] (contiguous); caches [blocks, block_size, kv_heads, head_dim]; block tables
 * [seqs, table_stride] int32; lens [seqs] int32 -> out [seqs, heads, head_dim]: each sequence's queries attend
 * to its first lens[s] cached keys (torch_sdpa.reference_decode). One task per (sequence, KV head). */
int nv_decode_attention(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *tables,
                        int64_t table_stride, const int32_t *lens, bf16 *out, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int num_threads) {
    if (!attention_shape_ok(num_heads, num_kv_heads, head_dim)) return -1;
    const int64_t G = num_heads / num_kv_heads, D = head_dim, tasks = num_seqs * num_kv_heads;
    const __m512 log2e_scale = _mm512_set1_ps(scale * 1.4426950408889634f);  /* exp(s) = 2**(s * log2(e)) */
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = NULL;
        int64_t cap = 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads, n = lens[s];
            scores = grow(scores, &cap, G * ((n + 15) & ~(int64_t)15));
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            const keys_t keys = {k_cache + h * D, v_cache + h * D, num_kv_heads * D, num_kv_heads * D,
                                 tables + s * table_stride, block_size};
            attend_fixed(q + (s * num_heads + h * G) * D, D, &keys, n, log2e_scale, out + (s * num_heads + h * G) * D,
                         D, scores, G, D / 32);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* Causal prefill (torch_sdpa.reference_prefill): sequence i has new tokens cu_q[i]..cu_q[i+1]-1 of q
 * [tokens, heads, head_dim] (contiguous) and k_len = cu_k[i+1] - cu_k[i] keys, the last q_len of them new; its
 * new token p (0-based) sees keys 0..k_len - q_len + p. Keys come from the cache through the block tables
 * ([seqs, table_stride]) when tables is given, else from k, v ([tokens, kv_heads, head_dim] views with their
 * strides; then k_len = q_len). One task per (token, KV head). */
int nv_prefill_attention(const bf16 *q, const bf16 *k, int64_t sk_tok, int64_t sk_head, const bf16 *v,
                         int64_t sv_tok, int64_t sv_head, const bf16 *k_cache, const bf16 *v_cache,
                         const int32_t *tables, int64_t table_stride, int64_t block_size, const int32_t *cu_q,
                         const int32_t *cu_k, int64_t num_seqs, bf16 *out, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, float scale, int num_threads) {
    if (!attention_shape_ok(num_heads, num_kv_heads, head_dim)) return -1;
    const int64_t G = num_heads / num_kv_heads, D = head_dim, tokens = cu_q[num_seqs];
    const __m512 log2e_scale = _mm512_set1_ps(scale * 1.4426950408889634f);
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = NULL;
        int64_t cap = 0, i = 0;
        #pragma omp for schedule(dynamic, 8)
        for (int64_t task = 0; task < tokens * num_kv_heads; task++) {
            const int64_t t = task / num_kv_heads, h = task % num_kv_heads;
            while (t >= cu_q[i + 1]) i++;  /* tasks come in order within a thread */
            while (t < cu_q[i]) i--;
            const int64_t q_len = cu_q[i + 1] - cu_q[i], k_len = cu_k[i + 1] - cu_k[i];
            const int64_t n = k_len - q_len + (t - cu_q[i]) + 1;
            scores = grow(scores, &cap, G * ((n + 15) & ~(int64_t)15));
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            keys_t keys;
            if (tables)
                keys = (keys_t){k_cache + h * D, v_cache + h * D, num_kv_heads * D, num_kv_heads * D,
                                tables + i * table_stride, block_size};
            else
                keys = (keys_t){k + cu_q[i] * sk_tok + h * sk_head, v + cu_q[i] * sv_tok + h * sv_head, sk_tok, sv_tok,
                                NULL, 1};
            attend_fixed(q + (t * num_heads + h * G) * D, D, &keys, n, log2e_scale, out + (t * num_heads + h * G) * D,
                         D, scores, G, D / 32);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ---- greedy sampling -------------------------------------------------------------------------------------- */

/* out[r] = the first index of row r's largest value (sampler.py's _greedy: max(-1).indices). Returns 1 when a
 * row holds a NaN (max's answer for those is its own; the caller runs it), else 0. */
int nv_argmax_rows(const bf16 *x, int64_t stride, int64_t rows, int64_t cols, int64_t *out, int num_threads) {
    int nan_seen = 0;
    const __m512i lanes = _mm512_slli_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 1);  /* even positions 0, 2, .. */
    #pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : nan_seen) \
        if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *row = x + r * stride;
        __m512 best_e = _mm512_set1_ps(-INFINITY), best_o = best_e;
        __m512i at_e = _mm512_set1_epi32(INT32_MAX), at_o = at_e;
        __mmask16 nan = 0;
        for (int64_t c = 0; c < cols; c += 32) {
            const __mmask32 m = tail32(cols - c);
            /* past the row's end: -inf, which never wins */
            const pair32 v = widen(_mm512_mask_loadu_epi16(_mm512_set1_epi16((short)0xff80), m, row + c));
            const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)c));
            nan |= _mm512_cmp_ps_mask(v.even, v.odd, _CMP_UNORD_Q);
            /* strictly greater, or the first -inf: each lane keeps its first maximum */
            __mmask16 ge = _mm512_cmp_ps_mask(v.even, best_e, _CMP_GT_OQ)
                           | (_mm512_cmp_ps_mask(v.even, best_e, _CMP_EQ_OQ)
                              & _mm512_cmpgt_epi32_mask(at_e, at));
            best_e = _mm512_mask_mov_ps(best_e, ge, v.even), at_e = _mm512_mask_mov_epi32(at_e, ge, at);
            const __m512i at_odd = _mm512_add_epi32(at, _mm512_set1_epi32(1));
            __mmask16 go = _mm512_cmp_ps_mask(v.odd, best_o, _CMP_GT_OQ)
                           | (_mm512_cmp_ps_mask(v.odd, best_o, _CMP_EQ_OQ)
                              & _mm512_cmpgt_epi32_mask(at_o, at_odd));
            best_o = _mm512_mask_mov_ps(best_o, go, v.odd), at_o = _mm512_mask_mov_epi32(at_o, go, at_odd);
        }
        nan_seen |= nan != 0;
        /* the largest value over both halves, then the smallest index holding it */
        const float top = fmaxf(_mm512_reduce_max_ps(best_e), _mm512_reduce_max_ps(best_o));
        const __m512i none = _mm512_set1_epi32(INT32_MAX);
        const __m512 top_v = _mm512_set1_ps(top);
        const __m512i e = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(best_e, top_v, _CMP_EQ_OQ), at_e);
        const __m512i o = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(best_o, top_v, _CMP_EQ_OQ), at_o);
        out[r] = _mm512_reduce_min_epi32(_mm512_min_epi32(e, o));
    }
    return nan_seen;
}
