/* nanovllm's CPU kernels: bfloat16 decode attention over the paged KV cache and the per-layer element-wise ops,
 * each one pass over its data. Built at first use by nanovllm/kernels/cpu.py (cc -O3 -march=native -fopenmp) for
 * CPUs with AVX-512 (F, BW, VL); the PyTorch functions they replace are the reference they are tested against.
 *
 * Tensors arrive as raw pointers with their strides in elements. bfloat16 values travel as uint16_t, 32 at a time
 * in one 512-bit load: each 32-bit lane holds an (even, odd) pair of elements, widened to two float vectors by a
 * shift and a mask and narrowed back the same way, with round-to-nearest-even (NaN kept NaN) as torch converts;
 * no shuffles, so element-wise work needs no order, and a reduction sums in its own. Every
 * element-wise kernel rounds where the PyTorch reference rounds (each bf16 op of the reference computes in float
 * and rounds its result), so results match it to the reference's own float arithmetic; reductions sum in another
 * order. A function returns 0, or -1 for a shape it does not take (the caller then runs the reference).
 * num_threads: the OpenMP team size, torch.get_num_threads() of the caller. */
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
 * scalef makes 0 far below and inf far above */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-150.0f)), _mm512_set1_ps(150.0f));
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
    #pragma omp parallel num_threads(num_threads) if (rows * cols >= 65536)
    {
        float *h = (float *)aligned_alloc(64, ((cols + 31) & ~(int64_t)31) * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
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
    return 0;
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

/* ---- decode attention over the paged cache ----------------------------------------------------------------- */

/* q [seqs, heads, head_dim] (contiguous); caches [blocks, block_size, kv_heads, head_dim]; block tables
 * [seqs, table_stride] int32; lens [seqs] int32 -> out [seqs, heads, head_dim]: each sequence's queries attend
 * to its first lens[s] cached keys, a row without keys gives zeros. One task per (sequence, KV head): the group
 * of query heads that share the KV head reads each cached key and value once, into float accumulators. */
int nv_decode_attention(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, const int32_t *tables,
                        int64_t table_stride, const int32_t *lens, bf16 *out, int64_t num_seqs, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int num_threads) {
    const int64_t G = num_heads / num_kv_heads, P = head_dim / 32, D = head_dim;
    if (head_dim % 32 || P > MAX_PAIRS || G > MAX_GROUP || G * num_kv_heads != num_heads) return -1;
    const int64_t tasks = num_seqs * num_kv_heads;
    const __m512 log2e_scale = _mm512_set1_ps(scale * 1.4426950408889634f);  /* exp(s) = 2**(s * log2(e)) */
    #pragma omp parallel num_threads(num_threads)
    {
        float *scores = NULL;
        int64_t cap = 0;
        pair32 qv[MAX_GROUP][MAX_PAIRS], acc[MAX_GROUP][MAX_PAIRS];
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads, n = lens[s];
            const bf16 *qs = q + (s * num_heads + h * G) * D;
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < P; c++) {
                    qv[g][c] = load32(qs + g * D + c * 32);
                    qv[g][c].even = _mm512_mul_ps(qv[g][c].even, log2e_scale);
                    qv[g][c].odd = _mm512_mul_ps(qv[g][c].odd, log2e_scale);
                    acc[g][c].even = acc[g][c].odd = _mm512_setzero_ps();
                }
            float sums[MAX_GROUP];
            if (n > 0) {
                const int64_t width = (n + 15) & ~(int64_t)15;
                if (G * width > cap) {
                    free(scores);
                    cap = G * width;
                    scores = (float *)aligned_alloc(64, cap * sizeof(float));
                }
                const int32_t *table = tables + s * table_stride;
                for (int64_t j = 0; j < n; j++) {  /* scores, in log2 units */
                    const bf16 *kp = k_cache + (((int64_t)table[j / block_size] * block_size + j % block_size)
                                                * num_kv_heads + h) * D;
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
                    __m512 m = _mm512_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < width; j += 16) m = _mm512_max_ps(m, _mm512_load_ps(sg + j));
                    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < width; j += 16) {
                        __m512 e = exp2_ps(_mm512_sub_ps(_mm512_load_ps(sg + j), mx));
                        _mm512_store_ps(sg + j, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    sums[g] = _mm512_reduce_add_ps(sum);
                }
                for (int64_t j = 0; j < n; j++) {  /* weighted values */
                    const bf16 *vp = v_cache + (((int64_t)table[j / block_size] * block_size + j % block_size)
                                                * num_kv_heads + h) * D;
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
            }
            bf16 *os = out + (s * num_heads + h * G) * D;
            for (int64_t g = 0; g < G; g++) {
                const __m512 inv = _mm512_set1_ps(n > 0 ? 1.0f / sums[g] : 0.0f);
                for (int64_t c = 0; c < P; c++) {
                    pair32 o = {_mm512_mul_ps(acc[g][c].even, inv), _mm512_mul_ps(acc[g][c].odd, inv)};
                    store32(os + g * D + c * 32, o);
                }
            }
        }
        free(scores);
    }
    return 0;
}
