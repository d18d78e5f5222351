// Fused top-k router: scores (softmax or sigmoid), top-k selection on the logits and the combine
// weights in one pass, one warp per token. Lane l holds experts l, l + 32, ... in registers.
//
// Semantics follow moerouter.TopK without capacity: selection ranks the (cleaned) logits, ties go
// to the lower expert index, slots are in descending order; a -inf logit is never routed to; a row
// holding NaN or +inf, or only -inf, is "non-finite": probabilities 0, every slot expert -1,
// weight 0, and its choices are the top-k of a row of zeros (experts 0 .. k-1), as on the
// reference path.
#include "common.cuh"

namespace moerouter {

constexpr int kScoreSoftmax = 0;
// Any other score value means sigmoid.

// kPerLane: experts per lane, so num_experts <= 32 * kPerLane. k <= 32 (lane j keeps slot j).
template <typename T, int kPerLane>
__global__ void topk_router(const T* __restrict__ logits, int num_tokens, int num_experts, int k,
                            int score, int normalize, int softmax_after_topk,
                            float* __restrict__ probs, int* __restrict__ expert_ids,
                            float* __restrict__ weights, int* __restrict__ choice_ids,
                            bool* __restrict__ finite_rows) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const long long token =
      static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (token >= num_tokens) {
    return;  // the whole warp leaves together: token is uniform across the warp
  }
  const T* row = logits + token * num_experts;

  float values[kPerLane];
  bool bad = false;
  bool above_neg_inf = false;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int expert = lane + 32 * i;
    values[i] = -INFINITY;
    if (expert < num_experts) {
      values[i] = to_float(row[expert]);
      bad = bad || isnan(values[i]) || values[i] == INFINITY;
      above_neg_inf = above_neg_inf || values[i] > -INFINITY;
    }
  }
  const bool finite = !__any_sync(kFullMask, bad) && __any_sync(kFullMask, above_neg_inf);
  if (!finite) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (lane + 32 * i < num_experts) {
        values[i] = 0.0f;  // a non-finite row is routed as zeros, then masked
      }
    }
  }

  float scores[kPerLane];
  if (score == kScoreSoftmax) {
    float row_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      row_max = fmaxf(row_max, values[i]);
    }
    row_max = warp_max(row_max);
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      scores[i] = lane + 32 * i < num_experts ? expf(values[i] - row_max) : 0.0f;
      total += scores[i];
    }
    total = warp_sum(total);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      scores[i] /= total;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      // moerouter's stable sigmoid (moerouter._numerics.sigmoid): expf never overflows.
      const float small = expf(-fabsf(values[i]));
      scores[i] = values[i] >= 0.0f ? 1.0f / (1.0f + small) : small / (1.0f + small);
    }
  }
  float* probs_row = probs + token * num_experts;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int expert = lane + 32 * i;
    if (expert < num_experts) {
      probs_row[expert] = finite ? scores[i] : 0.0f;
    }
  }

  // k rounds of warp argmax on the logits; lane j keeps the winner of round j.
  unsigned taken = 0u;
  int my_choice = 0;
  float my_logit = -INFINITY;
  float my_score = 0.0f;
  for (int slot = 0; slot < k; ++slot) {
    float best_value = -INFINITY;
    int best_expert = 0x7fffffff;
    float best_score = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int expert = lane + 32 * i;
      const bool free_slot = expert < num_experts && ((taken >> i) & 1u) == 0u;
      // Ascending experts within a lane: a strict '>' keeps the lower index on ties.
      if (free_slot && (best_expert == 0x7fffffff || values[i] > best_value)) {
        best_value = values[i];
        best_expert = expert;
        best_score = scores[i];
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other_value = __shfl_xor_sync(kFullMask, best_value, offset);
      const int other_expert = __shfl_xor_sync(kFullMask, best_expert, offset);
      const float other_score = __shfl_xor_sync(kFullMask, best_score, offset);
      if (other_value > best_value || (other_value == best_value && other_expert < best_expert)) {
        best_value = other_value;
        best_expert = other_expert;
        best_score = other_score;
      }
    }
    if ((best_expert & 31) == lane) {
      taken |= 1u << (best_expert >> 5);
    }
    if (lane == slot) {
      my_choice = best_expert;
      my_logit = best_value;
      my_score = best_score;
    }
  }

  const bool active = lane < k;
  const bool routed = active && finite && my_logit > -INFINITY;
  float weight;
  if (softmax_after_topk != 0 || (score == kScoreSoftmax && normalize != 0)) {
    float chosen_max = warp_max(routed ? my_logit : -INFINITY);
    chosen_max = chosen_max > -INFINITY ? chosen_max : 0.0f;
    const float numerator = routed ? expf(my_logit - chosen_max) : 0.0f;
    const float total = warp_sum(numerator);
    weight = numerator / (total > 0.0f ? total : 1.0f);
  } else {
    weight = active ? my_score : 0.0f;
    if (normalize != 0) {
      weight = routed ? weight : 0.0f;
      const float total = warp_sum(weight);
      weight = weight / (total > 0.0f ? total : 1.0f);
    }
  }
  if (active) {
    const long long out = token * k + lane;
    expert_ids[out] = routed ? my_choice : -1;
    weights[out] = routed ? weight : 0.0f;
    choice_ids[out] = my_choice;
  }
  if (lane == 0) {
    finite_rows[token] = finite;
  }
}

#define MOEROUTER_ROUTER(T, P)                                                               \
  template __global__ void topk_router<T, P>(const T*, int, int, int, int, int, int, float*, \
                                             int*, float*, int*, bool*);
#define MOEROUTER_ROUTER_ALL(P)      \
  MOEROUTER_ROUTER(float, P)         \
  MOEROUTER_ROUTER(__half, P)        \
  MOEROUTER_ROUTER(__nv_bfloat16, P)
MOEROUTER_ROUTER_ALL(1)
MOEROUTER_ROUTER_ALL(2)
MOEROUTER_ROUTER_ALL(4)
MOEROUTER_ROUTER_ALL(8)
MOEROUTER_ROUTER_ALL(16)

}  // namespace moerouter
