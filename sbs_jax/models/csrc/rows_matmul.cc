// y[M, N] (float32) = x[M, K] (bfloat16) @ W[K, N] (bfloat16) for a few rows M, with W laid out
// ahead of time as bf16 panels [N/32][K/2][32][2]: each 64-byte load holds 16 columns x 2
// consecutive k, the operand order of AVX-512 BF16's VDPBF16PS. One pass over the weights
// serves up to 8 rows; columns are split over XLA's intra-op thread pool for large weights.
// Built and loaded by sbs_jax/models/cpu_kernels.py (see there for when it is used).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
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

// Work shared with pool tasks: chunks of panels are claimed from `next`; the caller returns
// once every chunk is done, so a task that starts late (or never) costs nothing.
struct Shared {
  const uint16_t* x;
  int64_t rows, k, n, panels, chunk, chunks;
  const uint16_t* packed;
  float* y;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      Panels(x, rows, k, packed, y, n, c * chunk, std::min(panels, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many weight bytes one thread is faster than waking another.
constexpr int64_t kSplitBytes = 1 << 18;

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
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || panels < 2 || packed.size_bytes() < kSplitBytes) {
    Panels(xp, rows, k, wp, yp, n, 0, panels);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>();
  shared->x = xp;
  shared->rows = rows;
  shared->k = k;
  shared->n = n;
  shared->panels = panels;
  shared->packed = wp;
  shared->y = yp;
  shared->chunks = std::min<int64_t>(panels, 4 * threads);
  shared->chunk = (panels + shared->chunks - 1) / shared->chunks;
  shared->chunks = (panels + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SbsRowsMatmulBf16, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
