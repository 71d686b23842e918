// Low-bit GEMV/GEMM for affine grids w[n, k] = scale[n, g] * (q[n, k] - zero[n, g]), codes q of 1 to 4 bits.
//
// Built by hiercomp/layers/gemv.py with -O3 -march=native -fopenmp on first use; called through ctypes.
//
// The in-features are padded to Kp (a multiple of 128) with code 0 and cut into "superchunks" of 128 codes
// (4 blocks of 32). Within a superchunk the codes are taken in "code order": index i < 64 is element i % 16 of
// block i / 16 (the first halves of the 4 blocks), 64 + i element 16 + i % 16 of block i / 16 (the second
// halves). Every layout below unpacks a superchunk into two 64-byte vectors of u8 codes, indices 0..63 and
// 64..127; int32 lane j of a dot product over either (bytes 4j..4j+3) belongs to block j / 4, so both halves
// accumulate into the same lanes, and the activation is stored in the same order. Per row, per superchunk
// (made in gemv.py):
//   4 bits, 64 bytes (llama.cpp's Q4_0 nibble order): byte t = q[t] | q[64 + t] << 4;
//   2 bits, 32 bytes: byte t = q[t] | q[32 + t] << 2 | q[64 + t] << 4 | q[96 + t] << 6 (shifts and masks
//     give each 32 bytes of the unpacked vectors: no shuffles);
//   1 bit, 16 bytes, a bit plane: bit s of byte t = q[16 s + t] (a 16-byte load broadcast to the 4 lanes of a
//     vector; lane L of the first vector tests bit L, of the second bit 4 + L);
//   3 bits, 48 bytes: the low 2 bits in the 2-bit layout, then the high bit as a plane (llama.cpp's Q3_K
//     split: q = low + 4 high), added into the unpacked low codes before the dot products.
// A 2-bit layer so streams half the bytes of a 4-bit one and a 3-bit layer three quarters, for the same
// integer dot products per superchunk.
// Per (row, group): scale and zero, both float16 (integer zeros and HQQ's float16 zeros are exact there, and
// their product in float32 is exact: 11 + 11 significant bits).
//
// The activation is quantized per block of 32 to int8 with a float scale d (llama.cpp's Q8_0), q1 = round(x / d),
// plus a second int8 for the residual, q2 = round((x / d - q1) * 128): x ≈ d/128 * (128 q1 + q2), about 15 bits
// per input (error ≤ absmax / 32512). One level alone errs by ~0.5% of the output's norm, ~1.5% in the worst
// output element: above the project's 1% contract for fast paths. The second level costs two more integer
// dot products per 128 codes (measured 1.3-1.5x the compute of one level: a 128-token prefill 16 ms instead
// of 12; decode from memory changes little) and makes the kernel ~100x more accurate than torch's bfloat16 one.
// Both are stored in the code order (per superchunk: the first halves of its 4 blocks, then the second
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

#include "simd.h"

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
// One superchunk's codes from its BITS-bit layout (see the top): .lo codes 0..63, .hi codes 64..127.
template <int BITS>
static inline W wload(const uint8_t* p);
template <>
inline W wload<4>(const uint8_t* p) {
    const __m512i b = _mm512_loadu_si512((const void*)p), m = _mm512_set1_epi8(0x0F);
    return {_mm512_and_si512(b, m), _mm512_and_si512(_mm512_srli_epi16(b, 4), m)};
}
// The 32 bytes in both halves, the upper half shifted right by 2: bits 0..1 of each byte are then codes 0..63,
// bits 4..5 codes 64..127 (16-bit shifts: what crosses a byte boundary is masked off).
template <>
inline W wload<2>(const uint8_t* p) {
    const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    const int64_t two = 0x0002000200020002;
    const __m512i t = _mm512_srlv_epi16(b, _mm512_set_epi64(two, two, two, two, 0, 0, 0, 0));
    const __m512i m = _mm512_set1_epi8(0x03);
    return {_mm512_and_si512(t, m), _mm512_and_si512(_mm512_srli_epi16(t, 4), m)};
}
// A bit plane (16 bytes, bit s of byte t = code 16 s + t) as byte masks: lane L of .lo tests bit L, of .hi 4 + L.
static inline void plane_masks(const uint8_t* p, __mmask64& lo, __mmask64& hi) {
    const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
    const int64_t l0 = 0x0101010101010101;
    const __m512i bits = _mm512_set_epi64(8 * l0, 8 * l0, 4 * l0, 4 * l0, 2 * l0, 2 * l0, l0, l0);
    lo = _mm512_test_epi8_mask(b, bits);
    hi = _mm512_test_epi8_mask(b, _mm512_slli_epi64(bits, 4));
}
template <>
inline W wload<1>(const uint8_t* p) {
    __mmask64 lo, hi;
    plane_masks(p, lo, hi);
    const __m512i one = _mm512_set1_epi8(1);
    return {_mm512_maskz_mov_epi8(lo, one), _mm512_maskz_mov_epi8(hi, one)};
}
template <>
inline W wload<3>(const uint8_t* p) {
    W w = wload<2>(p);
    __mmask64 lo, hi;
    plane_masks(p + 32, lo, hi);
    const __m512i four = _mm512_set1_epi8(4);
    return {_mm512_mask_add_epi8(w.lo, lo, w.lo, four), _mm512_mask_add_epi8(w.hi, hi, w.hi, four)};
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
static inline float vsum(V x) { return hc_hsum8(_mm256_add_ps(x.a, x.b)); }
// One superchunk's codes from its BITS-bit layout (see the top): .alo codes 0..31, .blo 32..63, .ahi 64..95,
// .bhi 96..127.
template <int BITS>
static inline W wload(const uint8_t* p);
template <>
inline W wload<4>(const uint8_t* p) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 32));
    const __m256i m = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(a, m), _mm256_and_si256(_mm256_srli_epi16(a, 4), m), _mm256_and_si256(b, m),
            _mm256_and_si256(_mm256_srli_epi16(b, 4), m)};
}
template <>
inline W wload<2>(const uint8_t* p) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)p), m = _mm256_set1_epi8(0x03);
    return {_mm256_and_si256(a, m), _mm256_and_si256(_mm256_srli_epi16(a, 4), m),
            _mm256_and_si256(_mm256_srli_epi16(a, 2), m), _mm256_and_si256(_mm256_srli_epi16(a, 6), m)};
}
// Codes 32 v..32 v + 31 of a bit plane broadcast to both lanes: byte t takes bit 2 v + t / 16 of plane byte
// t % 16, moved to bit POS by one 32-bit shift per lane (the bit stays within its byte) and masked.
template <int VI, int POS>
static inline __m256i plane_bits(__m256i b) {
    constexpr int s = 2 * VI - POS;  // shift right in the lower lane; s + 1 in the upper one
    __m256i r;
    if constexpr (s >= 0) r = _mm256_srlv_epi32(b, _mm256_set_epi32(s + 1, s + 1, s + 1, s + 1, s, s, s, s));
    else r = _mm256_sllv_epi32(b, _mm256_set_epi32(-s - 1, -s - 1, -s - 1, -s - 1, -s, -s, -s, -s));
    return _mm256_and_si256(r, _mm256_set1_epi8(1 << POS));
}
static inline __m256i plane_load(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
}
template <>
inline W wload<1>(const uint8_t* p) {
    const __m256i b = plane_load(p);
    return {plane_bits<0, 0>(b), plane_bits<2, 0>(b), plane_bits<1, 0>(b), plane_bits<3, 0>(b)};
}
template <>
inline W wload<3>(const uint8_t* p) {
    const W w = wload<2>(p);
    const __m256i b = plane_load(p + 32);
    return {_mm256_or_si256(w.alo, plane_bits<0, 2>(b)), _mm256_or_si256(w.ahi, plane_bits<2, 2>(b)),
            _mm256_or_si256(w.blo, plane_bits<1, 2>(b)), _mm256_or_si256(w.bhi, plane_bits<3, 2>(b))};
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

constexpr int64_t SC = 128;  // codes per superchunk
template <int BITS>
constexpr int64_t BPS = 16 * BITS;  // bytes per superchunk of a row

struct Args {
    const uint8_t* w;       // (N, Kp/128 * 16 bits) packed codes
    const uint16_t* scale;  // (N, G) float16
    const uint16_t* zero;   // (N, G) float16
    const int8_t* xq;       // (M, 2 Kp) quantized activation (q1 and q2 per superchunk), in the codes' order
    const float* xd;        // (M, Kp/8): per superchunk 16 lanes, d_b / 128 in lanes 4b..4b+3
    const float* xsum;      // (M, G): group sums of the quantized activation
    float* y;               // (M, N)
    int64_t N, Kp, G, cpg;  // cpg: superchunks per group (BIG groups)
    int64_t rowbytes;       // bytes per row of w: Kp / 128 * BPS
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
    return acc + hc_hsum8(v);
}

// The RT rows of a tile are RT short streams (rowbytes each): too short for the hardware prefetcher to
// reach full bandwidth from DRAM (measured 10 GB/s on one core without this, 24 GB/s with). While reading
// superchunk c, fetch the matching share of the tile PF_TILES ahead (the tile's rows are contiguous: RT * BPS
// bytes per superchunk, one prefetch per cache line).
constexpr int PF_TILES = 2;
template <int RT, int64_t B>
static inline void prefetch(const uint8_t* w0, int64_t rowbytes, int64_t c) {
    const uint8_t* p = w0 + PF_TILES * RT * rowbytes + c * B * RT;
    for (int64_t i = 0; i < RT * B; i += 64) _mm_prefetch((const char*)(p + i), _MM_HINT_T0);
}

// RT weight rows from n times MT activation rows from m: RT*MT independent accumulators.
template <int BITS, int RT, int MT, int GM>
static void tile(const Args& a, int64_t n, int64_t m) {
    const int64_t nsc = a.Kp / SC;
    const uint8_t* w[RT];
    const uint16_t* s[RT];
    const int8_t* xq[MT];
    const float* xd[MT];
    for (int r = 0; r < RT; ++r) w[r] = a.w + (n + r) * a.rowbytes, s[r] = a.scale + (n + r) * a.G;
    for (int i = 0; i < MT; ++i) xq[i] = a.xq + (m + i) * 2 * a.Kp, xd[i] = a.xd + (m + i) * (a.Kp / 8);
    V acc[RT][MT];
    for (int r = 0; r < RT; ++r)
        for (int i = 0; i < MT; ++i) acc[r][i] = vzero();
    if (GM != BIG) {  // groups of 32 or 64: the lanes of a superchunk carry their own weight scales
        for (int64_t c = 0; c < nsc; ++c) {
            W wv[RT];
            V sv[RT];
            for (int r = 0; r < RT; ++r)
                wv[r] = wload<BITS>(w[r] + c * BPS<BITS>),
                sv[r] = GM == G32 ? lane_scales32(s[r] + 4 * c) : lane_scales64(s[r] + 2 * c);
            prefetch<RT, BPS<BITS>>(w[0], a.rowbytes, c);
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
                for (int r = 0; r < RT; ++r) wv[r] = wload<BITS>(w[r] + c * BPS<BITS>);
                prefetch<RT, BPS<BITS>>(w[0], a.rowbytes, c);
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
template <int BITS, int RT, int MT, int GM>
static void rows(const Args& a, int64_t n0, int64_t n1, int64_t m) {
    int64_t n = n0;
    for (; n + RT <= n1; n += RT) tile<BITS, RT, MT, GM>(a, n, m);
    for (; n < n1; ++n) tile<BITS, 1, MT, GM>(a, n, m);
}

template <int BITS, int GM>
static void block(const Args& a, int64_t n0, int64_t n1, int64_t M) {
    // Tiles fit the 32 zmm registers (AVX-512) / 16 ymm (AVX2: each V is two registers, so half the tile).
#if defined(__AVX512F__)
    constexpr int R1 = 4, R2 = 2, R4 = 2;
#else
    constexpr int R1 = 2, R2 = 1, R4 = 1;
#endif
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows<BITS, R4, 4, GM>(a, n0, n1, m);
    for (; m + 2 <= M; m += 2) rows<BITS, R2, 2, GM>(a, n0, n1, m);
    for (; m < M; ++m) rows<BITS, R1, 1, GM>(a, n0, n1, m);
}

// One activation row, per block of 32 with d = absmax / 127: q1 = round(x / d) and the residual
// q2 = round((x / d - q1) * 128) in [-64, 64], so x ≈ d / 128 * (128 q1 + q2) (error ≤ absmax / 32512).
// Zero past K. Stored in the code order: per superchunk the first halves of its 4 blocks, then the second
// halves, for q1 (128 bytes) then q2 (128 bytes).
template <int BITS>
static void block_bits(const Args& a, int gm, int64_t n0, int64_t n1, int64_t M) {
    if (gm == G32) block<BITS, G32>(a, n0, n1, M);
    else if (gm == G64) block<BITS, G64>(a, n0, n1, M);
    else block<BITS, BIG>(a, n0, n1, M);
}

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

// y (M, N) = x (M, K) @ W^T for a dense float32 W (N, K), M small (a decode step): the layers a plan keeps dense,
// above all an output head (SmolLM2's tied 49152x576 table is 113 MB a token). torch's float32 GEMV streams such
// a matrix at 15-20 GB/s on 2 cores (measured); this reads each row once per call at the int kernel's rate: RT rows
// at a time against every activation row, the same dynamic row blocks and prefetch. Float32 sums in another order
// than torch's: equal to F.linear within float rounding.
template <int RT>
static void sgemv_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t n, float* y, int64_t N) {
#if defined(__AVX512F__)
    constexpr int L = 16;
#else
    constexpr int L = 8;
#endif
    const float* row[RT];
    for (int r = 0; r < RT; ++r) row[r] = w + (n + r) * K;
    for (int64_t i = 0; i < M; ++i) {
        const float* xi = x + i * K;
#if defined(__AVX512F__)
        __m512 acc[RT];
        for (int r = 0; r < RT; ++r) acc[r] = _mm512_setzero_ps();
#else
        __m256 acc[RT];
        for (int r = 0; r < RT; ++r) acc[r] = _mm256_setzero_ps();
#endif
        int64_t k = 0;
        for (; k + L <= K; k += L) {
            if (i == 0)
                for (int r = 0; r < RT; ++r) _mm_prefetch((const char*)(row[r] + k + 2 * RT * K), _MM_HINT_T0);
#if defined(__AVX512F__)
            const __m512 xv = _mm512_loadu_ps(xi + k);
            for (int r = 0; r < RT; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row[r] + k), xv, acc[r]);
#else
            const __m256 xv = _mm256_loadu_ps(xi + k);
            for (int r = 0; r < RT; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row[r] + k), xv, acc[r]);
#endif
        }
        for (int r = 0; r < RT; ++r) {
#if defined(__AVX512F__)
            float sum = _mm512_reduce_add_ps(acc[r]);
#else
            float sum = hc_hsum8(acc[r]);
#endif
            for (int64_t kk = k; kk < K; ++kk) sum += row[r][kk] * xi[kk];
            y[i * N + n + r] = sum;
        }
    }
}

// Rows [0, N) of a product with M activation rows and K inputs, shared out to threads: f(n0, n1) per block.
// Small layers run on one thread (a wake-up is ~10 µs, more than such a layer saves; ~1 thread per 256K weights).
// Blocks are handed out dynamically, each about a quarter of a thread's share (16 to 256 rows): long enough that
// each core reads one long stream (cold weights, 2 threads: 16-row blocks streamed 25-29 GB/s, these 33-42 GB/s;
// a 49152x576 head 749 -> 443 us), and four per thread, so that a thread preempted on a shared machine does not
// leave a whole static share to the end.
template <class F>
static void for_row_blocks(int64_t N, int64_t K, int64_t M, int nthreads, F f) {
    const int64_t work = N * K * (M < 8 ? M : 8) / (1 << 18);
    const int nt = (int)(work < 1 ? 1 : (work < nthreads ? work : nthreads));
    int64_t br = (N / (4 * nt) + 15) / 16 * 16;
    br = br < 16 ? 16 : br > 256 ? 256 : br;
    const int64_t nblk = (N + br - 1) / br;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t bi = 0; bi < nblk; ++bi) f(bi * br, bi * br + br < N ? bi * br + br : N);
}

}  // namespace

extern "C" {

const char* hc_isa(void) { return HC_ISA; }

// y (M, N) = x (M, K) @ W^T for the packed grid of `bits` (1..4: its layout, see the top); group: 32, 64 or a
// multiple of 128 dividing Kp (G = Kp / group). Scratch for the quantized activation is allocated here:
// M * (Kp * 2.5 + G * 4) bytes.
int hc_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scale, const uint16_t* zero,
            int64_t N, int64_t Kp, int64_t group, int bits, float* y, int nthreads) {
    if (M < 1 || Kp % SC || K > Kp || Kp % group || !(group == 32 || group == 64 || group % SC == 0)) return 1;
    if (bits < 1 || bits > 4) return 1;
    const int64_t G = Kp / group;
    int8_t* xq = (int8_t*)malloc((size_t)(M * Kp * 2));
    float* xd = (float*)malloc((size_t)(M * Kp / 8) * sizeof(float));
    float* xsum = (float*)calloc((size_t)(M * G), sizeof(float));
    if (!xq || !xd || !xsum) {
        free(xq), free(xd), free(xsum);
        return 2;
    }
    const Args a{w, scale, zero, xq, xd, xsum, y, N, Kp, G, group / SC, Kp / SC * 16 * bits};
    const int gm = group == 32 ? G32 : group == 64 ? G64 : BIG;
    // Serial: ~1 µs per 2048 inputs, and a parallel loop here would add a barrier (on a shared machine each
    // barrier can wait a whole scheduler slice for a preempted thread).
    for (int64_t i = 0; i < M; ++i)
        quantize_row(x + i * K, K, Kp, group / 32, xq + i * 2 * Kp, xd + i * (Kp / 8), xsum + i * G);
    for_row_blocks(N, Kp, M, nthreads, [&](int64_t n0, int64_t n1) {
        if (bits == 1) block_bits<1>(a, gm, n0, n1, M);
        else if (bits == 2) block_bits<2>(a, gm, n0, n1, M);
        else if (bits == 3) block_bits<3>(a, gm, n0, n1, M);
        else block_bits<4>(a, gm, n0, n1, M);
    });
    free(xq), free(xd), free(xsum);
    return 0;
}

// The `bits` layout (1..4, see the top) of rows x cols codes read from a dense little-endian bitstream of `bits` bits
// a code (code i at bit i * bits, rows one after another: how hiercomp stores a grid's codes), code 0 past cols up
// to padded (a multiple of 128): out is rows x (padded / 128 * 16 bits) bytes. What gemv.py's _pack makes from
// unpacked codes, straight from the stored form: building a layer's kernel at load then needs no unpacked copy and
// no temporaries. Returns 1 on bad sizes.
int hc_pack_stream(const uint8_t* stream, int64_t stream_len, int64_t rows, int64_t cols, int64_t padded, int bits,
                   uint8_t* out) {
    if (bits < 1 || bits > 4 || padded % SC || cols > padded) return 1;
    if ((rows * cols * bits + 7) / 8 > stream_len) return 1;
    const int64_t nsc = padded / SC, rowbytes = nsc * 16 * bits;
    const unsigned mask = (1u << bits) - 1;
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t* o = out + r * rowbytes;
        for (int64_t c = 0; c < nsc; ++c, o += 16 * bits) {
            uint8_t nat[SC], q[SC];  // natural order, then the code order (see the top)
            for (int64_t k = 0; k < SC; ++k) {
                const int64_t col = c * SC + k;
                if (col >= cols) {
                    nat[k] = 0;
                    continue;
                }
                const int64_t bit = (r * cols + col) * bits, byte = bit / 8;
                unsigned v = stream[byte];
                if (byte + 1 < stream_len) v |= (unsigned)stream[byte + 1] << 8;
                nat[k] = (uint8_t)((v >> (bit % 8)) & mask);
            }
            for (int p = 0; p < 64; ++p) {
                q[p] = nat[(p / 16) * 32 + p % 16];
                q[64 + p] = nat[(p / 16) * 32 + 16 + p % 16];
            }
            if (bits == 4) {
                for (int t = 0; t < 64; ++t) o[t] = (uint8_t)(q[t] | q[64 + t] << 4);
            } else if (bits == 1) {
                for (int t = 0; t < 16; ++t) {
                    unsigned b = 0;
                    for (int j = 0; j < 8; ++j) b |= (unsigned)(q[16 * j + t] & 1) << j;
                    o[t] = (uint8_t)b;
                }
            } else {  // 2 bits, and the low 2 bits of a 3-bit layout followed by its high-bit plane
                for (int t = 0; t < 32; ++t)
                    o[t] = (uint8_t)((q[t] & 3) | (q[32 + t] & 3) << 2 | (q[64 + t] & 3) << 4 | (q[96 + t] & 3) << 6);
                if (bits == 3)
                    for (int t = 0; t < 16; ++t) {
                        unsigned b = 0;
                        for (int j = 0; j < 8; ++j) b |= (unsigned)(q[16 * j + t] >> 2 & 1) << j;
                        o[32 + t] = (uint8_t)b;
                    }
            }
        }
    }
    return 0;
}

int hc_sgemv(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int nthreads) {
    if (M < 1 || K < 1 || N < 1) return 1;
    for_row_blocks(N, K, M, nthreads, [&](int64_t n0, int64_t n1) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) sgemv_rows<4>(x, M, K, w, n, y, N);
        for (; n < n1; ++n) sgemv_rows<1>(x, M, K, w, n, y, N);
    });
    return 0;
}

}  // extern "C"
