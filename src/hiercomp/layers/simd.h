// Small AVX2 helpers shared by gemv.cpp and decode.cpp (a header: part of the library's build hash, not compiled
// alone).
#pragma once

#include <immintrin.h>

// The sum of a vector's 8 floats.
static inline float hc_hsum8(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}
