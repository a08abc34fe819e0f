// Counter-based 32-bit hashing shared by the bootstrap resampler (metrics) and the watermarks: every
// pseudo-random value is a pure function of (key, counters), so the C++ kernels, the Triton kernels
// (kernels/metrics.py) and the PyTorch references (reference/metrics.py) produce the same bits on every
// device, and no random tensor is ever stored. Only 32-bit multiplies, xors and logical shifts.
#pragma once

#include <cstdint>

namespace alignops::hash {

// Domain separation: one key never yields the same stream for two purposes.
constexpr uint32_t kSaltBootstrap = 0x13198A2Eu;
constexpr uint32_t kSaltKgw = 0x243F6A88u;
constexpr uint32_t kSaltGumbel = 0x85A308D3u;

// lowbias32 (C. Wellons): a bijective avalanche mixer of 32-bit words.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Folds a counter into a state. The counter is mixed before the xor: with a bare xor, two states that differ
// by d would give streams that are permutations of each other (i -> i ^ d).
inline uint32_t combine(uint32_t h, uint32_t x) { return mix32(h ^ mix32(x)); }

// The state of a 64-bit key under a salt.
inline uint32_t key_state(uint32_t salt, int64_t key) {
  const uint64_t k = static_cast<uint64_t>(key);
  return combine(combine(salt, static_cast<uint32_t>(k)), static_cast<uint32_t>(k >> 32));
}

// floor(h * n / 2^32): an index in [0, n) (Lemire's multiply-shift; bias below n / 2^32).
inline uint32_t bounded(uint32_t h, uint32_t n) { return static_cast<uint32_t>((static_cast<uint64_t>(h) * n) >> 32); }

// (top 24 bits + 0.5) / 2^24: a float in (0, 1), exact in fp32, never 0 or 1.
inline float unit_float(uint32_t h) { return (static_cast<float>(h >> 8) + 0.5f) * 5.9604644775390625e-08f; }

}  // namespace alignops::hash
