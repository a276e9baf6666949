// neoxemu.h — the CUDA the kernels use, emulated on the CPU, so their logic runs in CI.
//
// tests/emulator/translate.py turns each kernel source into C++ that includes this header
// (`extern __shared__ T name[]` -> this block's dynamic shared memory, `asm volatile("ptx")` ->
// ptx("ptx"), `kernel<<<grid, block, smem, stream>>>(args)` -> launch(kernel, ...)(args)); g++
// then builds the same C ABI as libneoxfuse.so, with host pointers for device pointers.
//
// Execution model. A launch runs its clusters one after another on a few worker threads; the
// blocks of a cluster run at once, one OS thread each (cluster barriers and distributed shared
// memory need every block of a cluster alive). The CUDA threads of a block are fibers
// (ucontext) on the block's OS thread: a fiber runs until it reaches a barrier — a warp shuffle
// (all 32 lanes), __syncthreads (every thread of the block) or a cluster barrier wait — and the
// block's scheduler resumes fibers whose barrier has completed. Two schedules, as unlike as the
// emulator can make them (neoxemu_set_schedule): forward runs threads and clusters in order,
// every warp one step per round (warps advance together); reverse runs them in reverse order,
// and each warp as far as it can before the next (through its shuffles, up to a barrier of the
// block or cluster). A read that no barrier orders after its write, or a write that no barrier
// orders after the reads of the old value, sees or clobbers other data under the two, and a test
// that compares both finds it.
//
// Integer atomicAdd is the host's atomic add (a cluster's blocks run on different OS threads);
// __shfl_xor_sync and __shfl_down_sync are the shuffles it has.
// What it checks on its way: barriers every thread must reach (a divergent barrier deadlocks
// and fails the launch with the barrier named), shuffles over a full warp, map_shared_rank of
// dynamic shared memory only, a dynamic shared-memory size within the kernel's limit (48 KiB
// unless raised by cudaFuncSetAttribute, as on the GPU), cluster sizes 1..8 that divide the
// grid, PTX it knows (prefetch and griddepcontrol are no-ops; anything else fails the launch),
// and in a programmatic dependent launch no coherent load (ld.global.cg: how the kernels read
// what earlier kernels wrote) before the thread's griddepcontrol.wait.
// It counts the bytes of streaming loads (__ldcs), the loads of data read once, and of the
// cache-operator loads inside a watched address range.
// Fresh dynamic shared memory, each block's static __shared__ variables and the shared memory of
// a block that has exited are filled with 0xFF bytes (NaN), so reading before writing or after
// the owner left shows up in the results.
// A misaligned access (a uint4, float4, __half2, ... loaded or stored at an address its type's
// alignment does not divide) fails the launch and every later one, as the GPU's sticky
// cudaErrorMisalignedAddress does: the library is built with UBSan's alignment check
// (bazel/emulator.bzl), whose report hook (neoxemu.cc) calls misaligned_access(). Where g++ made
// the access an SSE instruction that needs the alignment itself, the process faults right after
// UBSan's report ("runtime error: ... misaligned address", on stderr: pytest -s shows it).
// A failed launch returns cudaErrorLaunchFailure; cudaGetErrorString says what happened.
//
// The emulated device is an sm_90 with 132 SMs and 227 KiB of shared memory per block (an H100;
// neoxemu_set_device makes it another, e.g. an RTX 5090: sm_120, 170 SMs, 99 KiB, or one whose
// SMs are grouped in GPCs of given sizes, which a cluster may not straddle). Global
// memory is the host's, unchecked (the tests pass tensors that end at an inaccessible page:
// EmulatedKernels.guarded in tests/conftest.py). Launches run to completion in order, so
// programmatic dependent launch overlaps nothing here (hence the check on coherent loads). Math functions are the C library's, so
// results agree with the GPU's to rounding, not bitwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's keywords as plain C++ (the real headers above define some of them for nvcc).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#ifndef NEOXFUSE_CUDA_ARCHS
#define NEOXFUSE_CUDA_ARCHS "emulated"
#endif

namespace neoxemu {

constexpr int kWarpSize = 32;
constexpr int kMaxClusterSize = 8;
// The emulated device (neoxemu_set_device): an H100's by default.
struct Device {
  static constexpr int kMaxGpcs = 16;
  int major = 9, minor = 0;
  int sms = 132;
  int shared_optin = 227 * 1024;  // dynamic + static shared memory one block may have
  int gpcs = 0;                   // 0: the SMs form one pool; else a cluster runs within one GPC
  int gpc_sms[kMaxGpcs] = {};     // [gpcs] SMs per GPC, summing to sms
};
inline Device device;  // set between launches only
constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr size_t kFiberStack = 128 * 1024;
constexpr auto kDeadlockTimeout = std::chrono::seconds(300);  // no cluster progress for this long: deadlock

// Order of the fibers in a block and of the clusters in a launch: 0 forward (thread 0 first), 1 reverse.
inline std::atomic<int> schedule{0};

// Bytes read by __ldcs since the last neoxemu_take_streamed_bytes() (neoxemu.cc).
inline std::atomic<uint64_t> streamed_bytes{0};

// Bytes that cache-operator loads (__ldg, __ldcg, __ldcs) read inside [watch_begin, watch_end)
// since the last neoxemu_watch() (neoxemu.cc).
inline std::atomic<uintptr_t> watch_begin{0}, watch_end{0};
inline std::atomic<uint64_t> watched_bytes{0};

// The first misaligned access's report; once set, every launch fails (run_grid).
inline std::mutex misaligned_mutex;
inline std::string misaligned_report;

template <typename T>
inline void count_watched(const T* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address >= watch_begin.load(std::memory_order_relaxed) && address < watch_end.load(std::memory_order_relaxed)) {
    watched_bytes += sizeof(T);
  }
}

// The launch failure of this thread (the launching one) for cudaGetErrorString.
inline thread_local std::string failure_message;
inline thread_local cudaError_t last_error = cudaSuccess;

struct LaunchFailure {
  std::string message;
};

// One cluster of a launch: the blocks' dynamic shared memory and the cluster barrier.
class Cluster {
 public:
  Cluster(int blocks, size_t shared_bytes)
      : shared_(blocks), shared_bytes_(shared_bytes), arrived_(blocks, 0), exited_(blocks, false) {
    for (int rank = 0; rank < blocks; ++rank) {
      shared_[rank].reset(static_cast<char*>(std::aligned_alloc(128, std::max<size_t>(128, (shared_bytes + 127) / 128 * 128))));
      poison(rank);
    }
  }

  int size() const { return static_cast<int>(shared_.size()); }
  size_t shared_bytes() const { return shared_bytes_; }
  char* shared(int rank) const { return shared_[rank].get(); }

  // Block `rank` has arrived at `phases` cluster barriers with every live thread (or exited).
  void block_arrived(int rank, unsigned phases) {
    std::lock_guard<std::mutex> lock(mutex_);
    arrived_[rank] = phases;
    update_phase();
  }
  void block_exited(int rank) {
    poison(rank);
    std::lock_guard<std::mutex> lock(mutex_);
    exited_[rank] = true;
    update_phase();
  }
  unsigned phase() {
    std::lock_guard<std::mutex> lock(mutex_);
    return phase_;
  }
  // Waits until the cluster has completed more than `seen` phases or failed; false on timeout.
  bool wait_for_phase_after(unsigned seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    return changed_.wait_for(lock, kDeadlockTimeout, [&] { return phase_ > seen || failed_; });
  }
  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!failed_) message_ = message;
    failed_ = true;
    changed_.notify_all();
  }
  bool failed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return failed_;
  }
  std::string message() {
    std::lock_guard<std::mutex> lock(mutex_);
    return message_;
  }

 private:
  // Block `rank`'s shared memory reads as NaN (0xFF bytes) until written.
  void poison(int rank) { std::memset(shared_[rank].get(), 0xFF, std::max<size_t>(shared_bytes_, 1)); }

  void update_phase() {
    unsigned phase = UINT32_MAX;
    for (int r = 0; r < size(); ++r) {
      if (!exited_[r]) phase = std::min(phase, arrived_[r]);
    }
    if (phase != UINT32_MAX && phase > phase_) {
      phase_ = phase;
      changed_.notify_all();
    }
  }

  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<char, Free>> shared_;
  size_t shared_bytes_ = 0;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<unsigned> arrived_;
  std::vector<bool> exited_;
  unsigned phase_ = 0;
  bool failed_ = false;
  std::string message_;
};

// Fiber stacks, reused from block to block (fresh ones cost a page fault per touched page).
class StackPool {
 public:
  std::unique_ptr<char[]> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return std::unique_ptr<char[]>(new char[kFiberStack]);
    std::unique_ptr<char[]> stack = std::move(free_.back());
    free_.pop_back();
    return stack;
  }
  void give(std::unique_ptr<char[]> stack) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(stack));
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<char[]>> free_;
};
inline StackPool stack_pool;

// How a launch runs: 1-D grid and blocks, clusters, and whether it is a programmatic dependent
// launch (PDL: its threads may run before the previous kernel has finished, up to their
// griddepcontrol.wait).
struct Grid {
  unsigned blocks = 1;
  dim3 block_dim;
  size_t shared_bytes = 0;
  int cluster_size = 1;
  bool pdl = false;
};

// One block on its OS thread: the fibers of its threads and their scheduler.
class Block {
 public:
  enum class State { kReady, kShuffle, kSyncthreads, kClusterWait, kExited };

  Block(Cluster& cluster, int rank, const Grid& grid, std::function<void()> body)
      : cluster_(cluster), rank_(rank), pdl_(grid.pdl), body_(std::move(body)), fibers_(grid.block_dim.x),
        warps_((grid.block_dim.x + kWarpSize - 1) / kWarpSize) {}
  ~Block() {
    for (Fiber& fiber : fibers_) {
      if (fiber.stack) stack_pool.give(std::move(fiber.stack));
    }
  }

  // Runs every thread to its end; throws LaunchFailure on a deadlock or a failed check.
  void run();

  // Called by the running fiber (through the CUDA functions below).
  // A full-warp shuffle: every lane gets the value of lane source(lane); `what` names the
  // intrinsic in a failure.
  template <typename T, typename Source>
  T shuffle(const char* what, unsigned mask, T value, int width, Source source);
  void syncthreads() { block_until(State::kSyncthreads); }
  void cluster_arrive();
  void cluster_wait();
  void wait_for_previous_grid() { fibers_[current_].waited_for_previous_grid = true; }
  // A coherent load (the loads of what earlier kernels wrote) before this thread's
  // griddepcontrol.wait in a PDL launch: on the GPU it may read the previous kernel's data unwritten.
  void check_coherent_load() {
    if (pdl_ && !fibers_[current_].waited_for_previous_grid) {
      fail("ld.global.cg (data an earlier kernel writes) before griddepcontrol.wait in a programmatic dependent launch");
    }
  }
  void fail(const std::string& message) {
    cluster_.fail(message);
    block_until(State::kExited);  // never resumed
  }
  // A failure found where the fiber must not switch (inside UBSan's report, which holds a lock):
  // the launch fails when the fiber next yields or ends.
  void fail_at_next_switch(const std::string& message) { cluster_.fail(message); }
  // A static __shared__ variable (thread_local: one copy per OS thread, so per block) reached by
  // one of this block's threads: filled with 0xFF bytes the first time, as the block starts with it.
  void fresh_static_shared(void* variable, size_t bytes) {
    if (fresh_statics_.insert(variable).second) std::memset(variable, 0xFF, bytes);
  }
  char* shared() const { return cluster_.shared(rank_); }
  size_t shared_bytes() const { return cluster_.shared_bytes(); }
  const Cluster& cluster() const { return cluster_; }
  int rank() const { return rank_; }

 private:
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    State state = State::kReady;
    unsigned arrivals = 0, waits = 0;  // cluster barrier phases arrived at / waited for
    bool waited_for_previous_grid = false;
  };
  struct Warp {
    uint64_t slots[2][kWarpSize];
    unsigned generation = 0;
  };

  static void fiber_main();
  void block_until(State state);
  void resume(int thread);   // runs the fiber until it blocks or exits
  bool run_warp_ahead(int warp);  // the reverse schedule's round of one warp; true if it ran
  bool release_shuffle(int warp);
  bool release_barriers();  // also records the cluster phase it saw in seen_phase_
  void report_arrivals();
  std::string describe_states() const;

  Cluster& cluster_;
  int rank_;
  bool pdl_;
  std::function<void()> body_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  ucontext_t scheduler_;
  int current_ = -1;
  unsigned reported_arrivals_ = 0;
  std::set<void*> fresh_statics_;  // static __shared__ variables filled for this block
  unsigned seen_phase_ = 0;
};

inline thread_local Block* current_block = nullptr;

}  // namespace neoxemu

// ---- the CUDA built-ins the kernels see -------------------------------------------------------

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { neoxemu::current_block->syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = neoxemu::kWarpSize) {
  if (lane_mask < 0 || lane_mask >= neoxemu::kWarpSize) neoxemu::current_block->fail("__shfl_xor_sync: lane mask out of range");
  return neoxemu::current_block->shuffle("__shfl_xor_sync", mask, value, width, [lane_mask](int lane) { return lane ^ lane_mask; });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = neoxemu::kWarpSize) {
  return neoxemu::current_block->shuffle("__shfl_down_sync", mask, value, width, [delta](int lane) {
    return lane + delta < static_cast<unsigned>(neoxemu::kWarpSize) ? lane + static_cast<int>(delta) : lane;
  });
}

// Integer atomic adds (shared or global memory): the hardware atomic of the host, since the
// blocks of a cluster run on different OS threads.
template <typename T>
inline T atomicAdd(T* address, T value) {
  static_assert(std::is_integral<T>::value, "the emulator has integer atomics only");
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

// Cache-operator loads and stores are plain accesses here. Streaming loads (ld.global.cs: data
// read once, the weights) are counted, so a test can check each byte is read exactly once.
template <typename T>
inline T __ldg(const T* p) {
  neoxemu::count_watched(p);
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  neoxemu::current_block->check_coherent_load();
  neoxemu::count_watched(p);
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  neoxemu::streamed_bytes += sizeof(T);
  neoxemu::count_watched(p);
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

inline float __uint_as_float(unsigned bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline unsigned __float_as_uint(float value) {
  unsigned bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline unsigned long long __float2ull_rn(float v) { return static_cast<unsigned long long>(std::nearbyint(v)); }  // ties to even

namespace neoxemu {

// The PTX of an `asm volatile` statement (operands dropped by translate.py).
inline void ptx(const char* text) {
  const std::string instruction(text);
  if (instruction.rfind("griddepcontrol.wait", 0) == 0) return current_block->wait_for_previous_grid();
  for (const char* no_op : {"prefetch.global.", "griddepcontrol.launch_dependents"}) {
    if (instruction.rfind(no_op, 0) == 0) return;
  }
  current_block->fail("the emulator does not know the PTX `" + instruction + "`");
}

// A static __shared__ variable's declaration (translate.py): the block's copy starts as 0xFF bytes.
template <typename T>
inline void fresh_static_shared(T* variable, size_t bytes) {
  current_block->fresh_static_shared(variable, bytes);
}

// This block's dynamic shared memory (`extern __shared__ T name[]`).
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(current_block->shared());
}

// ---- Block -------------------------------------------------------------------------------------

inline void Block::fiber_main() {
  Block* block = current_block;
  block->body_();
  block->fibers_[block->current_].state = State::kExited;
  // uc_link returns to the scheduler.
}

inline void Block::block_until(State state) {
  Fiber& fiber = fibers_[current_];
  fiber.state = state;
  swapcontext(&fiber.context, &scheduler_);
}

template <typename T, typename Source>
inline T Block::shuffle(const char* what, unsigned mask, T value, int width, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "a register value");
  if (mask != 0xffffffffu || width != kWarpSize) {
    fail(std::string(what) + ": the emulator supports full-warp shuffles (mask 0xffffffff, width 32) only");
  }
  const int lane = current_ % kWarpSize;
  Warp& warp = warps_[current_ / kWarpSize];
  const int parity = warp.generation & 1;  // the next shuffle uses the other slots: no lane can
                                           // pass it before every lane has read these
  std::memcpy(&warp.slots[parity][lane], &value, sizeof(T));
  block_until(State::kShuffle);
  T result;
  std::memcpy(&result, &warp.slots[parity][source(lane)], sizeof(T));
  return result;
}

inline void Block::cluster_arrive() {
  Fiber& fiber = fibers_[current_];
  if (fiber.arrivals != fiber.waits) fail("barrier.cluster.arrive twice without a wait in between");
  ++fiber.arrivals;
  report_arrivals();
}

inline void Block::cluster_wait() {
  Fiber& fiber = fibers_[current_];
  if (fiber.waits == fiber.arrivals) fail("barrier.cluster.wait without an arrive before it");
  ++fiber.waits;
  if (cluster_.phase() < fiber.waits) block_until(State::kClusterWait);
}

// Tells the cluster how many phases every live thread of this block has arrived at.
inline void Block::report_arrivals() {
  unsigned phases = UINT32_MAX;
  for (const Fiber& fiber : fibers_) {
    if (fiber.state != State::kExited) phases = std::min(phases, fiber.arrivals);
  }
  if (phases != UINT32_MAX && phases > reported_arrivals_) {
    reported_arrivals_ = phases;
    cluster_.block_arrived(rank_, phases);
  }
}

// Readies the lanes of `warp` if all of them wait in a shuffle; true if so.
inline bool Block::release_shuffle(int warp) {
  const int begin = warp * kWarpSize, end = std::min(begin + kWarpSize, static_cast<int>(fibers_.size()));
  bool any = false, all = true;
  for (int t = begin; t < end; ++t) {
    any |= fibers_[t].state == State::kShuffle;
    all &= fibers_[t].state == State::kShuffle;
  }
  if (!(any && all)) return false;
  if (end - begin < kWarpSize) throw LaunchFailure{"a shuffle in a warp of fewer than 32 threads"};
  for (int t = begin; t < end; ++t) fibers_[t].state = State::kReady;
  ++warps_[warp].generation;
  return true;
}

// Readies the fibers whose barrier has completed; true if any.
inline bool Block::release_barriers() {
  bool released = false;
  for (size_t w = 0; w < warps_.size(); ++w) released |= release_shuffle(static_cast<int>(w));
  bool any = false, all = true;
  for (const Fiber& fiber : fibers_) {
    any |= fiber.state == State::kSyncthreads;
    all &= fiber.state == State::kSyncthreads || fiber.state == State::kExited;
  }
  if (any && all) {
    for (Fiber& fiber : fibers_) {
      if (fiber.state == State::kSyncthreads) fiber.state = State::kReady;
    }
    released = true;
  }
  seen_phase_ = cluster_.phase();
  for (Fiber& fiber : fibers_) {
    if (fiber.state == State::kClusterWait && seen_phase_ >= fiber.waits) {
      fiber.state = State::kReady;
      released = true;
    }
  }
  return released;
}

inline std::string Block::describe_states() const {
  static const char* names[] = {"running", "in a warp shuffle", "in __syncthreads", "in a cluster wait", "exited"};
  std::map<int, std::vector<int>> threads_by_state;
  for (size_t t = 0; t < fibers_.size(); ++t) threads_by_state[static_cast<int>(fibers_[t].state)].push_back(static_cast<int>(t));
  std::string text;
  for (const auto& [state, threads] : threads_by_state) {
    text += "; " + std::to_string(threads.size()) + " thread(s) " + names[state] + " (first: " +
            std::to_string(threads.front()) + ")";
  }
  return text;
}

inline void Block::run() {
  current_block = this;
  const int threads = static_cast<int>(fibers_.size());
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = fibers_[t];
    fiber.stack = stack_pool.take();
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kFiberStack;
    fiber.context.uc_link = &scheduler_;
    makecontext(&fiber.context, &Block::fiber_main, 0);
  }
  const bool reverse = schedule.load() != 0;
  for (;;) {
    bool ran = false;
    if (reverse) {
      for (int w = static_cast<int>(warps_.size()) - 1; w >= 0; --w) ran |= run_warp_ahead(w);
    } else {
      for (int t = 0; t < threads; ++t) {
        if (fibers_[t].state != State::kReady) continue;
        resume(t);
        ran = true;
      }
    }
    if (std::all_of(fibers_.begin(), fibers_.end(), [](const Fiber& f) { return f.state == State::kExited; })) {
      cluster_.block_exited(rank_);
      return;
    }
    if (release_barriers() || ran) continue;
    const bool waits_for_cluster = std::any_of(fibers_.begin(), fibers_.end(),
                                               [](const Fiber& f) { return f.state == State::kClusterWait; });
    if (!waits_for_cluster) throw LaunchFailure{"deadlock in block " + std::to_string(blockIdx.x) + describe_states()};
    if (!cluster_.wait_for_phase_after(seen_phase_)) {
      throw LaunchFailure{"cluster barrier deadlock (timed out) in block " + std::to_string(blockIdx.x) + describe_states()};
    }
    if (cluster_.failed()) throw LaunchFailure{cluster_.message()};
  }
}

inline void Block::resume(int thread) {
  current_ = thread;
  threadIdx = uint3{static_cast<unsigned>(thread), 0, 0};
  swapcontext(&scheduler_, &fibers_[thread].context);
  if (cluster_.failed()) throw LaunchFailure{cluster_.message()};
  if (fibers_[thread].state == State::kExited) report_arrivals();
}

// The warp's ready lanes in reverse order, again after each of its shuffles, until every lane
// waits at a barrier of the block or cluster, or has exited.
inline bool Block::run_warp_ahead(int warp) {
  const int begin = warp * kWarpSize, end = std::min(begin + kWarpSize, static_cast<int>(fibers_.size()));
  bool ran = false;
  do {
    for (int t = end - 1; t >= begin; --t) {
      if (fibers_[t].state != State::kReady) continue;
      resume(t);
      ran = true;
    }
  } while (release_shuffle(warp));
  return ran;
}

// ---- launches ----------------------------------------------------------------------------------

// Per-kernel attributes, keyed by the kernel's address (cudaFuncSetAttribute).
inline std::mutex attributes_mutex;
inline std::map<const void*, int> max_dynamic_shared;

inline int dynamic_shared_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(attributes_mutex);
  const auto found = max_dynamic_shared.find(kernel);
  return found == max_dynamic_shared.end() ? kDefaultDynamicShared : found->second;
}

inline cudaError_t set_error(cudaError_t error, const std::string& message) {
  last_error = error;
  failure_message = message;
  return error;
}

// A misaligned access by the calling thread: this launch fails, and so does every later one.
inline void misaligned_access(const std::string& report) {
  {
    std::lock_guard<std::mutex> lock(misaligned_mutex);
    if (misaligned_report.empty()) misaligned_report = report;
  }
  if (current_block != nullptr) current_block->fail_at_next_switch("misaligned address: " + report);
}

// Runs `body` (one thread's kernel call) for every thread of `grid`.
inline cudaError_t run_grid(const void* kernel, const Grid& grid, const std::function<void()>& body) {
  {
    std::lock_guard<std::mutex> lock(misaligned_mutex);
    if (!misaligned_report.empty()) {
      return set_error(cudaErrorLaunchFailure, "an earlier kernel failed (misaligned address: " + misaligned_report +
                                                   "), which on the GPU loses the context");
    }
  }
  const unsigned blocks = grid.blocks;
  const int threads = static_cast<int>(grid.block_dim.x), cluster_size = grid.cluster_size;
  if (grid.block_dim.y != 1 || grid.block_dim.z != 1 || threads < 1 || threads > 1024 || blocks < 1) {
    return set_error(cudaErrorInvalidConfiguration, "the emulator runs 1-D blocks of 1..1024 threads, >= 1 block");
  }
  if (cluster_size < 1 || cluster_size > kMaxClusterSize || blocks % cluster_size != 0) {
    return set_error(cudaErrorInvalidClusterSize, "cluster size must be 1..8 and divide the grid");
  }
  if (grid.shared_bytes > static_cast<size_t>(dynamic_shared_limit(kernel))) {
    return set_error(cudaErrorInvalidValue, "dynamic shared memory over the kernel's limit (cudaFuncSetAttribute)");
  }
  const unsigned clusters = blocks / cluster_size;
  std::atomic<unsigned> next_cluster{0};
  std::mutex failure_mutex;
  std::string failure;
  const bool reverse = schedule.load() != 0;  // clusters too: no order between them is promised
  auto worker = [&] {
    for (unsigned n = next_cluster++; n < clusters; n = next_cluster++) {
      const unsigned c = reverse ? clusters - 1 - n : n;
      Cluster cluster(cluster_size, grid.shared_bytes);
      auto run_block = [&](int r) {
        blockIdx = uint3{c * cluster_size + r, 0, 0};
        blockDim = grid.block_dim;
        gridDim = dim3(blocks);
        Block block(cluster, r, grid, body);
        try {
          block.run();
        } catch (const LaunchFailure& f) {
          cluster.fail(f.message);
        }
      };
      std::vector<std::thread> block_threads;  // rank 0 runs on this worker
      for (int r = 1; r < cluster_size; ++r) block_threads.emplace_back(run_block, r);
      run_block(0);
      for (auto& t : block_threads) t.join();
      if (cluster.failed()) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (failure.empty()) failure = cluster.message();
        next_cluster = clusters;
      }
    }
  };
  const unsigned workers = std::max(1u, std::min(clusters, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  if (!failure.empty()) return set_error(cudaErrorLaunchFailure, "emulated kernel failed: " + failure);
  return cudaSuccess;
}

template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid_dim, const Grid& grid, Args&&... args) {
  if (grid_dim.y != 1 || grid_dim.z != 1) return set_error(cudaErrorInvalidConfiguration, "the emulator runs 1-D grids");
  // Like a CUDA launch: the arguments converted to the parameter types once, copied per thread.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return run_grid(reinterpret_cast<const void*>(kernel), grid, [&params, kernel] { std::apply(kernel, params); });
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...)  ->  launch(kernel, grid, block, shared_bytes, stream)(args...)
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    launch_kernel(kernel, grid, Grid{grid.x, block, shared_bytes}, std::forward<Args>(args)...);
  }
};
template <typename Kernel>
inline Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, shared_bytes};
}

}  // namespace neoxemu

// ---- cooperative_groups::this_cluster ---------------------------------------------------------

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return static_cast<unsigned>(neoxemu::current_block->rank()); }
  unsigned num_blocks() const { return static_cast<unsigned>(neoxemu::current_block->cluster().size()); }
  void barrier_arrive() const { neoxemu::current_block->cluster_arrive(); }
  void barrier_wait() const { neoxemu::current_block->cluster_wait(); }
  void sync() const {
    barrier_arrive();
    barrier_wait();
  }
  // p: this block's dynamic shared memory; the same offset in block `rank`'s.
  template <typename T>
  T* map_shared_rank(T* p, int rank) const {
    neoxemu::Block& block = *neoxemu::current_block;
    const char* bytes = reinterpret_cast<const char*>(p);
    if (bytes < block.shared() || bytes >= block.shared() + block.shared_bytes() || rank < 0 ||
        rank >= block.cluster().size()) {
      block.fail("map_shared_rank of memory outside this block's dynamic shared memory, or of a rank outside the cluster");
    }
    return reinterpret_cast<T*>(block.cluster().shared(rank) + (bytes - block.shared()));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- the CUDA runtime API the launchers call ---------------------------------------------------
// The C functions (declared by the real cuda_runtime_api.h, which cuda_fp16.h includes) are
// defined in neoxemu.cc; here, the C++ templates of cuda_runtime.h that take a kernel itself.

template <typename... Params>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*kernel)(Params...)) {
  return cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(kernel));
}
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}
template <typename... Params>
inline cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, void (*kernel)(Params...), const cudaLaunchConfig_t* config) {
  return cudaOccupancyMaxActiveClusters(clusters, reinterpret_cast<const void*>(kernel), config);
}

namespace neoxemu {
inline int cluster_size_of(const cudaLaunchConfig_t& config) {
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    if (config.attrs[i].id == cudaLaunchAttributeClusterDimension) return static_cast<int>(config.attrs[i].val.clusterDim.x);
  }
  return 1;
}
inline bool pdl_of(const cudaLaunchConfig_t& config) {
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    if (config.attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization) {
      return config.attrs[i].val.programmaticStreamSerializationAllowed != 0;
    }
  }
  return false;
}
}  // namespace neoxemu

template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  const neoxemu::Grid grid{config->gridDim.x, config->blockDim, config->dynamicSmemBytes, neoxemu::cluster_size_of(*config),
                           neoxemu::pdl_of(*config)};
  return neoxemu::launch_kernel(kernel, config->gridDim, grid, std::forward<Args>(args)...);
}
