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
#include <limits>
#include <vector>

namespace {

enum Layout : int64_t { kGeneric = 0, kPlain = 1, kTransposed = 2 };

struct Shape {
  int64_t num_q_heads, num_kv_heads, head_size, block_size, n, group;
  int64_t block_stride, head_stride;  // of the regions, in elements (the last dim is contiguous)
};

// logits[g * n + j] = q_g . k_j for the query heads g of one KV head.
constexpr int64_t kLanes = 16;  // one AVX-512 register of floats; the compiler keeps acc[] in it

// Transposed K (element (t, d) at d * B + t): logits of all B slots of one block for one query
// head, 16 slots at a time, accumulated over d in registers. -> tmp[0..B)
template <typename T>
inline void qk_block_transposed(const float* qg, const T* base, int64_t B, int64_t hs, float* tmp) {
  int64_t t0 = 0;
  for (; t0 + kLanes <= B; t0 += kLanes) {
    float acc[kLanes] = {0.f};
    for (int64_t d = 0; d < hs; ++d) {
      const T* col = base + d * B + t0;
      const float qd = qg[d];
#pragma omp simd
      for (int64_t i = 0; i < kLanes; ++i) acc[i] += qd * static_cast<float>(col[i]);
    }
    for (int64_t i = 0; i < kLanes; ++i) tmp[t0 + i] = acc[i];
  }
  for (; t0 < B; ++t0) {
    float acc = 0.f;
    for (int64_t d = 0; d < hs; ++d) acc += qg[d] * static_cast<float>(base[d * B + t0]);
    tmp[t0] = acc;
  }
}

// slot[j] = keys[j] % B and block[j] = block_row[keys[j] / B]: computed once per call.
// logits[g * n + j] = q_g . k_j for the query heads g of one KV head.
template <typename T>
void qk(const float* q, const T* k_region, const int64_t* k_off, int64_t k_layout, const int64_t* slot,
        const int64_t* block, const Shape& s, int64_t kv_head, float* logits) {
  const int64_t hs = s.head_size, B = s.block_size, n = s.n;
  std::vector<float> tmp(B);
  int64_t j0 = 0;
  while (j0 < n) {  // keys are ascending: walk them block by block
    int64_t j1 = j0;
    while (j1 < n && block[j1] == block[j0]) ++j1;
    const T* base = k_region + block[j0] * s.block_stride + kv_head * s.head_stride;
    for (int64_t g = 0; g < s.group; ++g) {
      const float* qg = q + g * hs;
      float* lg = logits + g * n;
      if (k_layout == kTransposed) {  // every slot of the block at SIMD speed, then pick the kept ones
        qk_block_transposed(qg, base, B, hs, tmp.data());
        for (int64_t j = j0; j < j1; ++j) lg[j] = tmp[slot[j]];
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
      for (int64_t g = 0; g < s.group; ++g) {
        float* lg = logits.data() + g * n;
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          lg[j] = lg[j] * scale + (bias ? bias[j] : 0.f);
          max_logit = std::max(max_logit, lg[j]);
        }
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) {
          lg[j] = expf(lg[j] - max_logit);  // a bias of -inf (m = 0) gives 0; vectorised (libmvec)
          total += lg[j];
        }
        const float inv = 1.f / total;
        float* ph = probs + (h0 + g) * n;
        for (int64_t j = 0; j < n; ++j) ph[j] = lg[j] * inv;
        float* oh = out + (h0 + g) * hs;
        std::fill(oh, oh + hs, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = slot[j];
          const T* base = v_region + block[j] * s.block_stride + kv_head * s.head_stride;
          const float p = ph[j];
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
