// How fast fp32 AVX2 FMA kernels multiply a few rows by weights streamed from DRAM, per weight layout
// (the question behind the decode step's distance to its floors; docs/experiments.md).
//
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/weight_stream.cpp -o /tmp/weight_stream
//   OMP_NUM_THREADS=1 /tmp/weight_stream            # rows 5 and 10, 368 MB of weights
//   OMP_NUM_THREADS=1 /tmp/weight_stream --quick    # 2 MB of weights: the numerics check only
//
// y [M, N] = x [M, K] W^T for K = 768, three ways:
//   rows_3x4      small_linear's register tile (kernels/cpu/small_linear.cpp, without its K chunks and
//                 next-block prefetch, so the three differ in layout only): W in nn.Linear's layout [N, K],
//                 dot products in 3-row x 4-output tiles, the 8 lanes summed at the end (4 row streams);
//                 the op itself is timed by generation_speed.py;
//   packed_dot    the same tiles and summation order, W repacked as [N/4][K/8][4][8] (one stream), the
//                 next kilobyte prefetched into L1;
//   packed_outer  W repacked as panels [N/16][K][16]: for each k, x[m, k] broadcast times 16 outputs,
//                 5-row x 2-vector tiles (one stream, no lane sums).
// Each runs on weights far larger than the caches ("stream") and on 180 KB of weights ("hot"), and is
// checked against a float64 product first. The FMA peak is 10 independent FMA chains on registers.
// Output: a Markdown table, then one JSON line per kernel and row count.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr long K = 768;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

float lane_sum(__m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  float s = 0.0f;
  for (float x : f) s += x;
  return s;
}

// small_linear's tile: rows [m, m + R) x outputs [n, n + 4), dot products over K in 8 lanes. The weights
// are W's rows at stride K (Packed false), or one block of 4 outputs in the layout [K/8][4][8] (Packed
// true), whose next kilobyte is prefetched into L1 when `prefetch`.
template <int R, bool Packed>
void dot_tile(const float* x, const float* w, float* y, long N, bool prefetch) {
  __m256 a[R][4];
  for (auto& r : a)
    for (auto& c : r) c = _mm256_setzero_ps();
  for (long k = 0; k < K; k += 8) {
    const float* wk = Packed ? w + k * 4 : w + k;  // the 8 weights of output c: wk + c * (Packed ? 8 : K)
    if (Packed && prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(wk) + 1024, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wk) + 1088, _MM_HINT_T0);
    }
    __m256 wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = _mm256_loadu_ps(wk + c * (Packed ? 8 : K));
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < 4; ++c) a[r][c] = _mm256_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) y[r * N + c] = lane_sum(a[r][c]);
}

// Rows [m, m + R) x the 16 outputs of one panel [K][16].
template <int R>
void outer_tile(const float* x, const float* panel, float* y, long N) {
  __m256 a[R][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_ps();
  for (long k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * K + k);
      a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * N, a[r][0]);
    _mm256_storeu_ps(y + r * N + 8, a[r][1]);
  }
}

// Row tiles of `Big` rows, then one tile of the rest (1 <= rest < Big), for `tile<R>(row offset, ...)`.
template <int Big, typename F>
void by_rows(long M, F&& tile) {
  long m = 0;
  for (; m + Big <= M; m += Big) tile(std::integral_constant<int, Big>{}, m);
  switch (M - m) {
    case 4: tile(std::integral_constant<int, 4>{}, m); break;
    case 3: tile(std::integral_constant<int, 3>{}, m); break;
    case 2: tile(std::integral_constant<int, 2>{}, m); break;
    case 1: tile(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

struct Weights {
  std::vector<float> rows, dot, outer;  // [N, K]; [N/4][K/8][4][8]; [N/16][K][16]
};

Weights make_weights(long N) {
  Weights w;
  w.rows.resize(N * K);
  for (long i = 0; i < N * K; ++i) w.rows[i] = static_cast<float>(std::rand()) / RAND_MAX - 0.5f;
  w.dot.resize(N * K);
  w.outer.resize(N * K);
  for (long n = 0; n < N; ++n)
    for (long k = 0; k < K; ++k) {
      const float v = w.rows[n * K + k];
      w.dot[(n / 4) * 4 * K + (k / 8) * 32 + (n % 4) * 8 + k % 8] = v;
      w.outer[(n / 16) * 16 * K + k * 16 + n % 16] = v;
    }
  return w;
}

void run(const char* kernel, const Weights& w, const float* x, float* y, long M, long N) {
  const bool rows = !std::strcmp(kernel, "rows_3x4"), dot = !std::strcmp(kernel, "packed_dot");
#pragma omp parallel for schedule(static)
  for (long n = 0; n < N; n += 16) {  // 16 outputs: 4 blocks of 4, or one panel
    if (rows || dot) {
      for (long c = n; c < n + 16; c += 4) {
        by_rows<3>(M, [&](auto R, long m) {
          if (rows) dot_tile<decltype(R)::value, false>(x + m * K, w.rows.data() + c * K, y + m * N + c, N, false);
          else dot_tile<decltype(R)::value, true>(x + m * K, w.dot.data() + c * K, y + m * N + c, N, m == 0);
        });
      }
    } else {
      by_rows<5>(M, [&](auto R, long m) {
        outer_tile<decltype(R)::value>(x + m * K, w.outer.data() + n * K, y + m * N + n, N);
      });
    }
  }
}

double fma_peak_gflops() {
  __m256 a[10];
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(0.001f * i);
  const __m256 m = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(0.0001f);
  const long iters = 50000000;
  const double t0 = now();
  for (long i = 0; i < iters; ++i)
    for (auto& v : a) v = _mm256_fmadd_ps(v, m, c);
  const double t = now() - t0;
  __m256 sum = a[0];
  for (int i = 1; i < 10; ++i) sum = _mm256_add_ps(sum, a[i]);  // every chain is used: none is dropped
  volatile float sink = lane_sum(sum);
  (void)sink;
  return iters * 10.0 * 16 / t / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && !std::strcmp(argv[1], "--quick");
  const long stream_n = quick ? 640 : 120000, hot_n = 64;  // 368 MB / 2 MB; 196 KB
  const char* kernels[] = {"rows_3x4", "packed_dot", "packed_outer"};
  const Weights big = make_weights(stream_n), small = make_weights(hot_n);
  std::printf("threads %d, FMA peak %.1f GFLOP/s per thread\n\n", omp_get_max_threads(), fma_peak_gflops());
  std::printf("| kernel | rows | stream GFLOP/s | stream GB/s | hot GFLOP/s |\n|---|---|---|---|---|\n");
  std::vector<std::string> json;
  for (long M : {5L, 10L}) {
    std::vector<float> x(M * K), y(M * stream_n);
    for (auto& v : x) v = static_cast<float>(std::rand()) / RAND_MAX - 0.5f;
    for (const char* kernel : kernels) {
      run(kernel, big, x.data(), y.data(), M, stream_n);  // numerics: against float64 on 640 outputs
      for (long m = 0; m < M; ++m)
        for (long n = 0; n < 640; ++n) {
          double ref = 0.0;
          for (long k = 0; k < K; ++k) ref += static_cast<double>(x[m * K + k]) * big.rows[n * K + k];
          if (std::fabs(y[m * stream_n + n] - ref) > 1e-4) {
            std::fprintf(stderr, "%s: y[%ld, %ld] = %g, float64 %g\n", kernel, m, n, y[m * stream_n + n], ref);
            return 1;
          }
        }
      double gflops[2];
      for (int hot = 0; hot < 2; ++hot) {
        const Weights& w = hot ? small : big;
        const long N = hot ? hot_n : stream_n, reps = quick ? 3 : std::max(1L, 1000000000L / (2 * M * N * K));
        std::vector<double> times;
        for (int t = 0; t < 5; ++t) {
          const double t0 = now();
          for (long r = 0; r < reps; ++r) run(kernel, w, x.data(), y.data(), M, N);
          times.push_back((now() - t0) / reps);
        }
        std::sort(times.begin(), times.end());
        gflops[hot] = 2.0 * M * N * K / times[2] / 1e9;
      }
      std::printf("| %s | %ld | %.1f | %.1f | %.1f |\n", kernel, M, gflops[0], gflops[0] * 2.0 / M, gflops[1]);
      char line[160];
      std::snprintf(line, sizeof line,
                    "{\"kernel\": \"%s\", \"rows\": %ld, \"stream_gflops\": %.2f, \"hot_gflops\": %.2f}", kernel,
                    M, gflops[0], gflops[1]);
      json.emplace_back(line);
    }
  }
  std::printf("\n");
  for (const std::string& line : json) std::printf("%s\n", line.c_str());
  return 0;
}
