// Combine: y[t] = sum over t's entries of w * ye[row], a token-major gather-reduce.
//
// Each token's sum runs in float32, in slot order, with explicitly rounded multiply and add
// (__fmul_rn, __fadd_rn: no fused multiply-add), which is exactly the reference path's
// arithmetic; no atomics, so the result is bit-identical run to run and independent of how
// other tokens were routed. kVec elements (16 bytes when kVec * sizeof(T) == 16) are loaded at
// once. A block handles blockDim.y tokens.
//
//   combine_padded  (T, F) rows with -1 padding: token-choice top-k (F = k)
//   combine_csr     indptr/rows/weights: variable fan-in (expert choice, null experts)
#include "common.cuh"

namespace moerouter {

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T values[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void accumulate(const T* __restrict__ ye, long long row, int features,
                                           int column, float weight, float (&total)[kVec]) {
  const Pack<T, kVec> pack =
      *reinterpret_cast<const Pack<T, kVec>*>(ye + row * features + column);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    total[e] = __fadd_rn(total[e], __fmul_rn(weight, to_float(pack.values[e])));
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* __restrict__ out, long long token, int features,
                                      int column, const float (&total)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    pack.values[e] = from_float<T>(total[e]);
  }
  *reinterpret_cast<Pack<T, kVec>*>(out + token * features + column) = pack;
}

template <int kVec>
__device__ __forceinline__ void zero(float (&total)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    total[e] = 0.0f;
  }
}

template <typename T, int kVec>
__global__ void combine_padded(const T* __restrict__ ye, const int* __restrict__ combine_rows,
                               const float* __restrict__ combine_weights, int num_tokens,
                               int fan_in, int features, T* __restrict__ out) {
  const long long token = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) {
    return;
  }
  const int* rows = combine_rows + token * fan_in;
  const float* weights = combine_weights + token * fan_in;
  for (int column = static_cast<int>(threadIdx.x) * kVec; column < features;
       column += static_cast<int>(blockDim.x) * kVec) {
    float total[kVec];
    zero<kVec>(total);
    for (int slot = 0; slot < fan_in; ++slot) {
      const int row = rows[slot];
      if (row >= 0) {  // -1: no entry, contributes exactly nothing
        accumulate<T, kVec>(ye, row, features, column, weights[slot], total);
      }
    }
    store<T, kVec>(out, token, features, column, total);
  }
}

template <typename T, int kVec>
__global__ void combine_csr(const T* __restrict__ ye, const int* __restrict__ indptr,
                            const int* __restrict__ rows, const float* __restrict__ weights,
                            int num_tokens, int features, T* __restrict__ out) {
  const long long token = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) {
    return;
  }
  const int begin = indptr[token];
  const int end = indptr[token + 1];
  for (int column = static_cast<int>(threadIdx.x) * kVec; column < features;
       column += static_cast<int>(blockDim.x) * kVec) {
    float total[kVec];
    zero<kVec>(total);
    for (int entry = begin; entry < end; ++entry) {
      accumulate<T, kVec>(ye, rows[entry], features, column, weights[entry], total);
    }
    store<T, kVec>(out, token, features, column, total);
  }
}

#define MOEROUTER_COMBINE(T, V)                                                           \
  template __global__ void combine_padded<T, V>(const T*, const int*, const float*, int, \
                                                int, int, T*);                            \
  template __global__ void combine_csr<T, V>(const T*, const int*, const int*, const float*, \
                                             int, int, T*);
// 16-byte vectors, and one element at a time for rows whose size is not a multiple of 16 bytes.
MOEROUTER_COMBINE(float, 4)
MOEROUTER_COMBINE(float, 1)
MOEROUTER_COMBINE(__half, 8)
MOEROUTER_COMBINE(__half, 1)
MOEROUTER_COMBINE(__nv_bfloat16, 8)
MOEROUTER_COMBINE(__nv_bfloat16, 1)

}  // namespace moerouter
