// The plain-C++ interface between the CUTLASS translation unit and the torch binding.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace moe_cutlass {

struct GroupedGemmArgs {
  int groups;
  void* problem_sizes;  // device [groups, 3] int32: (M_g, N, K)
  void* ptr_a;          // device [groups] int64 addresses of A_g
  void* ptr_b;          // device [groups] int64 addresses of B_g
  void* ptr_d;          // device [groups] int64 addresses of D_g
  void* ld_a;           // device [groups] int64 leading dimensions (elements)
  void* ld_b;
  void* ld_d;
  int device;
  int sm_count;
};

size_t grouped_gemm_bf16_sm90_workspace(const GroupedGemmArgs& args);
// nullptr on success, else why it did not run
const char* grouped_gemm_bf16_sm90(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

}  // namespace moe_cutlass
