// Indexed paged decode attention with a per-key logit bias, returning the per-key
// attention mass averaged over query heads when asked (tokenzoom's token view, DESIGN.md §4.3).
// CPU, no CUDA.
//
// Each request's decode query attends to an ascending list of key positions of a paged KV
// cache. The cache is described without vLLM: per layer a K and a V region
// [num_blocks, num_kv_heads, block_size * head_size] and offset tables [block_size, head_size]
// telling where element (t, d) of a block lives in its region. Position p lives in block
// block_table[r, p / B], slot p % B. Layouts with fast paths: K "plain" (offset t * hs + d) or
// "transposed" (d * B + t, vLLM's CPU K for isa=vec), V plain; anything else goes through the
// offset tables element by element.
//
// Work item = (request, KV head); every query head of the KV head (GQA group) shares each K/V
// load. The AVX-512 path (built with -march=native on such a machine) reads K of dense
// 16-slot windows whole and the other kept keys one by one (see qk_fast), V of kept keys only;
// mass = mean over heads of the probabilities, summed in head order like the reference.
//
// Key copy (optional, per request): an exact token-major copy of K for some of the keys,
// [num_kv_heads, rows, head_size]; key j with copy row c >= 0 reads its K there (one
// contiguous row) instead of from the paged region. vLLM's transposed CPU K puts 16 slots
// in a cache line per head dim, so a scattered keep set reads nearly every line; through
// the copy it reads only its own rows (DESIGN.md §4.3, "key copy").
// Torch reference: vllm_tokenzoom/ops/paged_attention_ref.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TZ_AVX512 1
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Layout : int64_t { kGeneric = 0, kPlain = 1, kTransposed = 2 };

struct Shape {
  int64_t num_q_heads, num_kv_heads, head_size, block_size, group;
  int64_t block_stride, head_stride;  // of the regions, in elements (the last dim is contiguous)
};

// x[j] = exp(x[j] - shift) for n floats, returns their sum: exp(v) = 2^k * e^r,
// k = round(v / ln 2), |r| <= ln(2) / 2, e^r by its degree-7 Taylor polynomial (relative
// error < 1e-8, below fp32's 6e-8). v below -87.3 (incl. -inf) gives 0.
inline float exp_poly(float r) {
  return 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r * (1.f / 5040)))))));
}
#ifdef TZ_AVX512
inline float exp_sum_inplace(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift), lo = _mm512_set1_ps(-87.3f);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), sh);
    const __m512 vc = _mm512_max_ps(v, lo);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(vc, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), vc);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    const __mmask16 live = m & _mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ);  // below -87.3, -inf, tail: 0
    const __m512 e = _mm512_maskz_scalef_ps(live, p, k);
    _mm512_mask_storeu_ps(x + j, m, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}
#else
inline float exp_sum_inplace(float* x, int64_t n, float shift) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const float v = std::max(x[j] - shift, -87.3f);
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = (v - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const float e = (x[j] - shift) < -87.3f ? 0.f : exp_poly(r) * scale;
    x[j] = e;
    total += e;
  }
  return total;
}
#endif

// x[j] = x[j] * scale + bias[j] (bias may be null); returns the max.
inline float scale_bias_max(float* x, int64_t n, float scale, const float* bias) {
#ifdef TZ_AVX512
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), sc);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(x + j, m, v);
    mx = _mm512_mask_max_ps(mx, m, mx, v);
  }
  return _mm512_reduce_max_ps(mx);
#else
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    x[j] = x[j] * scale + (bias ? bias[j] : 0.f);
    mx = std::max(mx, x[j]);
  }
  return mx;
#endif
}

// Per work item: key j of the request is slot[j] of the block at element offset base[j]
// (= physical block * block_stride + kv_head * head_stride) in the regions.
// crow[j] >= 0: key j's K is row crow[j] of the key copy (crow null: no copy).
struct Keys {
  const int32_t* slot;
  const int64_t* base;
  int64_t n;
  const int32_t* crow;
};

// ---- generic path: any layout, any ISA ----------------------------------------------------

// logits[g * n + j] = q_g . k_j for the `group` query heads starting at q ([group, hs]).
template <typename T>
void qk_generic(const float* q, int64_t group, const T* k_region, const int64_t* k_off, int64_t k_layout,
                const T* copy, const Keys& keys, const Shape& s, float* logits) {
  const int64_t hs = s.head_size, B = s.block_size, n = keys.n;
  for (int64_t j = 0; j < n; ++j) {
    const bool copied = keys.crow && keys.crow[j] >= 0;
    const T* base = copied ? copy + int64_t(keys.crow[j]) * hs : k_region + keys.base[j];
    const int64_t t = copied ? 0 : keys.slot[j];
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * hs;
      float dot = 0.f;
      if (copied || k_layout == kPlain) {
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(base[t * hs + d]);
      } else if (k_layout == kTransposed) {
        for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(base[d * B + t]);
      } else {
        const int64_t* offs = k_off + t * hs;
        for (int64_t d = 0; d < hs; ++d) dot += qg[d] * static_cast<float>(base[offs[d]]);
      }
      logits[g * n + j] = dot;
    }
  }
}

// o[g * hs + d] = sum_j p[g * n + j] * v_j[d] for the `group` heads.
template <typename T>
void pv_generic(const float* p, int64_t group, const T* v_region, const int64_t* v_off, int64_t v_layout,
                const Keys& keys, const Shape& s, float* o) {
  const int64_t hs = s.head_size, n = keys.n;
  std::fill(o, o + group * hs, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const T* base = v_region + keys.base[j];
    const int64_t t = keys.slot[j];
    for (int64_t g = 0; g < group; ++g) {
      const float pj = p[g * n + j];
      float* og = o + g * hs;
      if (v_layout == kPlain) {
#pragma omp simd
        for (int64_t d = 0; d < hs; ++d) og[d] += pj * static_cast<float>(base[t * hs + d]);
      } else {
        const int64_t* offs = v_off + t * hs;
        for (int64_t d = 0; d < hs; ++d) og[d] += pj * static_cast<float>(base[offs[d]]);
      }
    }
  }
}

#ifdef TZ_AVX512
// ---- AVX-512 path: transposed K, plain V, head size a multiple of 16 ------------------------

// 16 (masked) consecutive elements as floats (others 0).
template <typename T>
inline __m512 load16(const T* x, __mmask16 m) {  // any other type (double): element by element
  alignas(64) float f[16] = {0.f};
  for (int l = 0; l < 16; ++l)
    if (m >> l & 1) f[l] = static_cast<float>(x[l]);
  return _mm512_load_ps(f);
}
inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 load16(const c10::BFloat16* x, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* x, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x)); }

// Gathers are slow (~40 cycles for 16 lanes on the EPYC this was tuned on), so K
// (transposed: [hs, B] per block and head) is read in two ways:
// - a window of 16 consecutive slots holding >= kDenseWindow kept keys: all 16 slots by plain
//   loads (each K vector feeds every head, 16 keys per FMA), the kept ones picked;
// - the other keys 8 at a time, the query heads in the lanes (qt [hs, 8] = q transposed):
//   one broadcast K element per FMA.
constexpr int kDenseWindow = 5;

// Scattered keys are read from memory at random: their rows are prefetched this many keys
// ahead (a key's K row in the copy, its V row), so the loads overlap instead of queueing.
constexpr int64_t kPrefetch = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t hs) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < hs * int64_t(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// out[g * ld + i] = q_g . k_(t0 + i) for the 16 slots of a window (K element (t0 + i, d) at
// col[d * B + i]).
template <int HT, typename T>
inline void qk_window(const float* q, int64_t hs, const T* col, int64_t B, float* out, int64_t ld) {
  __m512 acc[HT];
  for (int g = 0; g < HT; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hs; ++d) {
    const __m512 k = load16(col + d * B, 0xFFFF);
    for (int g = 0; g < HT; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * hs + d]), k, acc[g]);
  }
  for (int g = 0; g < HT; ++g) _mm512_storeu_ps(out + g * ld, acc[g]);
}

// logits[g * n + j] = q_g . k_j for the cnt <= 8 keys j = idx[i], K element d of key j at
// col[i][d * B] (B: the stride between a key's dims; 1 in the key copy); qt [hs, 8].
template <int HT, typename T>
inline void qk_keys8(const float* qt, int64_t hs, const T* const* col, int cnt, int64_t B, const int64_t* idx,
                     int64_t n, float* logits) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hs; ++d) {
    const __m256 qd = _mm256_loadu_ps(qt + d * 8);
    for (int i = 0; i < 8; ++i)
      acc[i] = _mm256_fmadd_ps(qd, _mm256_set1_ps(static_cast<float>(col[i][d * B])), acc[i]);
  }
  alignas(32) float lanes[8];
  for (int i = 0; i < cnt; ++i) {
    _mm256_store_ps(lanes, acc[i]);
    for (int g = 0; g < HT; ++g) logits[g * n + idx[i]] = lanes[g];
  }
}

// Logits of HT query heads over every key.
template <int HT, typename T>
void qk_fast(const float* q, const T* k_region, const T* copy, const Keys& keys, const Shape& s, float* logits) {
  const int64_t n = keys.n, hs = s.head_size, B = s.block_size;
  std::vector<float> qt(hs * 8, 0.f);  // [hs, 8]
  for (int g = 0; g < HT; ++g)
    for (int64_t d = 0; d < hs; ++d) qt[d * 8 + g] = q[g * hs + d];
  alignas(64) float tmp[HT * 16];
  const T* col[8];  // pending keys of the paged region (dims B apart)
  int64_t idx[8];
  int cnt = 0;
  const T* ccol[8];  // pending keys of the key copy (dims adjacent)
  int64_t cidx[8];
  int ccnt = 0;
  auto copied = [&](int64_t j) { return keys.crow && keys.crow[j] >= 0; };
  int64_t j0 = 0;
  while (j0 < n) {  // keys are ascending: window by window (16 slots of one block)
    if (copied(j0)) {
      if (j0 + kPrefetch < n && copied(j0 + kPrefetch)) prefetch_row(copy + int64_t(keys.crow[j0 + kPrefetch]) * hs, hs);
      ccol[ccnt] = copy + int64_t(keys.crow[j0]) * hs;
      cidx[ccnt++] = j0++;
      if (ccnt == 8) {
        qk_keys8<HT>(qt.data(), hs, ccol, ccnt, 1, cidx, n, logits);
        ccnt = 0;
      }
      continue;
    }
    const int64_t w = keys.slot[j0] / 16;
    int64_t j1 = j0 + 1;
    while (j1 < n && !copied(j1) && keys.base[j1] == keys.base[j0] && keys.slot[j1] / 16 == w) ++j1;
    const T* block = k_region + keys.base[j0];
    if (j1 - j0 == 16) {  // every slot of the window kept: straight into the logits
      qk_window<HT>(q, hs, block + w * 16, B, logits + j0, n);
    } else if (j1 - j0 >= kDenseWindow && (w + 1) * 16 <= B) {
      qk_window<HT>(q, hs, block + w * 16, B, tmp, 16);
      for (int64_t j = j0; j < j1; ++j)
        for (int g = 0; g < HT; ++g) logits[g * n + j] = tmp[g * 16 + keys.slot[j] - w * 16];
    } else {
      for (int64_t j = j0; j < j1; ++j) {
        col[cnt] = block + keys.slot[j];
        idx[cnt++] = j;
        if (cnt == 8) {
          qk_keys8<HT>(qt.data(), hs, col, cnt, B, idx, n, logits);
          cnt = 0;
        }
      }
    }
    j0 = j1;
  }
  if (cnt) {
    for (int i = cnt; i < 8; ++i) col[i] = col[0];  // padding lanes: computed, not stored
    qk_keys8<HT>(qt.data(), hs, col, cnt, B, idx, n, logits);
  }
  if (ccnt) {
    for (int i = ccnt; i < 8; ++i) ccol[i] = ccol[0];
    qk_keys8<HT>(qt.data(), hs, ccol, ccnt, 1, cidx, n, logits);
  }
}

// o[g * hs + d] = sum_j p[g * n + j] * v_j[d] (g < HT), V plain: 32 (or 16) dims at a time
// so the HT x 2 accumulators stay in registers.
template <int HT, typename T>
void pv_fast(const float* p, const T* v_region, const Keys& keys, const Shape& s, float* o) {
  const int64_t hs = s.head_size, n = keys.n;
  for (int64_t d0 = 0; d0 < hs; d0 += 32) {
    const bool two = d0 + 32 <= hs;
    __m512 acc[HT][2];
    for (int g = 0; g < HT; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      if (d0 == 0 && j + kPrefetch < n) prefetch_row(v_region + keys.base[j + kPrefetch] + keys.slot[j + kPrefetch] * hs, hs);
      const T* row = v_region + keys.base[j] + keys.slot[j] * hs + d0;
      const __m512 v0 = load16(row, 0xFFFF);
      const __m512 v1 = two ? load16(row + 16, 0xFFFF) : _mm512_setzero_ps();
      for (int g = 0; g < HT; ++g) {
        const __m512 pj = _mm512_set1_ps(p[g * n + j]);
        acc[g][0] = _mm512_fmadd_ps(pj, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(pj, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < HT; ++g) {
      _mm512_storeu_ps(o + g * hs + d0, acc[g][0]);
      if (two) _mm512_storeu_ps(o + g * hs + d0 + 16, acc[g][1]);
    }
  }
}

// CALL(HT) with HT = ht (1..8) as a compile-time constant.
#define TZ_WITH_TILE(ht, CALL)                                                                   \
  switch (ht) {                                                                                  \
    case 1: CALL(1); break;                                                                      \
    case 2: CALL(2); break;                                                                      \
    case 3: CALL(3); break;                                                                      \
    case 4: CALL(4); break;                                                                      \
    case 5: CALL(5); break;                                                                      \
    case 6: CALL(6); break;                                                                      \
    case 7: CALL(7); break;                                                                      \
    default: CALL(8); break;                                                                     \
  }
#endif

constexpr int64_t kTile = 8;  // query heads handled in one pass of the fast path

// One (request, KV head): q [group, hs] f32 -> o [group, hs] f32, and when probs is not null
// the probabilities of the group's heads, probs [group, n]. logits: scratch [group, n].
template <typename T>
void attend(const float* q, const T* k_region, const T* v_region, const int64_t* k_off, const int64_t* v_off,
            int64_t k_layout, int64_t v_layout, const T* copy, const Keys& keys, const float* bias, const Shape& s, float scale,
            float* logits, float* o, float* probs) {
  const int64_t n = keys.n, hs = s.head_size, G = s.group;
  bool fast_k = false, fast_v = false;
#ifdef TZ_AVX512
  fast_k = k_layout == kTransposed && hs % 16 == 0;
  fast_v = v_layout == kPlain && hs % 16 == 0;
#endif
  if (fast_k) {
#ifdef TZ_AVX512
    for (int64_t g0 = 0; g0 < G; g0 += kTile) {
#define TZ_QK(HT) qk_fast<HT>(q + g0 * hs, k_region, copy, keys, s, logits + g0 * n)
      TZ_WITH_TILE(std::min(kTile, G - g0), TZ_QK)
#undef TZ_QK
    }
#endif
  } else {
    qk_generic(q, G, k_region, k_off, k_layout, copy, keys, s, logits);
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax per query head
    float* lg = logits + g * n;
    const float max_logit = scale_bias_max(lg, n, scale, bias);
    const float inv = 1.f / exp_sum_inplace(lg, n, max_logit);  // a bias of -inf (m = 0) gives 0
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) lg[j] *= inv;  // normalised: the same rounding as the reference's softmax
    if (probs) std::memcpy(probs + g * n, lg, n * sizeof(float));
  }
  if (fast_v) {
#ifdef TZ_AVX512
    for (int64_t g0 = 0; g0 < G; g0 += kTile) {
#define TZ_PV(HT) pv_fast<HT>(logits + g0 * n, v_region, keys, s, o + g0 * hs)
      TZ_WITH_TILE(std::min(kTile, G - g0), TZ_PV)
#undef TZ_PV
    }
#endif
  } else {
    pv_generic(logits, G, v_region, v_off, v_layout, keys, s, o);
  }
}

// query [R, Hq, hs]; k_region, v_region [nb, Hkv, B*hs] (views of the cache, read in place);
// k_offsets, v_offsets [B, hs] int64 with their layouts (0 generic, 1 plain, 2 transposed;
// V: 0 or 1); block_table [R, max_blocks] (or [max_blocks] when R = 1), int32 read in place; keys: R tensors [n_r] int32, ascending;
// bias: R tensors [n_r] float32 (or empty: no bias); key_copies: R tensors [Hkv, rows_r, hs] of
// the regions' dtype, contiguous, and copy_rows: R tensors [n_r] int32 (-1: read the region),
// or empty (no copy); out [R, Hq, hs] (any float dtype) is written. -> R tensors mass [1, n_r] f32 (head-averaged probabilities) if want_mass, else none.
std::vector<torch::Tensor> indexed_decode_attention(torch::Tensor query, torch::Tensor k_region,
                                                    torch::Tensor v_region, torch::Tensor k_offsets,
                                                    torch::Tensor v_offsets, int64_t k_layout, int64_t v_layout,
                                                    torch::Tensor block_table, std::vector<torch::Tensor> keys,
                                                    std::vector<torch::Tensor> bias,
                                                    std::vector<torch::Tensor> key_copies,
                                                    std::vector<torch::Tensor> copy_rows, double scale,
                                                    torch::Tensor out, bool want_mass) {
  TORCH_CHECK(query.dim() == 3, "query must be [R, num_q_heads, head_size]");
  TORCH_CHECK(k_region.dim() == 3 && v_region.sizes() == k_region.sizes(), "regions must be [nb, Hkv, B*hs]");
  TORCH_CHECK(k_offsets.dim() == 2 && v_offsets.sizes() == k_offsets.sizes(), "offsets must be [B, hs]");
  TORCH_CHECK(k_layout >= 0 && k_layout <= 2 && v_layout >= 0 && v_layout <= 1, "unknown layout");
  const int64_t R = query.size(0);
  if (block_table.dim() == 1) block_table = block_table.unsqueeze(0);  // one request: its row
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == R, "block_table must be [R, max_blocks]");
  TORCH_CHECK(int64_t(keys.size()) == R && int64_t(bias.size()) == R && int64_t(key_copies.size()) == R &&
              int64_t(copy_rows.size()) == R, "one key list, bias, key copy and copy-row list per request");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must be shaped like query");
  Shape s;
  s.num_q_heads = query.size(1);
  s.head_size = query.size(2);
  s.num_kv_heads = k_region.size(1);
  s.block_size = k_offsets.size(0);
  TORCH_CHECK(k_offsets.size(1) == s.head_size && k_region.size(2) == s.block_size * s.head_size, "head size mismatch");
  TORCH_CHECK(s.num_q_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  s.group = s.num_q_heads / s.num_kv_heads;
  TORCH_CHECK(k_region.stride(2) == 1 && v_region.stride(2) == 1 && k_region.strides() == v_region.strides(),
              "regions must be contiguous in their last dim and share strides");
  s.block_stride = k_region.stride(0);
  s.head_stride = k_region.stride(1);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(keys[r].scalar_type() == torch::kInt32 && keys[r].is_contiguous() && keys[r].numel() > 0,
                "keys must be non-empty contiguous int32");
    TORCH_CHECK(bias[r].numel() == 0 || (bias[r].numel() == keys[r].numel() && bias[r].scalar_type() == torch::kFloat32
                                         && bias[r].is_contiguous()), "bias must be f32 with one entry per key");
    if (copy_rows[r].numel() == 0) continue;
    const auto& c = key_copies[r];
    TORCH_CHECK(c.dim() == 3 && c.size(0) == s.num_kv_heads && c.size(2) == s.head_size && c.is_contiguous()
                && c.scalar_type() == k_region.scalar_type(), "key copy must be a contiguous [Hkv, rows, hs] of the cache's dtype");
    TORCH_CHECK(copy_rows[r].scalar_type() == torch::kInt32 && copy_rows[r].is_contiguous()
                && copy_rows[r].numel() == keys[r].numel(), "copy_rows must be int32 with one entry per key");
    const int32_t* cr = copy_rows[r].data_ptr<int32_t>();
    for (int64_t j = 0; j < keys[r].numel(); ++j)
      TORCH_CHECK(cr[j] < c.size(1), "copy row ", cr[j], " is outside the key copy (", c.size(1), " rows)");
  }
  auto q = query.to(torch::kFloat32).contiguous();
  auto table = block_table.to(torch::kInt32).contiguous();
  auto k_off = k_offsets.to(torch::kInt64).contiguous();
  auto v_off = v_offsets.to(torch::kInt64).contiguous();
  const bool direct = out.scalar_type() == torch::kFloat32 && out.is_contiguous();
  auto o = direct ? out : torch::empty(query.sizes(), torch::kFloat32);
  const int64_t H = s.num_kv_heads, hs = s.head_size, G = s.group, B = s.block_size;
  // probabilities per request, [Hq, n_r], when the mass is asked for
  std::vector<torch::Tensor> probs;
  if (want_mass)
    for (int64_t r = 0; r < R; ++r) probs.push_back(torch::empty({s.num_q_heads, keys[r].numel()}, torch::kFloat32));
  int64_t work = 0;
  for (int64_t r = 0; r < R; ++r) work += keys[r].numel();
  const int shift = (B & (B - 1)) == 0 ? __builtin_ctzll(B) : -1;
  const int64_t* ko = k_off.data_ptr<int64_t>();
  const int64_t* vo = v_off.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_region.scalar_type(), "indexed_decode_attention", [&] {
    const scalar_t* kr = k_region.data_ptr<scalar_t>();
    const scalar_t* vr = v_region.data_ptr<scalar_t>();
    auto body = [&](int64_t begin, int64_t end) {
      std::vector<int32_t> slot;
      std::vector<int64_t> base;
      std::vector<float> logits;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / H, h = item % H;
        const int64_t n = keys[r].numel();
        const int32_t* pos = keys[r].data_ptr<int32_t>();
        const int32_t* row = table.data_ptr<int32_t>() + r * table.stride(0);
        slot.resize(n);
        base.resize(n);
        logits.resize(G * n);
        const int64_t head_off = h * s.head_stride;
        if (shift >= 0) {  // a power-of-two block size: no integer division (~20 cycles each)
          for (int64_t j = 0; j < n; ++j) {
            slot[j] = pos[j] & (B - 1);
            base[j] = row[pos[j] >> shift] * s.block_stride + head_off;
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            slot[j] = pos[j] % B;
            base[j] = row[pos[j] / B] * s.block_stride + head_off;
          }
        }
        const bool has_copy = copy_rows[r].numel() > 0;
        const Keys ks{slot.data(), base.data(), n, has_copy ? copy_rows[r].data_ptr<int32_t>() : nullptr};
        const scalar_t* copy =
            has_copy ? key_copies[r].data_ptr<scalar_t>() + h * key_copies[r].size(1) * hs : nullptr;
        attend<scalar_t>(q.data_ptr<float>() + (r * s.num_q_heads + h * G) * hs, kr, vr, ko, vo, k_layout, v_layout,
                         copy, ks, bias[r].numel() ? bias[r].data_ptr<float>() : nullptr, s, static_cast<float>(scale),
                         logits.data(), o.data_ptr<float>() + (r * s.num_q_heads + h * G) * hs,
                         want_mass ? probs[r].data_ptr<float>() + h * G * n : nullptr);
      }
    };
    // small calls run on this thread: a parallel region costs more than it saves
    if (work * H * G * hs < (1 << 16)) body(0, R * H);
    else at::parallel_for(0, R * H, 1, body);
  });
  if (!direct) out.copy_(o);
  std::vector<torch::Tensor> mass;
  for (int64_t r = 0; r < int64_t(probs.size()); ++r) {  // mean over heads, in head order (as torch's mean)
    const int64_t n = keys[r].numel();
    float* p = probs[r].data_ptr<float>();
    for (int64_t h = 1; h < s.num_q_heads; ++h)
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) p[j] += p[h * n + j];
    const float heads = static_cast<float>(s.num_q_heads);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[j] /= heads;
    mass.push_back(probs[r].narrow(0, 0, 1));  // [1, n]: row 0 holds the mean
  }
  return mass;
}

// Which of the two code paths this build compiled (tests check each against the reference).
std::string simd_path() {
#ifdef TZ_AVX512
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("indexed_decode_attention", &indexed_decode_attention,
        "Indexed paged decode attention over R requests with a per-key logit bias; writes out, returns the "
        "head-averaged key mass per request when asked");
  m.def("simd_path", &simd_path, "'avx512' or 'portable': the code path this build compiled");
}
