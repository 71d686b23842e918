// Low-bit GEMV/GEMM for affine grids w[n, k] = scale[n, g] * (q[n, k] - zero[n, g]), codes q in 0..15.
//
// Built by hiercomp/layers/gemv.py with -O3 -march=native -fopenmp on first use; called through ctypes.
//
// Weight layout (made in gemv.py): llama.cpp's Q4_0 nibble order. The in-features are padded to Kp (a
// multiple of 128) with code 0; per row, per block b of 32, 16 bytes: byte t = q[32b + t] | q[32b + 16 + t] << 4.
// A 64-byte load is one "superchunk" of 4 blocks (128 codes): its low nibbles are the first halves of the
// blocks, its high nibbles the second halves, and int32 lane i of a dot product over it (bytes 4i..4i+3)
// belongs to block i / 4 for both halves, so both nibble halves accumulate into the same lanes.
// Per (row, group): scale and zero, both float16 (integer zeros and HQQ's float16 zeros are exact there, and
// their product in float32 is exact: 11 + 11 significant bits).
//
// The activation is quantized per block of 32 to int8 with a float scale d (llama.cpp's Q8_0), q1 = round(x / d),
// plus a second int8 for the residual, q2 = round((x / d - q1) * 128): x ≈ d/128 * (128 q1 + q2), about 15 bits
// per input (error ≤ absmax / 32512). One level alone errs by ~0.5% of the output's norm, ~1.5% in the worst
// output element: above the project's 1% contract for fast paths. The second level costs two more integer
// dot products per 128 codes (measured 1.3-1.5x the compute of one level: a 128-token prefill 16 ms instead
// of 12; decode from memory changes little) and makes the kernel ~100x more accurate than torch's bfloat16 one.
// Both are stored in the nibble order (per superchunk: the first halves of its 4 blocks, then the second
// halves), so
//     y[n] = Σ_g scale[n,g] Σ_{b∈g} d_b Σ_{k∈b} q[n,k] x̃[k]  -  Σ_g scale[n,g] zero[n,g] X_g,   X_g = Σ_{k∈g} x̃[k]
// with x̃ the rounded activation. The group sums X_g are taken from x̃ (exact integer block sums): the result
// is exactly W·x̃, and the zero term cancels against the code term without amplifying the rounding (a 4-bit
// asymmetric grid has a zero term ≈ 8·scale·X_g: summing the exact x would not cancel).
//
// Integer dot products: u8 codes × s8 activations, AVX512-VNNI vpdpbusd (64 per instruction), else AVX-VNNI
// (32), else AVX2 maddubs + madd. The sums fit easily: 15 · (127 · 128 + 64) · 8 per int32 lane.


#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "needs AVX2, FMA and F16C"
#endif

namespace {

enum Groups { BIG = 0, G32 = 1, G64 = 2 };  // groups a multiple of 128 wide / of 32 / of 64

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HC_ISA "avx512vnni"
// 16 float lanes per superchunk: lanes 4b..4b+3 belong to its block b.
typedef __m512 V;
struct W { __m512i lo, hi; };  // 128 codes
struct X { __m512i lo, hi, rlo, rhi; };  // 128 activations in the codes' order: q1 halves, then q2 halves
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vset1(float s) { return _mm512_set1_ps(s); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
static inline W wload(const uint8_t* p) {
    const __m512i b = _mm512_loadu_si512((const void*)p), m = _mm512_set1_epi8(0x0F);
    return {_mm512_and_si512(b, m), _mm512_and_si512(_mm512_srli_epi16(b, 4), m)};
}
static inline X xload(const int8_t* p) {
    return {_mm512_loadu_si512((const void*)p), _mm512_loadu_si512((const void*)(p + 64)),
            _mm512_loadu_si512((const void*)(p + 128)), _mm512_loadu_si512((const void*)(p + 192))};
}
// Σ q (128 q1 + q2) per lane: the q1 sum shifted by 7, then the q2 products accumulated onto it.
static inline V idot(W w, X x) {
    const __m512i a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo, x.lo), w.hi, x.hi);
    const __m512i a = _mm512_dpbusd_epi32(_mm512_slli_epi32(a1, 7), w.lo, x.rlo);
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(a, w.hi, x.rhi));
}
// The weight scales of a superchunk's 4 blocks from float16: groups of 32 (4 scales) or 64 (2 scales).
static inline V lane_scales32(const uint16_t* p) {
    const __m128 s = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)p));
    const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}
static inline V lane_scales64(const uint16_t* p) {
    int32_t two;
    memcpy(&two, p, 4);
    const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}
#else
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define HC_ISA "avxvnni"
#else
#define HC_ISA "avx2"
#endif
// Two ymm halves: .a is bytes 0..31 of the superchunk (blocks 0, 1), .b bytes 32..63 (blocks 2, 3).
struct V { __m256 a, b; };
struct W { __m256i alo, ahi, blo, bhi; };
struct X { __m256i alo, ahi, blo, bhi, ralo, rahi, rblo, rbhi; };  // q1, then q2
static inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V vset1(float s) { return {_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
static inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V vmul(V x, V y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline V vfma(V x, V y, V z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
static inline float vsum(V x) {
    const __m256 s = _mm256_add_ps(x.a, x.b);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
static inline W wload(const uint8_t* p) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 32));
    const __m256i m = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(a, m), _mm256_and_si256(_mm256_srli_epi16(a, 4), m), _mm256_and_si256(b, m),
            _mm256_and_si256(_mm256_srli_epi16(b, 4), m)};
}
static inline X xload(const int8_t* p) {
    const __m256i* v = (const __m256i*)p;
    return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 1), _mm256_loadu_si256(v + 3),
            _mm256_loadu_si256(v + 4), _mm256_loadu_si256(v + 6), _mm256_loadu_si256(v + 5), _mm256_loadu_si256(v + 7)};
}
static inline __m256i idot8(__m256i wlo, __m256i xlo, __m256i whi, __m256i xhi) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wlo, xlo), whi, xhi);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wlo, xlo), whi, xhi);
#else
    // Pairs of 15 * 127 and their sum over both halves stay below 2^15: one madd for both.
    const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(wlo, xlo), _mm256_maddubs_epi16(whi, xhi));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
}
static inline V idot(W w, X x) {
    const __m256i a = _mm256_add_epi32(_mm256_slli_epi32(idot8(w.alo, x.alo, w.ahi, x.ahi), 7),
                                       idot8(w.alo, x.ralo, w.ahi, x.rahi));
    const __m256i b = _mm256_add_epi32(_mm256_slli_epi32(idot8(w.blo, x.blo, w.bhi, x.bhi), 7),
                                       idot8(w.blo, x.rblo, w.bhi, x.rbhi));
    return {_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b)};
}
static inline V lane_scales32(const uint16_t* p) {
    const float s0 = _cvtsh_ss(p[0]), s1 = _cvtsh_ss(p[1]), s2 = _cvtsh_ss(p[2]), s3 = _cvtsh_ss(p[3]);
    return {_mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0)), _mm256_set_m128(_mm_set1_ps(s3), _mm_set1_ps(s2))};
}
static inline V lane_scales64(const uint16_t* p) { return {_mm256_set1_ps(_cvtsh_ss(p[0])), _mm256_set1_ps(_cvtsh_ss(p[1]))}; }
#endif

constexpr int64_t SC = 128;  // codes per superchunk (64 bytes)

struct Args {
    const uint8_t* w;       // (N, Kp/2) packed codes
    const uint16_t* scale;  // (N, G) float16
    const uint16_t* zero;   // (N, G) float16
    const int8_t* xq;       // (M, 2 Kp) quantized activation (q1 and q2 per superchunk), in the codes' order
    const float* xd;        // (M, Kp/8): per superchunk 16 lanes, d_b / 128 in lanes 4b..4b+3
    const float* xsum;      // (M, G): group sums of the quantized activation
    float* y;               // (M, N)
    int64_t N, Kp, G, cpg;  // cpg: superchunks per group (BIG groups)
};

// Σ_g scale[g] * zero[g] * xsum[g] for one row.
static inline float zero_term(const uint16_t* scale, const uint16_t* zero, const float* xsum, int64_t G) {
    int64_t g = 0;
    float acc = 0.f;
    __m256 v = _mm256_setzero_ps();
    for (; g + 8 <= G; g += 8) {
        const __m256 sz = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scale + g))),
                                        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zero + g))));
        v = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xsum + g), v);
    }
    for (; g < G; ++g) acc += _cvtsh_ss(scale[g]) * _cvtsh_ss(zero[g]) * xsum[g];
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return acc + _mm_cvtss_f32(t);
}

// The RT rows of a tile are RT short streams (Kp / 2 bytes each): too short for the hardware prefetcher to
// reach full bandwidth from DRAM (measured 10 GB/s on one core without this, 24 GB/s with). While reading
// superchunk c, fetch the matching share of the tile PF_TILES ahead.
constexpr int PF_TILES = 2;
template <int RT>
static inline void prefetch(const uint8_t* w0, int64_t Kp, int64_t c) {
    const uint8_t* p = w0 + PF_TILES * RT * (Kp / 2) + c * 64 * RT;
    for (int i = 0; i < RT * 64; i += 64) _mm_prefetch((const char*)(p + i), _MM_HINT_T0);
}

// RT weight rows from n times MT activation rows from m: RT*MT independent accumulators.
template <int RT, int MT, int GM>
static void tile(const Args& a, int64_t n, int64_t m) {
    const int64_t nsc = a.Kp / SC;
    const uint8_t* w[RT];
    const uint16_t* s[RT];
    const int8_t* xq[MT];
    const float* xd[MT];
    for (int r = 0; r < RT; ++r) w[r] = a.w + (n + r) * (a.Kp / 2), s[r] = a.scale + (n + r) * a.G;
    for (int i = 0; i < MT; ++i) xq[i] = a.xq + (m + i) * 2 * a.Kp, xd[i] = a.xd + (m + i) * (a.Kp / 8);
    V acc[RT][MT];
    for (int r = 0; r < RT; ++r)
        for (int i = 0; i < MT; ++i) acc[r][i] = vzero();
    if (GM != BIG) {  // groups of 32 or 64: the lanes of a superchunk carry their own weight scales
        for (int64_t c = 0; c < nsc; ++c) {
            W wv[RT];
            V sv[RT];
            for (int r = 0; r < RT; ++r)
                wv[r] = wload(w[r] + c * 64), sv[r] = GM == G32 ? lane_scales32(s[r] + 4 * c) : lane_scales64(s[r] + 2 * c);
            prefetch<RT>(w[0], a.Kp, c);
            for (int i = 0; i < MT; ++i) {
                const X xv = xload(xq[i] + c * 2 * SC);
                const V dv = vload(xd[i] + c * 16);
                for (int r = 0; r < RT; ++r) acc[r][i] = vfma(idot(wv[r], xv), vmul(dv, sv[r]), acc[r][i]);
            }
        }
    } else {  // wide groups: sum the group with the block scales, then one multiply by its weight scale
        for (int64_t g = 0; g < a.G; ++g) {
            V gacc[RT][MT];
            for (int r = 0; r < RT; ++r)
                for (int i = 0; i < MT; ++i) gacc[r][i] = vzero();
            for (int64_t c = g * a.cpg; c < (g + 1) * a.cpg; ++c) {
                W wv[RT];
                for (int r = 0; r < RT; ++r) wv[r] = wload(w[r] + c * 64);
                prefetch<RT>(w[0], a.Kp, c);
                for (int i = 0; i < MT; ++i) {
                    const X xv = xload(xq[i] + c * 2 * SC);
                    const V dv = vload(xd[i] + c * 16);
                    for (int r = 0; r < RT; ++r) gacc[r][i] = vfma(idot(wv[r], xv), dv, gacc[r][i]);
                }
            }
            for (int r = 0; r < RT; ++r) {
                const V sg = vset1(_cvtsh_ss(s[r][g]));
                for (int i = 0; i < MT; ++i) acc[r][i] = vfma(gacc[r][i], sg, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int i = 0; i < MT; ++i)
            a.y[(m + i) * a.N + n + r] =
                vsum(acc[r][i]) - zero_term(s[r], a.zero + (n + r) * a.G, a.xsum + (m + i) * a.G, a.G);
}

// Rows [n0, n1) against activation rows [m, m + MT): RT rows at a time, single rows for the rest.
template <int RT, int MT, int GM>
static void rows(const Args& a, int64_t n0, int64_t n1, int64_t m) {
    int64_t n = n0;
    for (; n + RT <= n1; n += RT) tile<RT, MT, GM>(a, n, m);
    for (; n < n1; ++n) tile<1, MT, GM>(a, n, m);
}

template <int GM>
static void block(const Args& a, int64_t n0, int64_t n1, int64_t M) {
    // Tiles fit the 32 zmm registers (AVX-512) / 16 ymm (AVX2: each V is two registers, so half the tile).
#if defined(__AVX512F__)
    constexpr int R1 = 4, R2 = 2, R4 = 2;
#else
    constexpr int R1 = 2, R2 = 1, R4 = 1;
#endif
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows<R4, 4, GM>(a, n0, n1, m);
    for (; m + 2 <= M; m += 2) rows<R2, 2, GM>(a, n0, n1, m);
    for (; m < M; ++m) rows<R1, 1, GM>(a, n0, n1, m);
}

// One activation row, per block of 32 with d = absmax / 127: q1 = round(x / d) and the residual
// q2 = round((x / d - q1) * 128) in [-64, 64], so x ≈ d / 128 * (128 q1 + q2) (error ≤ absmax / 32512).
// Zero past K. Stored in the nibble order: per superchunk the first halves of its 4 blocks, then the second
// halves, for q1 (128 bytes) then q2 (128 bytes).
static void quantize_row(const float* x, int64_t K, int64_t Kp, int64_t blocks_per_group, int8_t* xq, float* xd,
                         float* xsum) {
    for (int64_t b = 0; b < Kp / 32; ++b) {
        float v[32];
        for (int j = 0; j < 32; ++j) v[j] = b * 32 + j < K ? x[b * 32 + j] : 0.f;
        float amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* out = xq + (b / 4) * 2 * SC + (b % 4) * 16;
        int32_t isum = 0;
        for (int j = 0; j < 32; ++j) {
            const float t = v[j] * id;
            const int32_t q1 = (int32_t)nearbyintf(t), q2 = (int32_t)nearbyintf((t - (float)q1) * 128.f);
            out[(j / 16) * 64 + j % 16] = (int8_t)q1;
            out[SC + (j / 16) * 64 + j % 16] = (int8_t)q2;
            isum += 128 * q1 + q2;
        }
        for (int j = 0; j < 4; ++j) xd[b * 4 + j] = d / 128.f;
        xsum[b / blocks_per_group] += d / 128.f * (float)isum;
    }
}

}  // namespace

extern "C" {

const char* hc_isa(void) { return HC_ISA; }

// y (M, N) = x (M, K) @ W^T for the packed grid; group: 32, 64 or a multiple of 128 dividing Kp (G = Kp / group).
// Scratch for the quantized activation is allocated here: M * (Kp * 2.5 + G * 4) bytes.
int hc_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale, const uint16_t* zero,
            int64_t N, int64_t Kp, int64_t group, float* y, int nthreads) {
    if (M < 1 || Kp % SC || K > Kp || Kp % group || !(group == 32 || group == 64 || group % SC == 0)) return 1;
    const int64_t G = Kp / group;
    int8_t* xq = (int8_t*)malloc((size_t)(M * Kp * 2));
    float* xd = (float*)malloc((size_t)(M * Kp / 8) * sizeof(float));
    float* xsum = (float*)calloc((size_t)(M * G), sizeof(float));
    if (!xq || !xd || !xsum) {
        free(xq), free(xd), free(xsum);
        return 2;
    }
    // Small layers: threads cost more than they save (a wake-up is ~10 µs); ~1 thread per 256K codes.
    const int64_t work = N * Kp * (M < 8 ? M : 8) / (1 << 18);
    const int nt = (int)(work < 1 ? 1 : (work < nthreads ? work : nthreads));
    const Args a{w, scale, zero, xq, xd, xsum, y, N, Kp, G, group / SC};
    const int gm = group == 32 ? G32 : group == 64 ? G64 : BIG;
    // Serial: ~1 µs per 2048 inputs, and a parallel loop here would add a barrier (on a shared machine each
    // barrier can wait a whole scheduler slice for a preempted thread).
    for (int64_t i = 0; i < M; ++i)
        quantize_row(x + i * K, K, Kp, group / 32, xq + i * 2 * Kp, xd + i * (Kp / 8), xsum + i * G);
    // Blocks of 16 rows (16 * Kp / 2 bytes stay in L1/L2 across the activation tiles), handed out
    // dynamically: a thread preempted on a shared machine does not leave its static share to the end.
    const int64_t nblk = (N + 15) / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t bi = 0; bi < nblk; ++bi) {
        const int64_t n0 = bi * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
        if (gm == G32) block<G32>(a, n0, n1, M);
        else if (gm == G64) block<G64>(a, n0, n1, M);
        else block<BIG>(a, n0, n1, M);
    }
    free(xq), free(xd), free(xsum);
    return 0;
}

}  // extern "C"
