// What the SM90 grouped GEMM translation units share: the packed-argument checks, the hardware info and the
// can_implement / initialize / run sequence. Include after the CUTLASS headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.h"

#include "grouped_gemm.h"

namespace moe_cutlass::common {

// The host side passes each group's leading dimension as one int64 (the other modes are static) and each
// problem shape as three int32.
template <class GemmKernel, class ProblemShape>
constexpr bool packed_arguments() {
  static_assert(sizeof(typename GemmKernel::InternalStrideA) == sizeof(int64_t) &&
                    sizeof(typename GemmKernel::InternalStrideB) == sizeof(int64_t) &&
                    sizeof(typename GemmKernel::InternalStrideD) == sizeof(int64_t),
                "packed strides must be one int64 each");
  static_assert(sizeof(typename ProblemShape::UnderlyingProblemShape) == 3 * sizeof(int),
                "problem shapes must be three int32 each");
  return true;
}

inline cutlass::KernelHardwareInfo hardware(const GroupedGemmArgs& a) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = a.device;
  hw.sm_count = a.sm_count;
  return hw;
}

// nullptr on success, else why it did not run (`cannot`: what the kernel needs, when can_implement refuses)
template <class Gemm>
const char* run(const typename Gemm::Arguments& args, void* workspace, cudaStream_t stream, const char* cannot) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    return cannot;
  }
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
    return "CUTLASS grouped GEMM: initialize failed";
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    return "CUTLASS grouped GEMM: launch failed";
  }
  return nullptr;
}

}  // namespace moe_cutlass::common
