// Indexed paged decode attention with a per-key logit bias, returning the per-key
// attention mass averaged over query heads too (tokenzoom's token view, DESIGN.md §4.3).
// CPU, no CUDA.
//
// One decode query attends to an ascending list of key positions of a paged KV cache.
// The cache is described without vLLM: per layer a K and a V region
// [num_blocks, num_kv_heads, block_size * head_size] and offset tables
// [block_size, head_size] telling where element (t, d) of a block lives in its region.
// Position p lives in block block_row[p / B], slot p % B. Two layouts get fast paths:
// "plain" (offset t * hs + d) and "transposed" (d * B + t, vLLM's CPU K for isa=vec);
// anything else goes through the offset tables element by element.
// Torch reference: vllm_tokenzoom/ops/paged_attention_ref.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Layout : int64_t { kGeneric = 0, kPlain = 1, kTransposed = 2 };

struct Shape {
  int64_t num_q_heads, num_kv_heads, head_size, block_size, n, group;
  int64_t block_stride, head_stride;  // of the regions, in elements (the last dim is contiguous)
};

// logits[g * n + j] = q_g . k_j for the query heads g of one KV head.
// x[j] = exp(x[j] - shift) for n floats, as a loop the compiler vectorises (libm's expf is
// not): exp(v) = 2^k * e^r, k = round(v / ln 2), |r| <= ln(2) / 2, e^r by its degree-7 Taylor
// polynomial (relative error < 1e-8, below fp32's 6e-8). v below -87.3 (incl. -inf) gives 0.
inline float exp_sum_inplace(float* x, int64_t n, float shift) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const float v = std::max(x[j] - shift, -87.3f);
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = (v - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r * (1.f / 5040)))))));
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const float e = (x[j] - shift) < -87.3f ? 0.f : p * scale;
    x[j] = e;
    total += e;
  }
  return total;
}

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats; the compiler keeps acc[] in it

constexpr int64_t kMaxGroup = 16;  // query heads per KV head handled in one pass

// Transposed K (element (t, d) at d * B + t): logits of all B slots of one block for the
// `group` query heads of one KV head, 16 slots at a time; each loaded K chunk feeds every
// head. -> tmp[g * B + t]
template <typename T>
inline void qk_block_transposed(const float* q, int64_t group, const T* base, int64_t B, int64_t hs, float* tmp) {
  int64_t t0 = 0;
  for (; t0 + kLanes <= B; t0 += kLanes) {
    float acc[kMaxGroup][kLanes] = {{0.f}};
    for (int64_t d = 0; d < hs; ++d) {
      const T* col = base + d * B + t0;
      float k[kLanes];
#pragma omp simd
      for (int64_t i = 0; i < kLanes; ++i) k[i] = static_cast<float>(col[i]);
      for (int64_t g = 0; g < group; ++g) {
        const float qd = q[g * hs + d];
#pragma omp simd
        for (int64_t i = 0; i < kLanes; ++i) acc[g][i] += qd * k[i];
      }
    }
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < kLanes; ++i) tmp[g * B + t0 + i] = acc[g][i];
  }
  for (; t0 < B; ++t0) {
    for (int64_t g = 0; g < group; ++g) {
      float acc = 0.f;
      for (int64_t d = 0; d < hs; ++d) acc += q[g * hs + d] * static_cast<float>(base[d * B + t0]);
      tmp[g * B + t0] = acc;
    }
  }
}

// slot[j] = keys[j] % B and block[j] = block_row[keys[j] / B]: computed once per call.
// logits[g * n + j] = q_g . k_j for the query heads g of one KV head.
template <typename T>
void qk(const float* q, const T* k_region, const int64_t* k_off, int64_t k_layout, const int64_t* slot,
        const int64_t* block, const Shape& s, int64_t kv_head, float* logits) {
  const int64_t hs = s.head_size, B = s.block_size, n = s.n;
  std::vector<float> tmp(s.group * B);
  int64_t j0 = 0;
  while (j0 < n) {  // keys are ascending: walk them block by block
    int64_t j1 = j0;
    while (j1 < n && block[j1] == block[j0]) ++j1;
    const T* base = k_region + block[j0] * s.block_stride + kv_head * s.head_stride;
    if (k_layout == kTransposed && s.group <= kMaxGroup) {  // every slot at SIMD speed, then pick the kept ones
      qk_block_transposed(q, s.group, base, B, hs, tmp.data());
      for (int64_t g = 0; g < s.group; ++g)
        for (int64_t j = j0; j < j1; ++j) logits[g * n + j] = tmp[g * B + slot[j]];
      j0 = j1;
      continue;
    }
    for (int64_t g = 0; g < s.group; ++g) {
      const float* qg = q + g * hs;
      float* lg = logits + g * n;
      if (k_layout == kTransposed) {  // more query heads per KV head than one pass holds
        for (int64_t j = j0; j < j1; ++j) {
          float dot = 0.f;
          for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(base[d * B + slot[j]]);
          lg[j] = dot;
        }
        continue;
      }
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = slot[j];
        float dot = 0.f;
        if (k_layout == kPlain) {
          const T* row = base + t * hs;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(row[d]);
        } else {
          const int64_t* offs = k_off + t * hs;
          for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(base[offs[d]]);
        }
        lg[j] = dot;
      }
    }
    j0 = j1;
  }
}

template <typename T>
void decode_kernel(const float* q, const T* k_region, const T* v_region, const int64_t* k_off, const int64_t* v_off,
                   int64_t k_layout, int64_t v_layout, const int64_t* block_row, const int64_t* keys,
                   const float* bias, float* out, float* probs, const Shape& s, float scale) {
  const int64_t hs = s.head_size, B = s.block_size, n = s.n;
  std::vector<int64_t> slot(n), block(n);
  for (int64_t j = 0; j < n; ++j) {
    slot[j] = keys[j] % B;
    block[j] = block_row[keys[j] / B];
  }
  at::parallel_for(0, s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(s.group * n);
    for (int64_t kv_head = begin; kv_head < end; ++kv_head) {
      const int64_t h0 = kv_head * s.group;
      qk(q + h0 * hs, k_region, k_off, k_layout, slot.data(), block.data(), s, kv_head, logits.data());
      for (int64_t g = 0; g < s.group; ++g) {  // softmax per query head
        float* lg = logits.data() + g * n;
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          lg[j] = lg[j] * scale + (bias ? bias[j] : 0.f);
          max_logit = std::max(max_logit, lg[j]);
        }
        const float inv = 1.f / exp_sum_inplace(lg, n, max_logit);  // a bias of -inf (m = 0) gives 0
        float* ph = probs + (h0 + g) * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ph[j] = lg[j] * inv;
      }
      float* o = out + h0 * hs;  // [group, hs]
      std::fill(o, o + s.group * hs, 0.f);
      for (int64_t j = 0; j < n; ++j) {  // each V row is loaded once for every head of the group
        const int64_t t = slot[j];
        const T* base = v_region + block[j] * s.block_stride + kv_head * s.head_stride;
        for (int64_t g = 0; g < s.group; ++g) {
          const float p = probs[(h0 + g) * n + j];
          float* oh = o + g * hs;
          if (v_layout == kPlain) {
            const T* row = base + t * hs;
#pragma omp simd
            for (int64_t d = 0; d < hs; ++d) oh[d] += p * static_cast<float>(row[d]);
          } else {
            const int64_t* offs = v_off + t * hs;
            for (int64_t d = 0; d < hs; ++d) oh[d] += p * static_cast<float>(base[offs[d]]);
          }
        }
      }
    }
  });
}

// query [Hq, hs]; k_region, v_region [nb, Hkv, B*hs]; k_offsets, v_offsets [B, hs] int64 with their
// layouts (0 generic, 1 plain, 2 transposed; V: 0 or 1); block_row [max_blocks] int; keys [n] int64
// ascending; bias [n] float32 (or empty) -> (out [Hq, hs] f32, probs [Hq, n] f32)
std::vector<torch::Tensor> indexed_decode_attention(torch::Tensor query, torch::Tensor k_region,
                                                    torch::Tensor v_region, torch::Tensor k_offsets,
                                                    torch::Tensor v_offsets, int64_t k_layout, int64_t v_layout,
                                                    torch::Tensor block_row, torch::Tensor keys, torch::Tensor bias,
                                                    double scale) {
  TORCH_CHECK(query.dim() == 2, "query must be [num_q_heads, head_size]");
  TORCH_CHECK(k_region.dim() == 3 && v_region.sizes() == k_region.sizes(), "regions must be [nb, Hkv, B*hs]");
  TORCH_CHECK(k_offsets.dim() == 2 && v_offsets.sizes() == k_offsets.sizes(), "offsets must be [B, hs]");
  TORCH_CHECK(k_layout >= 0 && k_layout <= 2 && v_layout >= 0 && v_layout <= 1, "unknown layout");
  Shape s;
  s.num_q_heads = query.size(0);
  s.head_size = query.size(1);
  s.num_kv_heads = k_region.size(1);
  s.block_size = k_offsets.size(0);
  s.n = keys.numel();
  TORCH_CHECK(k_offsets.size(1) == s.head_size && k_region.size(2) == s.block_size * s.head_size, "head size mismatch");
  TORCH_CHECK(s.num_q_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(s.n > 0, "at least one key must be read");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == s.n, "bias must have one entry per key");
  s.group = s.num_q_heads / s.num_kv_heads;
  TORCH_CHECK(k_region.stride(2) == 1 && v_region.stride(2) == 1 && k_region.strides() == v_region.strides(),
              "regions must be contiguous in their last dim and share strides");
  s.block_stride = k_region.stride(0);
  s.head_stride = k_region.stride(1);
  auto q = query.to(torch::kFloat32).contiguous();
  auto k_off = k_offsets.to(torch::kInt64).contiguous();
  auto v_off = v_offsets.to(torch::kInt64).contiguous();
  auto row = block_row.to(torch::kInt64).contiguous();
  auto key_pos = keys.to(torch::kInt64).contiguous();
  auto b = bias.to(torch::kFloat32).contiguous();
  auto kr = k_region, vr = v_region;  // views into vLLM's cache: read in place, never copied
  auto out = torch::empty({s.num_q_heads, s.head_size}, torch::kFloat32);
  auto probs = torch::empty({s.num_q_heads, s.n}, torch::kFloat32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kr.scalar_type(), "indexed_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<float>(), kr.data_ptr<scalar_t>(), vr.data_ptr<scalar_t>(),
                            k_off.data_ptr<int64_t>(), v_off.data_ptr<int64_t>(), k_layout, v_layout,
                            row.data_ptr<int64_t>(), key_pos.data_ptr<int64_t>(),
                            b.numel() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                            probs.data_ptr<float>(), s, static_cast<float>(scale));
  });
  return {out, probs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("indexed_decode_attention", &indexed_decode_attention,
        "Indexed paged decode attention with a per-key logit bias; returns (out, probs)");
}
