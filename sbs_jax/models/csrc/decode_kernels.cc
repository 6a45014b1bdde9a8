// The dots of a bf16 decoding step on AVX-512 BF16 CPUs, as XLA FFI handlers. Built and loaded
// by sbs_jax/models/cpu_kernels.py (see there for when they are used).
//
// SbsRowsMatmulBf16: y[M, N] (float32) = x[M, K] (bf16) @ W[K, N] (bf16) for a few rows M, with
// W laid out ahead of time as panels [N/32][K/2][32][2]: each 64-byte load holds 16 columns x 2
// consecutive k, the operand order of VDPBF16PS. One pass over the weights serves up to 8 rows.
// SbsAttentionScoresBf16 / SbsWeightedValuesBf16: one query per (batch, head) against cached
// cross-attention keys [B*H][D/2][Lp][2] (bf16 pairs along D, 16 keys per load) and values
// [B*H][L][D] (bf16, D a multiple of 16), softmax in XLA between them.
// Work is split over XLA's intra-op thread pool when it is large enough to pay for the wake-up.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // columns per panel: two zmm accumulators per row

template <int MR>
void PanelRows(const uint16_t* x, int64_t k, const uint16_t* panel, float* y, int64_t n,
               int64_t col0) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < k / 2; ++k2) {
    const uint16_t* w = panel + k2 * 2 * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * 2 * kBlock), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * 2 * kBlock + kBlock), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + kBlock);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      __builtin_memcpy(&pair, x + m * k + 2 * k2, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  const int64_t left = std::min<int64_t>(kBlock, n - col0);
  const __mmask16 lo = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  const __mmask16 hi = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(y + m * n + col0, lo, acc[m][0]);
    _mm512_mask_storeu_ps(y + m * n + col0 + 16, hi, acc[m][1]);
  }
}

using PanelFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t, int64_t);
constexpr PanelFn kPanelFns[9] = {nullptr, PanelRows<1>, PanelRows<2>, PanelRows<3>,
                                  PanelRows<4>, PanelRows<5>, PanelRows<6>, PanelRows<7>,
                                  PanelRows<8>};

// Panels [begin, end) for all rows, 8 rows per pass over each panel.
void Panels(const uint16_t* x, int64_t rows, int64_t k, const uint16_t* packed, float* y,
            int64_t n, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const uint16_t* panel = packed + p * k * kBlock;
    for (int64_t r = 0; r < rows; r += 8) {
      const int64_t mr = std::min<int64_t>(8, rows - r);
      kPanelFns[mr](x + r * k, k, panel, y + r * n, n, p * kBlock);
    }
  }
}

// Work shared with pool tasks: chunks of items are claimed from `next`; the caller returns once
// every chunk is done, so a task that starts late (or never) costs nothing.
struct Shared {
  std::function<void(int64_t, int64_t)> body;
  int64_t items, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(items, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many bytes read one thread is faster than waking another.
constexpr int64_t kSplitBytes = 1 << 18;

// body(begin, end) over items [0, items), on the pool's threads when `bytes` is large.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t bytes, F body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || items < 2 || bytes < kSplitBytes) {
    body(0, items);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->body = body;
  shared->items = items;
  shared->chunks = std::min<int64_t>(items, 4 * threads);
  shared->chunk = (items + shared->chunks - 1) / shared->chunks;
  shared->chunks = (items + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) _mm_pause();
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                      ffi::Buffer<ffi::BF16> packed, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() < 1 || pd.size() != 4 || yd.size() != xd.size() || pd[2] != kBlock ||
      pd[3] != 2) {
    return ffi::Error::InvalidArgument("rows_matmul: expected x [..., K], packed [P, K/2, 32, 2]"
                                       " and y [..., N]");
  }
  const int64_t k = xd.back();
  const int64_t n = yd.back();
  const int64_t panels = pd[0];
  if (pd[1] * 2 != k || (n + kBlock - 1) / kBlock != panels) {
    return ffi::Error::InvalidArgument("rows_matmul: packed kernel does not match x or y");
  }
  const int64_t rows = x.element_count() / k;
  auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  auto* wp = reinterpret_cast<const uint16_t*>(packed.typed_data());
  float* yp = y->typed_data();
  ParallelFor(pool, panels, packed.size_bytes(), [=](int64_t begin, int64_t end) {
    Panels(xp, rows, k, wp, yp, n, begin, end);
  });
  return ffi::Error::Success();
}

constexpr int64_t kKeyBlock = 128;  // keys per pass: 8 accumulators of 16

// scores[l] = q . keys[l] for one (batch, head): q [D] bf16, keys [D/2][Lp][2].
void Scores(const uint16_t* q, const uint16_t* keys, float* scores, int64_t half_d,
            int64_t length) {
  for (int64_t l0 = 0; l0 < length; l0 += kKeyBlock) {
    __m512 acc[8];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t j = 0; j < half_d; ++j) {
      int32_t pair;
      __builtin_memcpy(&pair, q + 2 * j, sizeof(pair));
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);
      const uint16_t* row = keys + (j * length + l0) * 2;
      for (int c = 0; c < 8; ++c) {
        acc[c] = _mm512_dpbf16_ps(acc[c], qb, (__m512bh)_mm512_loadu_si512(row + 32 * c));
      }
    }
    for (int c = 0; c < 8; ++c) _mm512_storeu_ps(scores + l0 + 16 * c, acc[c]);
  }
}

ffi::Error AttentionScores(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                           ffi::Buffer<ffi::BF16> keys, ffi::ResultBuffer<ffi::F32> scores) {
  const auto kd = keys.dimensions();
  const auto qd = q.dimensions();
  if (kd.size() != 5 || qd.size() != 3 || kd[4] != 2 || kd[3] % kKeyBlock != 0 ||
      qd[0] != kd[0] || qd[1] != kd[1] || qd[2] != 2 * kd[2]) {
    return ffi::Error::InvalidArgument("attention_scores: expected q [B, H, D] and keys "
                                       "[B, H, D/2, L (a multiple of 128), 2]");
  }
  const int64_t heads = kd[0] * kd[1], half_d = kd[2], length = kd[3];
  auto* qp = reinterpret_cast<const uint16_t*>(q.typed_data());
  auto* kp = reinterpret_cast<const uint16_t*>(keys.typed_data());
  float* sp = scores->typed_data();
  ParallelFor(pool, heads, keys.size_bytes(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Scores(qp + i * 2 * half_d, kp + i * half_d * length * 2, sp + i * length, half_d, length);
    }
  });
  return ffi::Error::Success();
}

// out[d] = sum_l w[l] values[l, d] for one (batch, head), D = 16 * ND, float32 sums.
template <int ND>
void WeightedValues(const float* w, const uint16_t* values, float* out, int64_t length) {
  __m512 even[ND], odd[ND];
  for (int i = 0; i < ND; ++i) even[i] = odd[i] = _mm512_setzero_ps();
  auto row = [&](int64_t l, __m512* acc) {
    const __m512 wl = _mm512_set1_ps(w[l]);
    for (int i = 0; i < ND; ++i) {
      const __m256i v = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(values + l * 16 * ND + 16 * i));
      acc[i] = _mm512_fmadd_ps(wl, _mm512_cvtpbh_ps((__m256bh)v), acc[i]);
    }
  };
  int64_t l = 0;
  for (; l + 1 < length; l += 2) {
    row(l, even);
    row(l + 1, odd);
  }
  if (l < length) row(l, even);
  for (int i = 0; i < ND; ++i) _mm512_storeu_ps(out + 16 * i, _mm512_add_ps(even[i], odd[i]));
}

using ValuesFn = void (*)(const float*, const uint16_t*, float*, int64_t);
constexpr ValuesFn kValuesFns[9] = {nullptr,            WeightedValues<1>, WeightedValues<2>,
                                    WeightedValues<3>, WeightedValues<4>, WeightedValues<5>,
                                    WeightedValues<6>, WeightedValues<7>, WeightedValues<8>};

ffi::Error WeightedValuesCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weights,
                              ffi::Buffer<ffi::BF16> values, ffi::ResultBuffer<ffi::F32> out) {
  const auto vd = values.dimensions();
  const auto wd = weights.dimensions();
  if (vd.size() != 4 || wd.size() != 3 || vd[3] % 16 != 0 || vd[3] > 16 * 8 ||
      wd[0] != vd[0] || wd[1] != vd[1] || wd[2] != vd[2]) {
    return ffi::Error::InvalidArgument("weighted_values: expected weights [B, H, L] and values "
                                       "[B, H, L, D] with D a multiple of 16, at most 128");
  }
  const int64_t heads = vd[0] * vd[1], length = vd[2], d = vd[3];
  const ValuesFn fn = kValuesFns[d / 16];
  const float* wp = weights.typed_data();
  auto* vp = reinterpret_cast<const uint16_t*>(values.typed_data());
  float* op = out->typed_data();
  ParallelFor(pool, heads, values.size_bytes(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(wp + i * length, vp + i * length * d, op + i * d, length);
  });
  return ffi::Error::Success();
}

}  // namespace

// (ctx, bf16 operand, bf16 operand) -> float32 result.
auto BindBf16Bf16() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SbsRowsMatmulBf16, RowsMatmul, BindBf16Bf16());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SbsAttentionScoresBf16, AttentionScores, BindBf16Bf16());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SbsWeightedValuesBf16, WeightedValuesCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
