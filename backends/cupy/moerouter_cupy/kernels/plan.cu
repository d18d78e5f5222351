// Counting-sort plan: a stable sort of small integer keys in three launches, parallel over blocks.
//
//   count_keys     each block counts the keys of its chunk of kChunk assignments
//   scan_offsets   one block turns the per-block counts into each (block, key) start position
//   scatter_keys   each block walks its chunk in order (one warp, 32 at a time) and writes
//                  order[position] = assignment; equal keys keep assignment order (stable)
//
// The expert plan sorts key = expert (or num_experts for "no expert"), the expert layout's
// combine rows sort key = token. No comparison sort, no atomics whose order reaches the output.
#include "common.cuh"

namespace moerouter {

constexpr int kChunk = 1024;

__global__ void expert_sort_keys(const int* __restrict__ expert_ids, int count, int num_experts,
                                 int* __restrict__ keys) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    const int expert = expert_ids[i];
    keys[i] = expert >= 0 ? expert : num_experts;
  }
}

// block_counts: (num_blocks, num_bins), zeroed by the caller. Integer atomics on a row that only
// this block touches: the counts are exact whatever the order.
__global__ void count_keys(const int* __restrict__ keys, int count, int num_bins,
                           int* __restrict__ block_counts) {
  const long long begin = static_cast<long long>(blockIdx.x) * kChunk;
  const long long end = begin + kChunk < count ? begin + kChunk : count;
  int* counts = block_counts + static_cast<long long>(blockIdx.x) * num_bins;
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    atomicAdd(counts + keys[i], 1);
  }
}

// One block of 1024 threads. block_offsets (num_blocks, num_bins) receives where each block's
// run of each key starts; bin_starts (num_bins + 1) where each key's run starts overall.
__global__ void scan_offsets(const int* __restrict__ block_counts, int num_blocks, int num_bins,
                             int* __restrict__ block_offsets, int* __restrict__ bin_starts) {
  __shared__ int partial[1024];
  const int thread = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  // Each thread owns a contiguous range of bins.
  const int per_thread = (num_bins + threads - 1) / threads;
  const int first = thread * per_thread;
  const int last = first + per_thread < num_bins ? first + per_thread : num_bins;
  int local = 0;
  for (int bin = first; bin < last; ++bin) {
    int running = 0;
    for (int block = 0; block < num_blocks; ++block) {
      const long long at = static_cast<long long>(block) * num_bins + bin;
      block_offsets[at] = running;
      running += block_counts[at];
    }
    bin_starts[bin] = running;  // this bin's total for now
    local += running;
  }
  partial[thread] = local;
  __syncthreads();
  if (thread == 0) {  // 1024 additions: not worth a tree
    int sum = 0;
    for (int t = 0; t < threads; ++t) {
      const int value = partial[t];
      partial[t] = sum;
      sum += value;
    }
    bin_starts[num_bins] = sum;
  }
  __syncthreads();
  int start = partial[thread];
  for (int bin = first; bin < last; ++bin) {
    const int total = bin_starts[bin];
    bin_starts[bin] = start;
    for (int block = 0; block < num_blocks; ++block) {
      block_offsets[static_cast<long long>(block) * num_bins + bin] += start;
    }
    start += total;
  }
}

// One warp per block. cursor: a scratch copy of block_offsets, advanced as keys are placed.
__global__ void scatter_keys(const int* __restrict__ keys, int count, int num_bins,
                             int* __restrict__ cursor, int* __restrict__ order,
                             int* __restrict__ inverse) {
  const int lane = static_cast<int>(threadIdx.x);
  const long long begin = static_cast<long long>(blockIdx.x) * kChunk;
  const long long end = begin + kChunk < count ? begin + kChunk : count;
  int* next = cursor + static_cast<long long>(blockIdx.x) * num_bins;
  for (long long base = begin; base < end; base += 32) {
    const long long i = base + lane;
    const bool valid = i < end;
    const int key = valid ? keys[i] : -1;
    const unsigned peers = __match_any_sync(kFullMask, key);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int position = valid ? next[key] + rank : 0;
    __syncwarp();
    if (valid && rank == __popc(peers) - 1) {
      next[key] += __popc(peers);  // the group's last lane advances the cursor
    }
    __syncwarp();
    if (valid) {
      order[position] = static_cast<int>(i);
      if (inverse != nullptr) {
        inverse[i] = position;
      }
    }
  }
}

// Token layout: source_tokens, and combine rows/weights in assignment (= token-major) order.
__global__ void finish_plan(const int* __restrict__ order, const int* __restrict__ inverse,
                            const int* __restrict__ token_ids, const int* __restrict__ expert_ids,
                            const float* __restrict__ weights, int count,
                            int* __restrict__ source_tokens, int* __restrict__ masked_rows,
                            float* __restrict__ masked_weights) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    source_tokens[i] = token_ids[order[i]];
    const bool real = expert_ids[i] >= 0;
    masked_rows[i] = real ? inverse[i] : -1;
    masked_weights[i] = real ? weights[i] : 0.0f;
  }
}

// Expert layout: by_token is the stable token sort of the assignments, token_starts where each
// token's run begins. combine_rows / combine_weights are (num_tokens, fan_in), pre-filled with
// -1 and 0 by the caller.
__global__ void fill_token_major(const int* __restrict__ by_token,
                                 const int* __restrict__ token_ids,
                                 const int* __restrict__ token_starts,
                                 const int* __restrict__ masked_rows,
                                 const float* __restrict__ masked_weights, int count, int fan_in,
                                 int* __restrict__ combine_rows,
                                 float* __restrict__ combine_weights) {
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < count) {
    const int assignment = by_token[j];
    const int token = token_ids[assignment];
    const long long slot = j - token_starts[token];
    if (slot < fan_in) {
      const long long at = static_cast<long long>(token) * fan_in + slot;
      combine_rows[at] = masked_rows[assignment];
      combine_weights[at] = masked_weights[assignment];
    }
  }
}

}  // namespace moerouter
