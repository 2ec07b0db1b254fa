// CUDA graphs for the decode step: libtorch's at::cuda::CUDAGraph behind a
// C interface. Rust issues the step's ops between `begin` and `end` (they
// are recorded, not run) and replays the graph each step. Work between
// `enter` and `leave` goes to a side stream of the graph's own (capture
// needs a stream other than the default one); `leave` waits for it. Every function catches C++ exceptions and reports
// them as a malloc'd message (freed with rlhf_graph_free_error).
// Compiled only where libtorch has CUDA.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

struct Graph {
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  // Set between enter and leave: the stream and device to go back to.
  std::optional<c10::cuda::CUDAStream> caller;
  c10::DeviceIndex caller_device = 0;

  explicit Graph(c10::DeviceIndex d)
      : device(d), graph(/*keep_graph=*/false), side(c10::cuda::getStreamFromPool(false, d)) {}
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
    // The side stream starts after everything queued so far (a device-wide
    // sync: once per capture, and the decode loop syncs every step anyway;
    // an event would need the CUDA runtime linked directly).
    c10::cuda::device_synchronize();
    g->caller = c10::cuda::getCurrentCUDAStream(g->device);
    c10::cuda::setCurrentCUDAStream(g->side);
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

// Ends the recording and instantiates the graph.
int rlhf_graph_end(void* p, char** err) {
  auto* g = static_cast<Graph*>(p);
  return guarded(err, [&] { g->graph.capture_end(); });
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
