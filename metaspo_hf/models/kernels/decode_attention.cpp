// One decode step of shared-prefix attention on CPU, in one pass over the keys and values.
//
// Every row of a chunk has one new query per head; it attends to the chunk's shared prefix (one copy, read by
// all rows) and to its own cached tokens (those its mask allows). torch's ops do this as four small matmuls,
// a concatenation, a masked fill and a softmax per layer, each with its own copies; here each (row, key head)
// reads its keys and values once, for all the query heads grouped on that key head, and keeps scores and
// sums in float32. `rotate_store_attention` also does what comes before it in a layer (the rotary embedding
// of the new query and key, and the write of the new key and value into the cache), for the engine's fused
// decode step, which also calls the elementwise ops at the end of this file (`add_rms_norm`, `silu_mul`). Built on
// first use by decode_kernel.py; the measured gain is in docs/benchmarks.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

inline float to_float(c10::BFloat16 x) { return std::bit_cast<float>(uint32_t(x.x) << 16); }
inline float to_float(float x) { return x; }

// exp(x) as 2^n * p(r) with r = x - n ln 2 and a degree-7 polynomial (the Cephes coefficients; relative error
// about 1e-7), x clamped to where 2^n stays in float's normal range. Written out so that the compiler vectorizes
// the loops that call it, which it does not do for std::exp.
inline float exp_clamped(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, for precision
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
}

// Where one layer's keys and values are: the shared prefix [kv_heads, prefix_len, D] (contiguous) and each row's
// own buffers [rows, kv_heads, >= slots, D] (any strides, contiguous last dim), the mask [rows, slots] saying which
// own slots a row attends to.
template <typename T>
struct Layer {
  const T *prefix_keys, *prefix_values, *keys, *values;
  const bool* mask;
  int64_t prefix_len, slots, k_row, k_head, k_slot, v_row, v_head, v_slot, m_row, m_slot;

  Layer(const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m)
      : prefix_keys(pk.data_ptr<T>()), prefix_values(pv.data_ptr<T>()), keys(k.data_ptr<T>()),
        values(v.data_ptr<T>()), mask(m.data_ptr<bool>()), prefix_len(pk.size(1)), slots(m.size(1)),
        k_row(k.stride(0)), k_head(k.stride(1)), k_slot(k.stride(2)), v_row(v.stride(0)), v_head(v.stride(1)),
        v_slot(v.stride(2)), m_row(m.stride(0)), m_slot(m.stride(1)) {}
};

// One thread's scratch space, reused across the (row, key head) units it runs.
template <typename T>
struct Scratch {
  std::vector<T> queries;
  std::vector<float> sums, peak, total, scores;
  std::vector<const T*> key_at, value_at;
  Scratch(int64_t group, int64_t dim, int64_t keys)
      : queries(group * dim), sums(group * dim), peak(group), total(group), scores(group * keys), key_at(keys),
        value_at(keys) {}
};

#if defined(__AVX512BF16__)
// Lane j of the result: the sum of the 16 lanes of sums[j] (a transpose and add in three levels).
inline __m512 sum_each(const __m512 (&sums)[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(sums[2 * i], sums[2 * i + 1]),
                             _mm512_unpackhi_ps(sums[2 * i], sums[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // quads[i]'s 128-bit block k holds the block-k sums of sums[4i .. 4i+3]; add the four blocks.
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

// The dot product of a bfloat16 query and key, D / 32 pairs of 16 products, summed in float32 per lane.
template <int D>
inline __m512 dot_lanes(const __m512bh (&query)[D / 32], const c10::BFloat16* key) {
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < D / 32; ++c)
    sum = _mm512_dpbf16_ps(sum, query[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
  return sum;
}
#endif

// Scores of one query (bfloat16, unscaled) against n keys, scaled; returns their maximum.
template <typename T, int D>
float score_keys(const T* query, const T* const* key_at, int64_t n, float scaling, float* scores) {
  float peak = -INFINITY;
  int64_t s = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && D % 32 == 0) {
    // 16 keys at a time: 16 vectors of lane sums, then one transpose-and-add for all 16 (BF16 dot products
    // are exact products summed in float32, as the scalar loop below sums them, in another order).
    __m512bh q[D / 32];
    for (int c = 0; c < D / 32; ++c) q[c] = (__m512bh)_mm512_loadu_si512(query + 32 * c);
    __m512 top = _mm512_set1_ps(-INFINITY);
    const __m512 scale = _mm512_set1_ps(scaling);
    for (; s + 16 <= n; s += 16) {
      __m512 sums[16];
      for (int j = 0; j < 16; ++j) sums[j] = dot_lanes<D>(q, key_at[s + j]);
      const __m512 block = _mm512_mul_ps(sum_each(sums), scale);
      _mm512_storeu_ps(scores + s, block);
      top = _mm512_max_ps(top, block);
    }
    peak = _mm512_reduce_max_ps(top);
    for (; s < n; ++s) {
      scores[s] = _mm512_reduce_add_ps(dot_lanes<D>(q, key_at[s])) * scaling;
      peak = scores[s] > peak ? scores[s] : peak;
    }
    return peak;
  }
#endif
  alignas(64) float q[D];
  for (int d = 0; d < D; ++d) q[d] = to_float(query[d]);
  for (; s < n; ++s) {
    const T* key = key_at[s];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int d = 0; d < D; ++d) dot += q[d] * to_float(key[d]);
    scores[s] = dot * scaling;
    peak = scores[s] > peak ? scores[s] : peak;
  }
  return peak;
}

// sums[g] = the values weighted by query head g's weights (weights[g * n + s] for key s), for every g.
template <typename T, int D>
void weigh_values(const T* const* value_at, int64_t n, const float* weights, int64_t group, float* sums) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && D % 16 == 0) {
    // A tile of query heads keeps its sums in registers while every value is read once per tile.
    constexpr int C = D / 16, TILE = 20 / C > 0 ? 20 / C : 1;
    for (int64_t first = 0; first < group; first += TILE) {
      const int64_t tile = std::min<int64_t>(TILE, group - first);
      __m512 acc[TILE][C];
      for (int t = 0; t < TILE; ++t)
        for (int c = 0; c < C; ++c) acc[t][c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < n; ++s) {
        const T* value = value_at[s];
        __m512 v[C];
        for (int c = 0; c < C; ++c)  // bfloat16 to float32: the 16 bits become the high half
          v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(value + 16 * c))), 16));
        for (int t = 0; t < TILE; ++t) {
          if (t < tile) {
            const __m512 w = _mm512_set1_ps(weights[(first + t) * n + s]);
            for (int c = 0; c < C; ++c) acc[t][c] = _mm512_fmadd_ps(w, v[c], acc[t][c]);
          }
        }
      }
      for (int t = 0; t < tile; ++t)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(sums + (first + t) * D + 16 * c, acc[t][c]);
    }
    return;
  }
#endif
  alignas(64) float vec[D];
  std::fill(sums, sums + group * D, 0.f);
  for (int64_t s = 0; s < n; ++s) {
    const T* value = value_at[s];
#pragma omp simd
    for (int d = 0; d < D; ++d) vec[d] = to_float(value[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float weight = weights[g * n + s];
      float* acc = sums + g * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += weight * vec[d];
    }
  }
}

// The attention of one (row, key head) unit: its `group` query heads (bfloat16, rotated, unscaled) in
// scratch.queries; the output of query head g goes to out + g * D.
template <typename T, int D>
void attend(const Layer<T>& layer, int64_t row, int64_t head, int64_t group, float scaling, Scratch<T>& scratch,
            T* out) {
  float* scores = scratch.scores.data();
  // The keys this row sees: the whole prefix, then its own unmasked slots.
  int64_t n = 0;
  for (int64_t s = 0; s < layer.prefix_len; ++s, ++n) {
    scratch.key_at[n] = layer.prefix_keys + (head * layer.prefix_len + s) * D;
    scratch.value_at[n] = layer.prefix_values + (head * layer.prefix_len + s) * D;
  }
  for (int64_t s = 0; s < layer.slots; ++s) {
    if (layer.mask[row * layer.m_row + s * layer.m_slot]) {
      scratch.key_at[n] = layer.keys + row * layer.k_row + head * layer.k_head + s * layer.k_slot;
      scratch.value_at[n] = layer.values + row * layer.v_row + head * layer.v_head + s * layer.v_slot;
      ++n;
    }
  }
  for (int64_t g = 0; g < group; ++g)
    scratch.peak[g] = score_keys<T, D>(scratch.queries.data() + g * D, scratch.key_at.data(), n, scaling, scores + g * n);
  for (int64_t g = 0; g < group; ++g) {
    float* p = scores + g * n;
    const float top = scratch.peak[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < n; ++s) {
      p[s] = exp_clamped(p[s] - top);
      sum += p[s];
    }
    scratch.total[g] = sum;
  }
  float* sums = scratch.sums.data();
  weigh_values<T, D>(scratch.value_at.data(), n, scores, group, sums);
  for (int64_t g = 0; g < group; ++g) {
    const float scale = 1.f / scratch.total[g];
    for (int d = 0; d < D; ++d) out[g * D + d] = T(sums[g * D + d] * scale);
  }
}

// query [rows, heads, D] (already rotated); the layer's cache as it stands.
template <typename T, int D>
void decode_step(const at::Tensor& query, const Layer<T>& layer, int64_t kv_heads, at::Tensor& out, float scaling) {
  const int64_t rows = query.size(0), heads = query.size(1), group = heads / kv_heads;
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(group, D, layer.prefix_len + layer.slots);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / kv_heads, head = unit % kv_heads;
      const T* qh = q + (row * heads + head * group) * D;
      std::copy_n(qh, group * D, scratch.queries.begin());
      attend<T, D>(layer, row, head, group, scaling, scratch, o + (row * heads + head * group) * D);
    }
  });
}

// Rotary position embedding of one head as transformers computes it in bfloat16, (x * cos) + (rotate_half(x) * sin),
// with each product and the sum rounded to bfloat16 as torch's elementwise ops round them: the same bits.
template <typename T, int D>
inline void rotate(const T* x, const T* cos, const T* sin, T* out) {
  constexpr int half = D / 2;
  for (int d = 0; d < D; ++d) {
    const float turned = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
    const T straight_part = T(to_float(x[d]) * to_float(cos[d]));
    const T turned_part = T(turned * to_float(sin[d]));
    out[d] = T(to_float(straight_part) + to_float(turned_part));
  }
}

// A whole decode step of one layer's attention from its projections: rotate the new query and key, write the new
// key and value into every row's slot `slot`, then attend (the mask must allow that slot).
template <typename T, int D>
void rotate_store_attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cos,
                         const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t slot,
                         const Layer<T>& layer, int64_t heads, at::Tensor& out, float scaling) {
  const int64_t rows = query.size(0), kv_heads = keys.size(1), group = heads / kv_heads;
  const T *q = query.data_ptr<T>(), *k = key.data_ptr<T>(), *v = value.data_ptr<T>();
  const T *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
  T *key_buffer = keys.data_ptr<T>(), *value_buffer = values.data_ptr<T>(), *o = out.data_ptr<T>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(group, D, layer.prefix_len + layer.slots);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / kv_heads, head = unit % kv_heads;
      const T *row_cos = c + row * cos.stride(0), *row_sin = s + row * sin.stride(0);
      rotate<T, D>(k + row * key.stride(0) + head * D, row_cos, row_sin,
                   key_buffer + row * layer.k_row + head * layer.k_head + slot * layer.k_slot);
      std::copy_n(v + row * value.stride(0) + head * D, D,
                  value_buffer + row * layer.v_row + head * layer.v_head + slot * layer.v_slot);
      for (int64_t g = 0; g < group; ++g)
        rotate<T, D>(q + row * query.stride(0) + (head * group + g) * D, row_cos, row_sin,
                     scratch.queries.data() + g * D);
      attend<T, D>(layer, row, head, group, scaling, scratch, o + (row * heads + head * group) * D);
    }
  });
}

void check_cache(const at::Tensor& prefix_keys, const at::Tensor& prefix_values, const at::Tensor& keys,
                 const at::Tensor& values, const at::Tensor& mask) {
  TORCH_CHECK(prefix_keys.is_contiguous() && prefix_values.is_contiguous(), "decode_attention: prefix must be contiguous");
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4, "decode_attention: keys and values must be [rows, kv_heads, slots, dim]");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "decode_attention: keys and values need a contiguous last dim");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2, "decode_attention: mask must be [rows, slots] bool");
  TORCH_CHECK(keys.size(2) >= mask.size(1) && values.size(2) >= mask.size(1), "decode_attention: mask is wider than the cache");
  for (const auto* t : {&prefix_keys, &prefix_values, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "decode_attention: bfloat16 only (float32 is faster on torch's ops)");
}

// query [rows, heads, head_dim], contiguous; prefix_keys/values [kv_heads, prefix_len, head_dim], contiguous;
// keys/values [rows, kv_heads, >= slots, head_dim], any strides but a contiguous last dim; mask [rows, slots]
// bool (true = attend); all bfloat16. Returns [rows, heads, head_dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                            const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                            double scaling) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), "decode_attention: query must be [rows, heads, dim], contiguous");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16, "decode_attention: bfloat16 only (float32 is faster on torch's ops)");
  check_cache(prefix_keys, prefix_values, keys, values, mask);
  TORCH_CHECK(query.size(1) % keys.size(1) == 0, "decode_attention: heads must be a multiple of key heads");
  at::Tensor out = at::empty_like(query);
  const Layer<c10::BFloat16> layer(prefix_keys, prefix_values, keys, values, mask);
  const float scale = static_cast<float>(scaling);
  switch (query.size(2)) {
    case 64: decode_step<c10::BFloat16, 64>(query, layer, keys.size(1), out, scale); break;
    case 128: decode_step<c10::BFloat16, 128>(query, layer, keys.size(1), out, scale); break;
    default: TORCH_CHECK(false, "decode_attention: head dim must be 64 or 128, got ", query.size(2));
  }
  return out;
}

// The fused form the engine's decode step uses (decode_step.py): query [rows, heads * head_dim], key and value
// [rows, kv_heads * head_dim] straight from the projections, before rotation (rows may be strided); cos and sin
// [rows, head_dim]; keys/values the layer's whole buffers, written at `slot`. Returns [rows, heads, head_dim].
at::Tensor rotate_store_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& prefix_keys,
                                  const at::Tensor& prefix_values, at::Tensor& keys, at::Tensor& values, int64_t slot,
                                  const at::Tensor& mask, double scaling) {
  check_cache(prefix_keys, prefix_values, keys, values, mask);
  const int64_t rows = query.size(0), kv_heads = keys.size(1), dim = keys.size(3);
  for (const auto* t : {&query, &key, &value, &cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->stride(1) == 1,
                "rotate_store_attention: query, key, value, cos and sin must be [rows, n] with a contiguous last dim");
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "rotate_store_attention: bfloat16 only");
  }
  TORCH_CHECK(key.size(1) == kv_heads * dim && value.size(1) == kv_heads * dim && cos.size(1) == dim &&
                  sin.size(1) == dim && query.size(1) % (kv_heads * dim) == 0,
              "rotate_store_attention: projections do not match the cache's heads");
  TORCH_CHECK(keys.size(0) == rows && values.size(0) == rows && mask.size(0) == rows,
              "rotate_store_attention: rows differ from the cache's");
  TORCH_CHECK(slot >= 0 && slot < mask.size(1), "rotate_store_attention: slot ", slot, " is outside the mask");
  const int64_t heads = query.size(1) / dim;
  at::Tensor out = at::empty({rows, heads, dim}, query.options());
  const Layer<c10::BFloat16> layer(prefix_keys, prefix_values, keys, values, mask);
  const float scale = static_cast<float>(scaling);
  switch (dim) {
    case 64:
      rotate_store_attend<c10::BFloat16, 64>(query, key, value, cos, sin, keys, values, slot, layer, heads, out, scale);
      break;
    case 128:
      rotate_store_attend<c10::BFloat16, 128>(query, key, value, cos, sin, keys, values, slot, layer, heads, out, scale);
      break;
    default: TORCH_CHECK(false, "rotate_store_attention: head dim must be 64 or 128, got ", dim);
  }
  return out;
}

// The rest of a decode step's layer, elementwise, one pass each where torch runs eight ops for a norm and two for
// the gated activation (their dispatch, not their arithmetic, was a fifth of a small model's step). Rounded as
// transformers' modules round in the model's dtype; only the norm's float32 sum of squares (summed here in
// another order) and the activation's exp (this polynomial, not torch's) may differ in the last bit.

// Rows of `width` values per parallel task: below this many values a second thread costs more than it saves.
constexpr int64_t kElementsPerTask = 32768;
inline int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, kElementsPerTask / width); }

#if defined(__AVX512BF16__)
// 16 values of the dtype as float32 lanes and back (the store rounds to nearest even, as torch does), lanes past
// `mask` left out; `rounded` is a lane's value as the dtype holds it.
inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
template <typename T>
inline __m512 rounded(__m512 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// exp on 16 lanes, as exp_clamped but for x past its range: 0 below, infinity above (scalef scales to them).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// hidden += delta (rounded to the dtype, as a residual add), then RMSNorm(hidden) * weight as LlamaRMSNorm computes
// it: the mean of squares in float32, hidden * rsqrt(mean + eps) rounded to the dtype, times the weight.
template <typename T>
void add_rms_norm_rows(T* hidden, const T* delta, const T* weight, T* out, int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T *h = hidden + r * width, *o = out + r * width;
      const T* d = delta == nullptr ? nullptr : delta + r * width;
#if defined(__AVX512BF16__)
      __m512 squares = _mm512_setzero_ps();
      for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = lanes(width - i);
        __m512 x = load16(h + i, m);
        if (d != nullptr) {
          x = rounded<T>(_mm512_add_ps(x, load16(d + i, m)));
          store16(h + i, x, m);
        }
        squares = _mm512_fmadd_ps(x, x, squares);
      }
      const __m512 scale = _mm512_set1_ps(
          1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(width) + eps));
      for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = lanes(width - i);
        store16(o + i, _mm512_mul_ps(load16(weight + i, m), rounded<T>(_mm512_mul_ps(load16(h + i, m), scale))), m);
      }
#else
      if (d != nullptr)
        for (int64_t i = 0; i < width; ++i) h[i] = T(to_float(h[i]) + to_float(d[i]));
      float squares = 0.f;
      for (int64_t i = 0; i < width; ++i) squares += to_float(h[i]) * to_float(h[i]);
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      for (int64_t i = 0; i < width; ++i) o[i] = T(to_float(weight[i]) * to_float(T(to_float(h[i]) * scale)));
#endif
    }
  });
}

// hidden [..., width] contiguous, updated in place by delta (same shape) when given; weight [width]. Returns the
// normed hidden states, hidden's shape and dtype.
at::Tensor add_rms_norm(at::Tensor& hidden, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps) {
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 &&
                  hidden.size(-1) == weight.size(0),
              "add_rms_norm: hidden must be contiguous [..., width] and weight [width]");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "add_rms_norm: weight and hidden differ in dtype");
  const bool adds = delta.has_value() && delta->defined();
  if (adds)
    TORCH_CHECK(delta->is_contiguous() && delta->sizes() == hidden.sizes() &&
                    delta->scalar_type() == hidden.scalar_type(),
                "add_rms_norm: delta must be contiguous, of hidden's shape and dtype");
  at::Tensor out = at::empty_like(hidden);
  const int64_t width = weight.size(0), rows = hidden.numel() / width;
  const float epsilon = static_cast<float>(eps);
  if (hidden.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    add_rms_norm_rows<T>(hidden.data_ptr<T>(), adds ? delta->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                         out.data_ptr<T>(), rows, width, epsilon);
  } else {
    TORCH_CHECK(hidden.scalar_type() == at::kFloat, "add_rms_norm: bfloat16 or float32 only");
    add_rms_norm_rows<float>(hidden.data_ptr<float>(), adds ? delta->data_ptr<float>() : nullptr,
                             weight.data_ptr<float>(), out.data_ptr<float>(), rows, width, epsilon);
  }
  return out;
}

// SiLU(gate) * up as the MLP computes it: the activation x / (1 + exp(-x)) rounded to the dtype, then the product.
// gate and up rows `gate_row` and `up_row` apart (halves of one merged projection's rows), out contiguous.
template <typename T>
void silu_mul_rows(const T* gate, const T* up, T* out, int64_t rows, int64_t width, int64_t gate_row, int64_t up_row) {
  at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *g = gate + r * gate_row, *u = up + r * up_row;
      T* o = out + r * width;
#if defined(__AVX512BF16__)
      for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = lanes(width - i);
        const __m512 x = load16(g + i, m);
        const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        store16(o + i, _mm512_mul_ps(rounded<T>(silu), load16(u + i, m)), m);
      }
#else
      for (int64_t i = 0; i < width; ++i) {
        const float x = to_float(g[i]);
        const float e = -x > 88.f ? INFINITY : exp_clamped(-x);  // past float's range, as torch's exp
        o[i] = T(to_float(T(x / (1.f + e))) * to_float(u[i]));
      }
#endif
    }
  });
}

// gate and up [rows, width] of one dtype, each with a contiguous last dim (rows may be strided). Returns
// SiLU(gate) * up, [rows, width] contiguous.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1 &&
                  gate.scalar_type() == up.scalar_type(),
              "silu_mul: gate and up must be [rows, width] of one dtype, with a contiguous last dim");
  const int64_t rows = gate.size(0), width = gate.size(1);
  at::Tensor out = at::empty({rows, width}, gate.options());
  if (gate.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    silu_mul_rows<T>(gate.data_ptr<T>(), up.data_ptr<T>(), out.data_ptr<T>(), rows, width, gate.stride(0), up.stride(0));
  } else {
    TORCH_CHECK(gate.scalar_type() == at::kFloat, "silu_mul: bfloat16 or float32 only");
    silu_mul_rows<float>(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), rows, width,
                         gate.stride(0), up.stride(0));
  }
  return out;
}

// The index of each row's largest value, the first of equal ones (a row with a NaN: its first NaN, as torch.max
// gives), for greedy picking: torch's max over the vocabulary was a few percent of a small model's decode step.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
#if defined(__AVX512BF16__)
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 top = lowest;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 v = _mm512_mask_blend_ps(m, lowest, load16(x + i, m));
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
      for (int64_t j = i;; ++j)
        if (std::isnan(to_float(x[j]))) return j;
    top = _mm512_max_ps(top, v);
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __mmask16 hits = _mm512_mask_cmp_ps_mask(m, load16(x + i, m), best, _CMP_EQ_OQ);
    if (hits) return i + __builtin_ctz(hits);
  }
  return 0;  // every value -inf: the first
#else
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    if (std::isnan(v)) return i;
    if (v > to_float(x[at])) at = i;
  }
  return at;
#endif
}

// logits [rows, vocab], bfloat16 or float32, with a contiguous last dim. Returns [rows] int64.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "argmax_rows: logits must be [rows, vocab] with a contiguous last dim");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: an empty vocabulary");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || logits.scalar_type() == at::kFloat, "argmax_rows: bfloat16 or float32 only");
  at::parallel_for(0, rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      o[r] = bf16 ? argmax_row(logits.data_ptr<c10::BFloat16>() + r * stride, vocab)
                  : argmax_row(logits.data_ptr<float>() + r * stride, vocab);
  });
  return out;
}

}  // namespace

// torch.ops.metaspo.decode_attention; only these light headers, so that the build takes seconds, not a minute.
TORCH_LIBRARY(metaspo, library) {
  library.def("decode_attention", &decode_attention);
  library.def(
      "rotate_store_attention(Tensor query, Tensor key, Tensor value, Tensor cos, Tensor sin, Tensor prefix_keys, "
      "Tensor prefix_values, Tensor(a!) keys, Tensor(b!) values, int slot, Tensor mask, float scaling) -> Tensor",
      &rotate_store_attention);
  library.def("add_rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  library.def("silu_mul", &silu_mul);
  library.def("argmax_rows", &argmax_rows);
}
