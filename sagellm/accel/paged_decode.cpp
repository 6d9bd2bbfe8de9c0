// Paged decode attention for the CPU: each (request, kv head) reads its blocks in place from the
// KV cache, so no gathered copy of the context is ever made. Grouped-query heads that share a KV
// head are computed together so each K/V row is read once. Accumulation is in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

// Loads that the compiler can vectorize: bfloat16 is the high half of a float32.
static inline float load(const float* p, int64_t i) { return p[i]; }
static inline float load(const at::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
static inline float load(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
static void decode_impl(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
                        T* out, int64_t batch, int64_t n_heads, int64_t n_kv, int64_t dim,
                        int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = n_heads / n_kv;
  const int64_t row_stride = n_kv * dim;  // elements between consecutive tokens in the cache
  at::parallel_for(0, batch * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_kv, h = item % n_kv;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      scores.assign(group * len, 0.f);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          qf[g * dim + d] = load(q, (b * n_heads + h * group + g) * dim + d) * scale;
      for (int64_t t = 0; t < len; ++t) {
        const T* k = kc + (table[t / block_size] * block_size + t % block_size) * row_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * load(k, d);
          scores[g * len + t] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) mx = sg[t] > mx ? sg[t] : mx;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = vc + (table[t / block_size] * block_size + t % block_size) * row_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * load(v, d);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * n_heads + h * group + g) * dim + d] = static_cast<T>(acc[g * dim + d]);
    }
  });
}

// q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; tables: [B, max_blocks] int64;
// lens: [B] int64 (context length including the new token). Returns [B, Hq, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "need contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables/lens");
  auto t = tables.contiguous();
  auto l = lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t batch = q.size(0), n_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), n_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && n_heads % n_kv == 0, "head mismatch");
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    decode_impl<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                          t.data_ptr<int64_t>(), l.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch,
                          n_heads, n_kv, dim, block_size, t.size(1), static_cast<float>(scale));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode supports float32, bfloat16 and float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode, "paged decode attention"); }
