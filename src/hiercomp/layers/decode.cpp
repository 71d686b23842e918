// One decode step (batch 1, one new token) through every decoder block of a Llama-family model, in native code.
//
// Built with gemv.cpp into one library by hiercomp/layers/gemv.py; driven by hiercomp/layers/native_step.py.
//
// decode_breakdown.md measured a 4-bit SmolLM2 step on the lean torch blocks (fused_block.py): 4.5 ms in the
// kernels, 2.5 ms in ~35 small torch ops a block (norms, rotary, attention, SiLU, residual adds) and 4 ms of Python
// between them, against llama.cpp's whole step of 4.3 ms. Here the small ops are a few loops over a few thousand
// floats each, and Python is called once a token instead of ~1000 times. The projections are the same kernels
// (hc_gemm on a packed grid, hc_sgemv on a dense float32 weight) called as the torch path calls them (the same
// input gives the same bits); the rest is transformers' arithmetic in float32 in another order (the norm's and
// attention's sums, exp): logits equal the torch path's within float rounding, not bit for bit.
//
// Per block, on the residual stream x (hidden floats), as transformers' LlamaDecoderLayer with sdpa attention:
//   h = rms_norm(x) * w_attn; q, k, v = h W_qkv (+ bias); q, k rotated (rotate_half form) by cos, sin;
//   k, v written into the cache at position `pos`; each query head attends over cache positions 0..pos of its
//   key/value head (grouped-query attention), softmax(q k * scaling) v; x += attn W_o;
//   h = rms_norm(x) * w_mlp; x += (silu(h W_gate) * h W_up) W_down.
// The cache is the caller's (hiercomp's GrowingCache buffers): per block keys and values (kv_heads, capacity,
// head_dim), float32, with room for position `pos`.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

extern "C" int hc_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale,
                       const uint16_t* zero, int64_t N, int64_t Kp, int64_t group, int bits, float* y, int nthreads);
extern "C" int hc_sgemv(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int nthreads);

extern "C" {

// One projection: a packed grid (packed non-null: gemv.py's PackedGrid), a dense float32 weight (out, in), or
// neither: a layer the caller computes (another method's kernel), through the step's callback with this
// projection's index, reading its input from call_in and writing its output (bias included) to call_out.
struct HcProj {
    const uint8_t* packed;
    const uint16_t* scale;
    const uint16_t* zero;
    const float* dense;
    const float* bias;  // (out) float32, or null
    int64_t out_features, in_features, padded, group, bits, threads;
    float* call_in;
    const float* call_out;
    int64_t call_index;
};

typedef int (*HcCallback)(int64_t index);

// One decoder block. proj holds, in order: the q/k/v group (n_qkv parts: 1 when fused, else q, k, v), o, the
// gate/up group (n_gate_up parts: 1 when fused, else gate, up), down. Their outputs concatenate in that order.
struct HcBlock {
    HcProj proj[7];
    int64_t n_qkv, n_gate_up;
    const float* norm_attn;
    const float* norm_mlp;
    double eps_attn, eps_mlp;
    float* keys;    // (kv_heads, capacity, head_dim)
    float* values;  // (kv_heads, capacity, head_dim)
    int64_t capacity;
};

struct HcShape {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, threads;
    double scaling;
};

}  // extern "C"

namespace {

static inline float dot(const float* a, const float* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hc_hsum8(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// exp on 8 floats: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial), ~1 ulp on
// [-87, 88]; inputs are clamped there (exp(-87) ~ 1e-38: zero for a softmax weight or a SiLU gate).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) {
    float v[8] = {x};
    _mm256_storeu_ps(v, exp8(_mm256_loadu_ps(v)));
    return v[0];
}

// transformers' LlamaRMSNorm in float32: x / sqrt(mean(x²) + eps), times the weight.
static void rms_norm(const float* x, const float* w, double eps, int64_t n, float* out) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    const float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

static int project(const HcProj& p, const float* x, float* y, int dense_threads, HcCallback call) {
    int rc;
    if (p.packed) {
        rc = hc_gemm(x, 1, p.in_features, p.packed, p.scale, p.zero, p.out_features, p.padded, p.group, (int)p.bits,
                     y, (int)p.threads);
    } else if (p.dense) {
        rc = hc_sgemv(x, 1, p.in_features, p.dense, p.out_features, y, dense_threads);
    } else {
        memcpy(p.call_in, x, sizeof(float) * p.in_features);
        if ((rc = call ? call(p.call_index) : 4)) return rc;
        memcpy(y, p.call_out, sizeof(float) * p.out_features);
    }
    if (!rc && p.bias)
        for (int64_t i = 0; i < p.out_features; ++i) y[i] += p.bias[i];
    return rc;
}

// Parts [first, first + n) of a block's projections, outputs side by side into y.
static int project_group(const HcBlock& b, int first, int64_t n, const float* x, float* y, int threads,
                         HcCallback call) {
    for (int64_t i = 0; i < n; ++i) {
        const HcProj& p = b.proj[first + i];
        if (int rc = project(p, x, y, threads, call)) return rc;
        y += p.out_features;
    }
    return 0;
}

// transformers' apply_rotary_pos_emb: x cos + rotate_half(x) sin, rotate_half(x) = (-x[half:], x[:half]).
static void rotate(float* x, const float* cos, const float* sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// One query head over cache positions 0..length-1 of its key/value head: softmax(q k * scaling) v.
static void attend(const float* q, const float* keys, const float* values, int64_t length, int64_t dim,
                   float scaling, float* scores, float* out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
        scores[t] = dot(q, keys + t * dim, dim) * scaling;
        top = fmaxf(top, scores[t]);
    }
    __m256 sum8 = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= length; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hc_hsum8(sum8);
    for (; t < length; ++t) sum += scores[t] = exp1(scores[t] - top);
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < dim; ++d) out[d] = 0.f;
    for (t = 0; t < length; ++t) {
        const float w = scores[t] * inv;
        const float* v = values + t * dim;
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(v + d),
                                                      _mm256_loadu_ps(out + d)));
        for (; d < dim; ++d) out[d] += w * v[d];
    }
}

// silu(gate) * up, in place into gate (gate and up adjacent: the gate/up group's output).
static void swiglu(float* gate, const float* up, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) gate[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
}

static void add(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

extern "C" {

// x (hidden) is the residual stream entering the first block, updated in place; cos, sin (head_dim) are the
// rotary embedding of position pos (the number of tokens already in the cache); out (hidden) gets
// rms_norm(x) * final_norm after the last block; call computes the projections that are neither grid nor dense.
// Returns 0, or the failing kernel's or callback's code, 3 where scratch could not be allocated, 4 where a
// projection needs the callback and there is none.
int hc_decode_step(const HcShape* s, const HcBlock* blocks, int64_t nblocks, float* x, const float* cos,
                   const float* sin, int64_t pos, const float* final_norm, double final_eps, float* out,
                   HcCallback call) {
    const int64_t H = s->hidden, heads = s->heads, kvh = s->kv_heads, dim = s->head_dim;
    const int64_t length = pos + 1, per_kv = heads / kvh, threads = s->threads;
    const int64_t qkv_n = (heads + 2 * kvh) * dim;
    float* h = (float*)malloc(sizeof(float) * H);
    float* qkv = (float*)malloc(sizeof(float) * qkv_n);
    float* attn = (float*)malloc(sizeof(float) * heads * dim);
    float* gu = (float*)malloc(sizeof(float) * 2 * s->intermediate);
    float* y = (float*)malloc(sizeof(float) * (H > s->intermediate ? H : s->intermediate));
    float* scores = (float*)malloc(sizeof(float) * heads * length);
    int rc = (h && qkv && attn && gu && y && scores) ? 0 : 3;
    // Attention on all threads once its work outweighs a parallel region's start (~10 µs): long contexts.
    const int attention_threads = heads * length * dim >= (1 << 17) ? (int)threads : 1;
    for (int64_t bi = 0; bi < nblocks && !rc; ++bi) {
        const HcBlock& b = blocks[bi];
        rms_norm(x, b.norm_attn, b.eps_attn, H, h);
        if ((rc = project_group(b, 0, b.n_qkv, h, qkv, (int)threads, call))) break;
        float* q = qkv;
        float* k = qkv + heads * dim;
        const float* v = k + kvh * dim;
        for (int64_t i = 0; i < heads + kvh; ++i) rotate(q + i * dim, cos, sin, dim);  // q and k are adjacent
        for (int64_t g = 0; g < kvh; ++g) {
            memcpy(b.keys + (g * b.capacity + pos) * dim, k + g * dim, sizeof(float) * dim);
            memcpy(b.values + (g * b.capacity + pos) * dim, v + g * dim, sizeof(float) * dim);
        }
#pragma omp parallel for num_threads(attention_threads) if (attention_threads > 1)
        for (int64_t i = 0; i < heads; ++i) {
            const int64_t g = i / per_kv;
            attend(q + i * dim, b.keys + g * b.capacity * dim, b.values + g * b.capacity * dim, length, dim,
                   (float)s->scaling, scores + i * length, attn + i * dim);
        }
        const HcProj& o = b.proj[b.n_qkv];
        if ((rc = project(o, attn, y, (int)threads, call))) break;
        add(x, y, H);
        rms_norm(x, b.norm_mlp, b.eps_mlp, H, h);
        if ((rc = project_group(b, (int)b.n_qkv + 1, b.n_gate_up, h, gu, (int)threads, call))) break;
        swiglu(gu, gu + s->intermediate, s->intermediate);
        if ((rc = project(b.proj[b.n_qkv + 1 + b.n_gate_up], gu, y, (int)threads, call))) break;
        add(x, y, H);
    }
    if (!rc && final_norm) rms_norm(x, final_norm, final_eps, H, out);
    free(h), free(qkv), free(attn), free(gu), free(y), free(scores);
    return rc;
}

}  // extern "C"
