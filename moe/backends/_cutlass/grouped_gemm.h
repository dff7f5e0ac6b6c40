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

// fp8 with scales in the K loop (grouped_gemm_fp8_sm90.cu): the GEMM's arrays, each group's scale addresses,
// the rows of B one scale covers, and device scratch of grouped_gemm_fp8_sm90_layout_bytes(groups, scale_n)
// bytes where the per-group scale layouts are written
struct GroupedGemmFp8Args {
  GroupedGemmArgs gemm;  // A and B e4m3, D bf16
  void* ptr_sfa;         // device [groups] int64 addresses of SFA_g ([M_g, K/128] fp32 row-major)
  void* ptr_sfb;         // device [groups] int64 addresses of SFB_g ([N/scale_n, K/128] fp32 row-major)
  int scale_n;           // 128 (block scales) or 1 (one scale per row of B)
  void* layouts;         // device scratch for the scale layouts
};

size_t grouped_gemm_bf16_sm90_workspace(const GroupedGemmArgs& args);
// nullptr on success, else why it did not run
const char* grouped_gemm_bf16_sm90(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

size_t grouped_gemm_fp8_sm90_layout_bytes(int groups, int scale_n);
size_t grouped_gemm_fp8_sm90_workspace(const GroupedGemmFp8Args& args);
const char* grouped_gemm_fp8_sm90(const GroupedGemmFp8Args& args, void* workspace, cudaStream_t stream);

}  // namespace moe_cutlass
