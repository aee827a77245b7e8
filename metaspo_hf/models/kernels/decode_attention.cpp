// One decode step of shared-prefix attention on CPU, in one pass over the keys and values.
//
// Every row of a chunk has one new query per head; it attends to the chunk's shared prefix (one copy, read by
// all rows) and to its own cached tokens (those its mask allows). torch's ops do this as four small matmuls,
// a concatenation, a masked fill and a softmax per layer, each with its own copies; here each (row, key head)
// reads its keys and values once, for all the query heads grouped on that key head, and keeps scores and
// sums in float32. Built on first use by decode_kernel.py; the measured gain is in docs/benchmarks.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float to_float(c10::BFloat16 x) { return std::bit_cast<float>(uint32_t(x.x) << 16); }

// exp(x) for x <= 0, as softmax needs after subtracting the maximum: 2^n * p(r) with r = x - n ln 2 and a
// degree-7 polynomial (the Cephes coefficients; relative error about 1e-7). Written out so that the
// compiler vectorizes the loop that calls it, which it does not do for std::exp.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;  // below this 2^n leaves float's normal range; the result rounds to 0 anyway
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

template <typename T, int D>
void decode_step(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                 const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask, at::Tensor& out,
                 float scaling) {
  const int64_t rows = query.size(0), heads = query.size(1), kv_heads = keys.size(1);
  const int64_t group = heads / kv_heads, prefix_len = prefix_keys.size(1), slots = mask.size(1);
  const T* q = query.data_ptr<T>();
  const T* pk = prefix_keys.data_ptr<T>();
  const T* pv = prefix_values.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const bool* m = mask.data_ptr<bool>();
  T* o = out.data_ptr<T>();
  const int64_t k_row = keys.stride(0), k_head = keys.stride(1), k_slot = keys.stride(2);
  const int64_t v_row = values.stride(0), v_head = values.stride(1), v_slot = values.stride(2);
  const int64_t m_row = mask.stride(0), m_slot = mask.stride(1);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(group * D), sums(group * D), peak(group), total(group);
    std::vector<float> scores(group * (prefix_len + slots));
    std::vector<const T*> key_at(prefix_len + slots), value_at(prefix_len + slots);
    alignas(64) float vec[D];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / kv_heads, head = unit % kv_heads;
      for (int64_t g = 0; g < group; ++g)
        for (int d = 0; d < D; ++d)
          queries[g * D + d] = to_float(q[(row * heads + head * group + g) * D + d]) * scaling;
      // The keys this row sees: the whole prefix, then its own unmasked slots.
      int64_t n = 0;
      for (int64_t s = 0; s < prefix_len; ++s, ++n) {
        key_at[n] = pk + (head * prefix_len + s) * D;
        value_at[n] = pv + (head * prefix_len + s) * D;
      }
      for (int64_t s = 0; s < slots; ++s) {
        if (m[row * m_row + s * m_slot]) {
          key_at[n] = k + row * k_row + head * k_head + s * k_slot;
          value_at[n] = v + row * v_row + head * v_head + s * v_slot;
          ++n;
        }
      }
      for (int64_t g = 0; g < group; ++g) peak[g] = -INFINITY;
      for (int64_t s = 0; s < n; ++s) {
        const T* key = key_at[s];
#pragma omp simd
        for (int d = 0; d < D; ++d) vec[d] = to_float(key[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = queries.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += qg[d] * vec[d];
          scores[g * n + s] = dot;
          peak[g] = dot > peak[g] ? dot : peak[g];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* p = scores.data() + g * n;
        const float top = peak[g];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < n; ++s) {
          p[s] = exp_nonpositive(p[s] - top);
          sum += p[s];
        }
        total[g] = sum;
      }
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const T* value = value_at[s];
#pragma omp simd
        for (int d = 0; d < D; ++d) vec[d] = to_float(value[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * n + s];
          float* acc = sums.data() + g * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[d] += weight * vec[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float scale = 1.f / total[g];
        for (int d = 0; d < D; ++d) o[(row * heads + head * group + g) * D + d] = T(sums[g * D + d] * scale);
      }
    }
  });
}

template <typename T>
void dispatch_head_dim(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                       const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask, at::Tensor& out,
                       float scaling) {
  switch (query.size(2)) {
    case 64: return decode_step<T, 64>(query, prefix_keys, prefix_values, keys, values, mask, out, scaling);
    case 128: return decode_step<T, 128>(query, prefix_keys, prefix_values, keys, values, mask, out, scaling);
    default: TORCH_CHECK(false, "decode_attention: head dim must be 64 or 128, got ", query.size(2));
  }
}

// query [rows, heads, head_dim], contiguous; prefix_keys/values [kv_heads, prefix_len, head_dim], contiguous;
// keys/values [rows, kv_heads, >= slots, head_dim], any strides but a contiguous last dim; mask [rows, slots]
// bool (true = attend); all bfloat16. Returns [rows, heads, head_dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& prefix_keys, const at::Tensor& prefix_values,
                            const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                            double scaling) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), "decode_attention: query must be [rows, heads, dim], contiguous");
  TORCH_CHECK(prefix_keys.is_contiguous() && prefix_values.is_contiguous(), "decode_attention: prefix must be contiguous");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "decode_attention: keys and values need a contiguous last dim");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2, "decode_attention: mask must be [rows, slots] bool");
  TORCH_CHECK(keys.size(2) >= mask.size(1) && values.size(2) >= mask.size(1), "decode_attention: mask is wider than the cache");
  TORCH_CHECK(query.size(1) % keys.size(1) == 0, "decode_attention: heads must be a multiple of key heads");
  for (const auto* t : {&query, &prefix_keys, &prefix_values, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "decode_attention: bfloat16 only (float32 is faster on torch's ops)");
  at::Tensor out = at::empty_like(query);
  const float scale = static_cast<float>(scaling);
  dispatch_head_dim<c10::BFloat16>(query, prefix_keys, prefix_values, keys, values, mask, out, scale);
  return out;
}

}  // namespace

// torch.ops.metaspo.decode_attention; only these light headers, so that the build takes seconds, not a minute.
TORCH_LIBRARY(metaspo, library) { library.def("decode_attention", &decode_attention); }
