// Dispatch: out[i] = x[source_tokens[i]] for i < num_valid, zero after.
//
// Rows are moved as raw words: V is uint4 (16-byte vector loads and stores) whenever the row
// size and both base pointers allow it, else a narrower word; the dtype never matters, so
// float32, float16 and bfloat16 share the kernel. A block handles blockDim.y rows, blockDim.x
// threads stride along each row.
#include "common.cuh"

namespace moerouter {

template <typename V>
__global__ void dispatch_rows(const V* __restrict__ x, const int* __restrict__ source_tokens,
                              const int* __restrict__ num_valid, int num_rows, int row_words,
                              V* __restrict__ out) {
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= num_rows) {
    return;
  }
  V* destination = out + row * row_words;
  if (row < *num_valid) {
    const V* source = x + static_cast<long long>(source_tokens[row]) * row_words;
    for (int word = static_cast<int>(threadIdx.x); word < row_words; word += blockDim.x) {
      destination[word] = __ldg(source + word);
    }
  } else {
    const V zero{};
    for (int word = static_cast<int>(threadIdx.x); word < row_words; word += blockDim.x) {
      destination[word] = zero;
    }
  }
}

template __global__ void dispatch_rows<uint4>(const uint4*, const int*, const int*, int, int,
                                              uint4*);
template __global__ void dispatch_rows<unsigned int>(const unsigned int*, const int*, const int*,
                                                     int, int, unsigned int*);
template __global__ void dispatch_rows<unsigned short>(const unsigned short*, const int*,
                                                       const int*, int, int, unsigned short*);

}  // namespace moerouter
