// torch glue of the cutlass backend's grouped GEMMs (the CUTLASS code: grouped_gemm_sm90.cu, bf16;
// grouped_gemm_fp8_sm90.cu, fp8_block).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include "grouped_gemm.h"

namespace {

void check_array(const at::Tensor& t, const char* name, int64_t groups) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == groups &&
                  t.is_contiguous(),
              name, ": expected a contiguous CUDA int64 tensor of ", groups, " values, got ", t.scalar_type(),
              " of shape ", t.sizes());
}

void grouped_gemm_bf16(const at::Tensor& problem_sizes, const at::Tensor& ptr_a, const at::Tensor& ptr_b,
                       const at::Tensor& ptr_d, const at::Tensor& ld_a, const at::Tensor& ld_b,
                       const at::Tensor& ld_d) {
  TORCH_CHECK(problem_sizes.is_cuda() && problem_sizes.scalar_type() == at::kInt && problem_sizes.dim() == 2 &&
                  problem_sizes.size(1) == 3 && problem_sizes.is_contiguous(),
              "problem_sizes: expected a contiguous CUDA int32 [groups, 3] tensor, got ",
              problem_sizes.scalar_type(), " of shape ", problem_sizes.sizes());
  const int64_t groups = problem_sizes.size(0);
  check_array(ptr_a, "ptr_a", groups);
  check_array(ptr_b, "ptr_b", groups);
  check_array(ptr_d, "ptr_d", groups);
  check_array(ld_a, "ld_a", groups);
  check_array(ld_b, "ld_b", groups);
  check_array(ld_d, "ld_d", groups);
  const int device = problem_sizes.get_device();
  moe_cutlass::GroupedGemmArgs args{static_cast<int>(groups), problem_sizes.data_ptr(), ptr_a.data_ptr(),
                                    ptr_b.data_ptr(), ptr_d.data_ptr(), ld_a.data_ptr(), ld_b.data_ptr(),
                                    ld_d.data_ptr(), device,
                                    at::cuda::getDeviceProperties(device)->multiProcessorCount};
  const size_t bytes = moe_cutlass::grouped_gemm_bf16_sm90_workspace(args);
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, problem_sizes.options().dtype(at::kByte));
  const char* err = moe_cutlass::grouped_gemm_bf16_sm90(args, workspace.data_ptr(),
                                                        at::cuda::getCurrentCUDAStream(device));
  TORCH_CHECK(err == nullptr, err);
}

void grouped_gemm_fp8_block(const at::Tensor& problem_sizes, const at::Tensor& ptr_a, const at::Tensor& ptr_b,
                            const at::Tensor& ptr_d, const at::Tensor& ld_a, const at::Tensor& ld_b,
                            const at::Tensor& ld_d, const at::Tensor& ptr_sfa, const at::Tensor& ptr_sfb) {
  TORCH_CHECK(problem_sizes.is_cuda() && problem_sizes.scalar_type() == at::kInt && problem_sizes.dim() == 2 &&
                  problem_sizes.size(1) == 3 && problem_sizes.is_contiguous(),
              "problem_sizes: expected a contiguous CUDA int32 [groups, 3] tensor, got ",
              problem_sizes.scalar_type(), " of shape ", problem_sizes.sizes());
  const int64_t groups = problem_sizes.size(0);
  check_array(ptr_a, "ptr_a", groups);
  check_array(ptr_b, "ptr_b", groups);
  check_array(ptr_d, "ptr_d", groups);
  check_array(ld_a, "ld_a", groups);
  check_array(ld_b, "ld_b", groups);
  check_array(ld_d, "ld_d", groups);
  check_array(ptr_sfa, "ptr_sfa", groups);
  check_array(ptr_sfb, "ptr_sfb", groups);
  const int device = problem_sizes.get_device();
  auto bytes = problem_sizes.options().dtype(at::kByte);
  auto layouts = at::empty({static_cast<int64_t>(moe_cutlass::grouped_gemm_fp8_block_sm90_layout_bytes(
                               static_cast<int>(groups)))}, bytes);
  moe_cutlass::GroupedGemmFp8BlockArgs args{
      {static_cast<int>(groups), problem_sizes.data_ptr(), ptr_a.data_ptr(), ptr_b.data_ptr(), ptr_d.data_ptr(),
       ld_a.data_ptr(), ld_b.data_ptr(), ld_d.data_ptr(), device,
       at::cuda::getDeviceProperties(device)->multiProcessorCount},
      ptr_sfa.data_ptr(), ptr_sfb.data_ptr(), layouts.data_ptr()};
  auto workspace = at::empty({static_cast<int64_t>(moe_cutlass::grouped_gemm_fp8_block_sm90_workspace(args))}, bytes);
  const char* err = moe_cutlass::grouped_gemm_fp8_block_sm90(args, workspace.data_ptr(),
                                                             at::cuda::getCurrentCUDAStream(device));
  TORCH_CHECK(err == nullptr, err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_gemm_bf16", &grouped_gemm_bf16,
        "D_g = A_g @ B_g^T per group (bf16, SM90); problem sizes, addresses and leading dimensions as device arrays");
  m.def("grouped_gemm_fp8_block", &grouped_gemm_fp8_block,
        "D_g = (A_g x SFA_g) @ (B_g x SFB_g)^T per group (e4m3 with 1x128 / 128x128 fp32 scales, bf16 out, SM90)");
}
