// sample.cuh — a sampled token in one launch: temperature, top-k, top-p and the exponential race.
//
// For logits z [vocab] (fp32), temperature T > 0, top_k >= 0 and top_p in (0, 1]:
//   e_i   = exp(z_i / T - max_j z_j / T)            softmax numerators, in (0, 1] (NaN counts as 0)
//   t_k   = the top_k-th largest e                   (0 when top_k is 0 or >= vocab)
//   t_p   = the smallest e_i >= t_k whose mass above, sum of the e_j >= t_k with e_j > e_i,
//           is below top_p x the mass of every e_j >= t_k      (0 when top_p is 1)
//   w_i   = e_i where e_i >= max(t_k, t_p) and e_i > 0, else 0   (ties with a threshold are kept)
//   token = argmax_i w_i / E_i,  E_i = -ln(u_i)      (the exponential race, neoxfuse.sampling)
// This is neoxfuse.sampling.choose's rule (softmax, top-k, top-p, then the race, which does not
// care for normalisation) up to the roundings of exp and of the masses near a threshold.
//
// Work split: one cluster of kSampleClusterSize blocks. Block r owns the groups of 4 entries
// split_range(ceil(vocab / 4), C, r) (one Philox call per group); thread t of it the groups
// t, t + kThreads, ..., at most kSampleGroupsPerThread, whose e it keeps in registers: vocab is at
// most NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB (65536; every GPT-NeoX vocabulary fits).
// 1. Each block's maximum of z / T, the maximum of those over DSMEM -> e in registers.
// 2. The thresholds by radix select on the bits of e (positive floats order as their bits): passes
//    over 8-bit digits, most significant first. In a pass every block builds a histogram of the
//    digit over its entries that are still candidates (at or above the threshold so far, the
//    digits chosen so far in their higher bits), each bin holding a count and a mass
//    (e x 2^30 rounded) packed into one 64-bit integer added with shared-memory atomics: integer
//    sums, so the order of the adds changes nothing. A cluster barrier publishes the histograms;
//    every block sums the C of them over DSMEM and one warp picks the digit, the same in every
//    block. top-k counts down to the k-th largest; top-p walks the masses down to the last kept
//    entry. A search stops early when the chosen bin settles it (top-k: all of the bin is kept;
//    top-p: the bin holds one entry). Two histogram buffers alternate, so a pass needs one
//    cluster barrier: a block clears buffer n % 2 for pass n only after the barrier of pass n - 1,
//    which every block passes after it has read the buffers of pass n - 2.
// 3. The race over w, as neoxfuse.sampling.exponential_race: each thread keeps its best entry
//    (RaceLeader), then warp and block maxima of packed (key, ~index) entries; block 0 takes the
//    maximum of the blocks' winners over DSMEM, writes the token and advances the draw counter in
//    device memory (so a CUDA graph replay draws afresh).
// A few microseconds on C SMs instead of ~15 PyTorch kernels (a sort of the vocabulary among them).
#pragma once

#include <cstdint>

#include "kernels/common/cluster.cuh"
#include "kernels/common/philox.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/fused_decoder/fused_decoder.cuh"
#include "kernels/fused_decoder/fused_decoder.h"

namespace neoxfuse {
namespace fused_decoder {

constexpr int kSampleClusterSize = 8;      // blocks of sample_token_kernel
constexpr int kSampleGroupsPerThread = 8;  // groups of 4 entries a thread holds
static_assert(kSampleClusterSize * kThreads * kSampleGroupsPerThread * 4 == NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB,
              "the vocabulary the registers hold");

// u = (2 (word >> 9) + 1) / 2^24 in (0, 1), exact in fp32, from one 32-bit Philox word.
__device__ __forceinline__ float race_uniform(std::uint32_t random_word) {
  return static_cast<float>((random_word >> 9) * 2u + 1u) * 0x1p-24f;
}

// The exponential race's entry for vocab entry i: its key w_i / E_i in the high word (>= 0, so its
// float bits order as the floats do) and ~i in the low word, so the largest entry has the largest
// key and, among equal keys, the lowest index. E = -ln(u) is computed in fp64 and rounded to fp32
// so that PyTorch's ln on any device gives the same E (neoxfuse.sampling.exponential_race). A
// weight <= 0 or NaN has key 0 (no logarithm) and can never win against a positive one.
__device__ __forceinline__ unsigned long long race_entry(float weight, float u, int i) {
  const float key = weight > 0.0f ? weight / static_cast<float>(-log(static_cast<double>(u))) : 0.0f;
  return static_cast<unsigned long long>(__float_as_uint(key)) << 32 | (0xFFFFFFFFu - static_cast<std::uint32_t>(i));
}

__device__ __forceinline__ unsigned long long max_entry(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// A thread's best race entry so far, exact, with fp64 logarithms only where they can change it.
// An entry's fp32 key w / -logf(u) is within 2^-20 of its exact key (logf: <= 1 ulp; the exact E
// rounds fp64 to fp32; one division each), so one below (1 - 2^-16) x the leader's exact key is
// certainly below it and is skipped: only running records and near ties of a thread's entries,
// about ln(n) of n, take the fp64 path (fp64 is 1/64 rate on an RTX 5090). The leader is the same
// entry race_entry would give every entry.
struct RaceLeader {
  static constexpr float kMargin = 1.0f - 0x1p-16f;
  unsigned long long entry = 0;  // packed (exact key, ~index)
  float key = 0.0f;              // entry's key

  __device__ __forceinline__ void offer(float weight, std::uint32_t random_word, int i) {
    const float u = race_uniform(random_word);
    if (weight > 0.0f && weight / -logf(u) < key * kMargin) return;
    entry = max_entry(entry, race_entry(weight, u, i));
    key = __uint_as_float(static_cast<std::uint32_t>(entry >> 32));
  }
};

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kRadixBins / kWarpSize;
// A histogram bin: count << kCountShift | mass. Masses are e x 2^30 rounded to the nearest
// integer (<= 2^30; rounding, not truncation, so 65536 tiny masses do not add up a bias), so a
// bin's mass stays below 2^46 <= 2^kCountShift and its count (<= 65536) fits the 17 bits above.
constexpr int kCountShift = 47;
constexpr unsigned long long kMassMask = (1ull << kCountShift) - 1;

__device__ __forceinline__ unsigned long long radix_mass(float e) { return __float2ull_rn(e * 0x1p30f); }

struct SampleShared {                           // dynamic shared memory: the other blocks read it
  unsigned long long bins[2][kRadixBins];       // pass n's histogram in bins[n % 2]
  unsigned long long winner;                    // this block's race winner
  float max_scaled_logit;                       // this block's max of z / T
};

// The digit a pass picks, as warp 0 found it for the whole block.
struct RadixChoice {
  std::uint32_t digit;
  unsigned long long above;  // top-k: entries in higher bins; top-p: their mass
  unsigned count;            // entries in the chosen bin
  bool none;                 // no bin picked: top-k has fewer candidates than k, top-p none at all
};

// Steps 1-2 for one block: its entries' e, and the radix passes over them.
class RadixSelect {
 public:
  using Entries = float[kSampleGroupsPerThread][4];

  __device__ RadixSelect(const Entries& e, SampleShared& shared, unsigned long long* cluster_bins, RadixChoice& choice)
      : e_(e), shared_(shared), cluster_bins_(cluster_bins), choice_(choice) {}

  // The bits of the top_k-th largest positive e (1, the smallest positive float, when fewer are positive).
  __device__ __forceinline__ std::uint32_t kth_largest(int top_k) {
    std::uint32_t prefix = 0;
    unsigned long long remaining = static_cast<unsigned long long>(top_k);
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      const RadixChoice c = pass(1, prefix, shift, [remaining](const unsigned long long (&bins)[kBinsPerLane], int lane,
                                                               unsigned long long lane_above, unsigned long long,
                                                               RadixChoice& found) {
        unsigned long long above = lane_above;
        for (int b = kBinsPerLane - 1; b >= 0; --b) {
          const unsigned long long count = bins[b] >> kCountShift;
          if (above < remaining && above + count >= remaining) {
            found = {static_cast<std::uint32_t>(lane * kBinsPerLane + b), above, static_cast<unsigned>(count), false};
          }
          above += count;
        }
      }, /*by_mass=*/false);
      if (c.none) return 1;
      prefix |= c.digit << shift;
      if (c.above + c.count == remaining) return prefix;  // the whole bin is kept
      remaining -= c.above;
    }
    return prefix;
  }

  // The bits of t_p among the entries at or above `floor` (the bits of t_k, or 1).
  __device__ __forceinline__ std::uint32_t top_p_threshold(std::uint32_t floor, float top_p) {
    std::uint32_t prefix = 0;
    unsigned long long mass_above = 0;  // of the entries above every candidate
    double budget = -1.0;               // top_p x the mass of every entry at or above floor
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      const RadixChoice c = pass(floor, prefix, shift, [&](const unsigned long long (&bins)[kBinsPerLane], int lane,
                                                           unsigned long long lane_above, unsigned long long total,
                                                           RadixChoice& found) {
        if (budget < 0.0) budget = static_cast<double>(top_p) * static_cast<double>(total);  // the first pass
        unsigned long long above = lane_above;
        for (int b = kBinsPerLane - 1; b >= 0; --b) {
          const unsigned count = static_cast<unsigned>(bins[b] >> kCountShift);
          if (count > 0 && static_cast<double>(mass_above + above) < budget) {
            found = {static_cast<std::uint32_t>(lane * kBinsPerLane + b), above, count, false};
          }
          above += bins[b] & kMassMask;
        }
      }, /*by_mass=*/true);
      if (c.none) return floor;  // no entry is positive
      prefix |= c.digit << shift;
      if (c.count == 1) return prefix;  // the bin's one entry is the last kept
      mass_above += c.above;
    }
    return prefix;
  }

 private:
  // One radix pass over the candidates, the entries e >= floor whose bits above
  // `shift + kRadixBits` are `prefix`'s: histogram, cluster sum, and the choice `find` makes
  // from warp 0's lanes. find(bins, lane, lane_above, total, found) sees a lane's kBinsPerLane
  // bins (most significant last), the count (by_mass: mass) of the candidates in higher lanes'
  // bins and of all of them, and sets `found` for the bin it picks; the lowest bin picked by any
  // lane wins.
  template <typename Find>
  __device__ __forceinline__ RadixChoice pass(std::uint32_t floor, std::uint32_t prefix, int shift, Find find, bool by_mass) {
    unsigned long long* bins = shared_.bins[pass_ % 2];
    ++pass_;
    for (int b = static_cast<int>(threadIdx.x); b < kRadixBins; b += kThreads) bins[b] = 0;
    __syncthreads();
    const std::uint32_t higher = static_cast<std::uint32_t>(~0ull << (shift + kRadixBits));  // the chosen digits' bits
#pragma unroll
    for (int g = 0; g < kSampleGroupsPerThread; ++g) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::uint32_t bits = __float_as_uint(e_[g][j]);
        if (bits >= floor && (bits & higher) == prefix) {
          atomicAdd(&bins[(bits >> shift) % kRadixBins], 1ull << kCountShift | radix_mass(e_[g][j]));
        }
      }
    }
    cluster_sync();  // every block's histogram is written
    ClusterReduce<unsigned long long, ClusterSum>{}(bins, cluster_bins_, 0, kRadixBins);
    __syncthreads();
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    if (threadIdx.x < kWarpSize) {
      unsigned long long lane_bins[kBinsPerLane], lane_total = 0;
      for (int b = 0; b < kBinsPerLane; ++b) {
        lane_bins[b] = cluster_bins_[lane * kBinsPerLane + b];
        lane_total += by_mass ? lane_bins[b] & kMassMask : lane_bins[b] >> kCountShift;
      }
      unsigned long long suffix = lane_total;  // lane_total summed over this lane and the ones above
#pragma unroll
      for (int delta = 1; delta < kWarpSize; delta *= 2) {
        const unsigned long long from_above = __shfl_down_sync(0xffffffffu, suffix, delta);
        if (lane + delta < kWarpSize) suffix += from_above;
      }
      unsigned long long total = lane_total;  // over every lane
#pragma unroll
      for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) total += __shfl_xor_sync(0xffffffffu, total, lane_mask);
      RadixChoice found = {kRadixBins, 0, 0, true};
      find(lane_bins, lane, suffix - lane_total, total, found);
      std::uint32_t lowest = found.digit;
#pragma unroll
      for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
        const std::uint32_t other = __shfl_xor_sync(0xffffffffu, lowest, lane_mask);
        lowest = other < lowest ? other : lowest;
      }
      if (lowest == kRadixBins ? lane == 0 : found.digit == lowest) choice_ = found;
    }
    __syncthreads();
    return choice_;
  }

  const Entries& e_;
  SampleShared& shared_;
  unsigned long long* cluster_bins_;  // [kRadixBins] this block's sum of every block's histogram
  RadixChoice& choice_;
  int pass_ = 0;
};

__global__ void __launch_bounds__(kThreads, 1)
    sample_token_kernel(const float* logits, int vocab, float temperature, int top_k, float top_p, std::int64_t* rng,
                        std::int64_t* token) {
  extern __shared__ float4 shared4[];
  SampleShared& shared = *reinterpret_cast<SampleShared*>(shared4);
  __shared__ unsigned long long cluster_bins[kRadixBins];
  __shared__ RadixChoice choice;
  __shared__ float max_scratch[2][kMaxWarpsPerBlock];
  __shared__ unsigned long long warp_winner[kWarps];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const auto seed = static_cast<std::uint64_t>(__ldcg(rng)), draw = static_cast<std::uint64_t>(__ldcg(rng + 1));
  const IndexRange groups = split_range((vocab + 3) / 4, cluster_size(), cluster_rank());
  const auto entry_index = [&](int g, int j) {  // vocab index of entry j of this thread's group g, or -1
    const int group = groups.begin + static_cast<int>(threadIdx.x) + g * kThreads;
    return group < groups.end && 4 * group + j < vocab ? 4 * group + j : -1;
  };

  // 1. e = exp(z / T - max z / T), 0 where not a number or out of range.
  float e[kSampleGroupsPerThread][4];
  float block_max = -INFINITY;
#pragma unroll
  for (int g = 0; g < kSampleGroupsPerThread; ++g) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = entry_index(g, j);
      e[g][j] = i >= 0 ? __ldcg(logits + i) / temperature : -INFINITY;
      block_max = fmaxf(block_max, e[g][j]);
    }
  }
  block_max = BlockAllReduce<MaxOp>(max_scratch)(block_max);
  if (threadIdx.x == 0) shared.max_scaled_logit = block_max;
  cluster_sync();  // every block's maximum is written; every block has read the draw counter
  float max_scaled_logit = -INFINITY;
  for (int r = 0; r < cluster_size(); ++r) max_scaled_logit = fmaxf(max_scaled_logit, *cluster_peer(&shared.max_scaled_logit, r));
#pragma unroll
  for (int g = 0; g < kSampleGroupsPerThread; ++g) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float numerator = expf(e[g][j] - max_scaled_logit);
      e[g][j] = numerator > 0.0f ? numerator : 0.0f;
    }
  }

  // 2. The kept entries: e >= threshold (bits; 1 keeps every positive e).
  RadixSelect select(e, shared, cluster_bins, choice);
  std::uint32_t threshold = 1;
  if (0 < top_k && top_k < vocab) threshold = select.kth_largest(top_k);
  if (top_p < 1.0f) threshold = select.top_p_threshold(threshold, top_p);

  // 3. The race over the kept entries.
  RaceLeader leader;
#pragma unroll
  for (int g = 0; g < kSampleGroupsPerThread; ++g) {
    const int group = groups.begin + static_cast<int>(threadIdx.x) + g * kThreads;
    if (group >= groups.end) break;
    const PhiloxWords counter = {{static_cast<std::uint32_t>(group), 0u, static_cast<std::uint32_t>(draw),
                                  static_cast<std::uint32_t>(draw >> 32)}};
    const PhiloxWords random = philox4x32_10(counter, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = entry_index(g, j);
      if (i >= 0) leader.offer(__float_as_uint(e[g][j]) >= threshold ? e[g][j] : 0.0f, random.word[j], i);
    }
  }
  unsigned long long winner = leader.entry;
#pragma unroll
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    winner = max_entry(winner, __shfl_xor_sync(0xffffffffu, winner, lane_mask));
  }
  if (lane == 0) warp_winner[warp] = winner;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) winner = max_entry(winner, warp_winner[w]);
    shared.winner = winner;
  }
  cluster_sync();  // every block's winner is written
  if (cluster_rank() == 0 && threadIdx.x == 0) {
    for (int r = 0; r < cluster_size(); ++r) winner = max_entry(winner, *cluster_peer(&shared.winner, r));
    *token = static_cast<std::int64_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(winner));
    rng[1] = static_cast<std::int64_t>(draw + 1);
  }
  cluster_sync();  // block 0 is done reading the others' shared memory
}

}  // namespace fused_decoder
}  // namespace neoxfuse
