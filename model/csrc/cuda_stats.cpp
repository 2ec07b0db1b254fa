// The CUDA caching allocator's statistics (what torch.cuda.max_memory_reserved
// and max_memory_allocated read), for benches that compare with PyTorch
// programs on the same terms. Compiled only where libtorch has CUDA.
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>

namespace {

c10::CachingDeviceAllocator::DeviceStats stats(int device) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
}

constexpr size_t kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

extern "C" {

// Peak bytes reserved (held from the driver) on `device`; -1 on error.
int64_t rlhf_cuda_peak_reserved(int device) {
  try {
    return stats(device).reserved_bytes[kAll].peak;
  } catch (...) {
    return -1;
  }
}

// Peak bytes allocated to tensors on `device`; -1 on error.
int64_t rlhf_cuda_peak_allocated(int device) {
  try {
    return stats(device).allocated_bytes[kAll].peak;
  } catch (...) {
    return -1;
  }
}

// Gives the cached blocks no tensor uses back to the driver.
int rlhf_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts the peaks over from what is held now.
int rlhf_cuda_reset_peaks(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
