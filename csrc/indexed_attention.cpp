// Indexed paged decode attention with a per-key logit bias, returning the per-key
// probabilities too (tokenzoom's token view, DESIGN.md §4.3). CPU, no CUDA.
//
// One decode query attends to an arbitrary list of key positions of a paged KV cache.
// The cache is described without vLLM: per layer a K and a V region
// [num_blocks, num_kv_heads, block_size * head_size] and offset tables
// [block_size, head_size] telling where element (t, d) of a block lives in its region
// (vLLM's CPU cache packs K per ISA). Position p lives in block block_row[p / B], slot p % B.
// Torch reference: vllm_tokenzoom/ops/paged_attention_ref.py (biased_attention, gather_kv).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode_kernel(const float* q,             // [Hq, hs]
                   const scalar_t* k_region,   // [nb, Hkv, B*hs]
                   const scalar_t* v_region,   // [nb, Hkv, B*hs]
                   const int64_t* k_off,       // [B, hs]
                   const int64_t* v_off,       // [B, hs]
                   const int64_t* block_row,   // [max_blocks]
                   const int64_t* keys,        // [n]
                   const float* bias,          // [n] or nullptr
                   float* out,                 // [Hq, hs]
                   float* probs,               // [Hq, n]
                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_size, int64_t block_size,
                   int64_t n, float scale) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t region = block_size * head_size;
  at::parallel_for(0, num_q_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const int64_t kv_head = h / group;
      const float* qh = q + h * head_size;
      float* ph = probs + h * n;
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = keys[j];
        const int64_t base = (block_row[pos / block_size] * num_kv_heads + kv_head) * region;
        const int64_t* offs = k_off + (pos % block_size) * head_size;
        float dot = 0.f;
        for (int64_t d = 0; d < head_size; ++d) dot += qh[d] * static_cast<float>(k_region[base + offs[d]]);
        const float logit = dot * scale + (bias ? bias[j] : 0.f);
        ph[j] = logit;
        max_logit = std::max(max_logit, logit);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        ph[j] = std::exp(ph[j] - max_logit);  // a bias of -inf (m = 0) gives 0
        total += ph[j];
      }
      float* oh = out + h * head_size;
      std::fill(oh, oh + head_size, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        ph[j] /= total;
        const int64_t pos = keys[j];
        const int64_t base = (block_row[pos / block_size] * num_kv_heads + kv_head) * region;
        const int64_t* offs = v_off + (pos % block_size) * head_size;
        for (int64_t d = 0; d < head_size; ++d) oh[d] += ph[j] * static_cast<float>(v_region[base + offs[d]]);
      }
    }
  });
}

// query [Hq, hs]; k_region, v_region [nb, Hkv, B*hs]; k_offsets, v_offsets [B, hs] int64;
// block_row [max_blocks] int; keys [n] int64; bias [n] float32 (or empty): -> (out [Hq, hs] f32, probs [Hq, n] f32)
std::vector<torch::Tensor> indexed_decode_attention(torch::Tensor query, torch::Tensor k_region,
                                                    torch::Tensor v_region, torch::Tensor k_offsets,
                                                    torch::Tensor v_offsets, torch::Tensor block_row,
                                                    torch::Tensor keys, torch::Tensor bias, double scale) {
  TORCH_CHECK(query.dim() == 2, "query must be [num_q_heads, head_size]");
  TORCH_CHECK(k_region.dim() == 3 && v_region.sizes() == k_region.sizes(), "regions must be [nb, Hkv, B*hs]");
  TORCH_CHECK(k_offsets.dim() == 2 && v_offsets.sizes() == k_offsets.sizes(), "offsets must be [B, hs]");
  const int64_t num_q_heads = query.size(0), head_size = query.size(1);
  const int64_t num_kv_heads = k_region.size(1), block_size = k_offsets.size(0), n = keys.numel();
  TORCH_CHECK(k_offsets.size(1) == head_size && k_region.size(2) == block_size * head_size, "head size mismatch");
  TORCH_CHECK(num_q_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(n > 0, "at least one key must be read");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == n, "bias must have one entry per key");
  auto q = query.to(torch::kFloat32).contiguous();
  auto k_off = k_offsets.to(torch::kInt64).contiguous();
  auto v_off = v_offsets.to(torch::kInt64).contiguous();
  auto row = block_row.to(torch::kInt64).contiguous();
  auto key_pos = keys.to(torch::kInt64).contiguous();
  auto b = bias.to(torch::kFloat32).contiguous();
  auto kr = k_region.contiguous(), vr = v_region.contiguous();
  auto out = torch::empty({num_q_heads, head_size}, torch::kFloat32);
  auto probs = torch::empty({num_q_heads, n}, torch::kFloat32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kr.scalar_type(), "indexed_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<float>(), kr.data_ptr<scalar_t>(), vr.data_ptr<scalar_t>(),
                            k_off.data_ptr<int64_t>(), v_off.data_ptr<int64_t>(), row.data_ptr<int64_t>(),
                            key_pos.data_ptr<int64_t>(), b.numel() ? b.data_ptr<float>() : nullptr,
                            out.data_ptr<float>(), probs.data_ptr<float>(), num_q_heads, num_kv_heads,
                            head_size, block_size, n, static_cast<float>(scale));
  });
  return {out, probs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("indexed_decode_attention", &indexed_decode_attention,
        "Indexed paged decode attention with a per-key logit bias; returns (out, probs)");
}
