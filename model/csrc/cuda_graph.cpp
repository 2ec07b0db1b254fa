// CUDA graphs for the decode step: libtorch's at::cuda::CUDAGraph behind a
// C interface. Rust issues the step's ops between `begin` and `end` (they
// are recorded, not run) and replays the graph each step. Work between
// `enter` and `leave` goes to a side stream of the graph's own (capture
// needs a stream other than the default one); `leave` waits for it. Every function catches C++ exceptions and reports
// them as a malloc'd message (freed with rlhf_graph_free_error).
// Compiled only where libtorch has CUDA.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

// A CUDAGraph that can be abandoned after a failed capture.
struct Recorder : at::cuda::CUDAGraph {
  Recorder() : at::cuda::CUDAGraph(/*keep_graph=*/false) {}

  // What capture_end leaves undone when the capture failed before it ended
  // (an op a capture does not allow invalidated it, and cudaStreamEndCapture
  // threw): the caching allocator stops routing allocations to the graph's
  // pool and releases it (else, among other things, it never frees its
  // cache to retry an allocation that ran out of memory), and the random
  // generators leave capture mode (else every later CUDA random op throws).
  // PyTorch leaves these as they are (see CUDAGraph::reset).
  void abandon() noexcept {
    if (capture_ended_ || capture_dev_ == UNDEFINED_DEVICE) return;
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(capture_dev_, mempool_id_);
    } catch (...) {
    }
    // (capture_epilogue, which would do this, is not exported.)
    for (auto& entry : captured_generator_states_) entry.first->capturing_ = false;
    try {
      c10::cuda::CUDACachingAllocator::releasePool(capture_dev_, mempool_id_);
    } catch (...) {
    }
    capture_dev_ = UNDEFINED_DEVICE;
  }
};

// One side stream per device for the process: libtorch gives every
// (cuBLAS handle, stream) pair a workspace it never frees, so a fresh pool
// stream per graph would leave 32 MiB behind each time.
c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex lock;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> held(lock);
  auto it = streams.find(device);
  if (it == streams.end()) {
    it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  }
  return it->second;
}

struct Graph {
  c10::DeviceIndex device;
  Recorder graph;
  c10::cuda::CUDAStream side;
  // Set between enter and leave: the stream and device to go back to.
  std::optional<c10::cuda::CUDAStream> caller;
  c10::DeviceIndex caller_device = 0;

  explicit Graph(c10::DeviceIndex d) : device(d), side(side_stream(d)) {}
};

template <class F>
int guarded(char** err, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err) *err = strdup(e.what());
  } catch (...) {
    if (err) *err = strdup("unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

// A graph for GPU `device`, empty until captured; null (and *err) on error.
void* rlhf_graph_new(int device, char** err) {
  Graph* g = nullptr;
  guarded(err, [&] {
    if (device < 0 || device >= c10::cuda::device_count()) {
      throw std::runtime_error("no CUDA device " + std::to_string(device));
    }
    g = new Graph(static_cast<c10::DeviceIndex>(device));
  });
  return g;
}

// Makes the graph's side stream (and its device) this thread's current
// one, after the work queued so far.
int rlhf_graph_enter(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, [&] {
    if (g->caller) throw std::runtime_error("rlhf_graph_enter: already entered");
    g->caller_device = c10::cuda::current_device();
    c10::cuda::set_device(g->device);
    try {
      // The side stream starts after everything queued so far (a
      // device-wide sync: once per capture, and the decode loop syncs every
      // step anyway; an event would need the CUDA runtime linked directly).
      c10::cuda::device_synchronize();
      g->caller = c10::cuda::getCurrentCUDAStream(g->device);
      c10::cuda::setCurrentCUDAStream(g->side);
    } catch (...) {
      g->caller.reset();
      c10::cuda::set_device(g->caller_device);
      throw;
    }
  });
}

// Back to the caller's stream and device, after the side stream's work.
int rlhf_graph_leave(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, [&] {
    if (!g->caller) return;
    auto caller = *g->caller;
    g->caller.reset();
    c10::cuda::setCurrentCUDAStream(caller);
    c10::cuda::device_synchronize();
    c10::cuda::set_device(g->caller_device);
  });
}

// Starts recording this thread's work on the side stream (call after enter).
// Thread-local mode: other threads' CUDA calls (NCCL, the server) go on.
int rlhf_graph_begin(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, [&] { g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal); });
}

// Ends the recording and instantiates the graph; if the capture failed,
// undoes what it set up (the graph is then only fit to be freed).
int rlhf_graph_end(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  int rc = guarded(err, [&] { g->graph.capture_end(); });
  if (rc != 0) g->graph.abandon();
  return rc;
}

// Runs the recorded work on the current stream.
int rlhf_graph_replay(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, [&] { g->graph.replay(); });
}

// Frees the graph (its memory pool goes back to the caching allocator).
void rlhf_graph_free(void* p) {
  try {
    delete static_cast<Graph*>(p);
  } catch (...) {
  }
}

void rlhf_graph_free_error(char* err) { free(err); }

}  // extern "C"
