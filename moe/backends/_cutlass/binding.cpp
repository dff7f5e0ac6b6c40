// torch glue of the cutlass backend's grouped GEMMs (the CUTLASS code: grouped_gemm_sm90.cu, bf16;
// grouped_gemm_fp8_sm90.cu, fp8 with scales in the K loop).
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

// the arrays every grouped GEMM takes, checked, as the plain-C++ arguments
moe_cutlass::GroupedGemmArgs gemm_args(const at::Tensor& problem_sizes, const at::Tensor& ptr_a,
                                       const at::Tensor& ptr_b, const at::Tensor& ptr_d, const at::Tensor& ld_a,
                                       const at::Tensor& ld_b, const at::Tensor& ld_d) {
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
  return {static_cast<int>(groups), problem_sizes.data_ptr(), ptr_a.data_ptr(), ptr_b.data_ptr(), ptr_d.data_ptr(),
          ld_a.data_ptr(), ld_b.data_ptr(), ld_d.data_ptr(), device,
          at::cuda::getDeviceProperties(device)->multiProcessorCount};
}

at::Tensor bytes_on(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void grouped_gemm_bf16(const at::Tensor& problem_sizes, const at::Tensor& ptr_a, const at::Tensor& ptr_b,
                       const at::Tensor& ptr_d, const at::Tensor& ld_a, const at::Tensor& ld_b,
                       const at::Tensor& ld_d) {
  const auto args = gemm_args(problem_sizes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d);
  auto workspace = bytes_on(problem_sizes, moe_cutlass::grouped_gemm_bf16_sm90_workspace(args));
  const char* err = moe_cutlass::grouped_gemm_bf16_sm90(args, workspace.data_ptr(),
                                                        at::cuda::getCurrentCUDAStream(args.device));
  TORCH_CHECK(err == nullptr, err);
}

void grouped_gemm_fp8(const at::Tensor& problem_sizes, const at::Tensor& ptr_a, const at::Tensor& ptr_b,
                      const at::Tensor& ptr_d, const at::Tensor& ld_a, const at::Tensor& ld_b, const at::Tensor& ld_d,
                      const at::Tensor& ptr_sfa, const at::Tensor& ptr_sfb, int64_t scale_n) {
  TORCH_CHECK(scale_n == 1 || scale_n == 128, "scale_n: expected 1 (a scale per row of B) or 128 (blocks), got ",
              scale_n);
  const auto gemm = gemm_args(problem_sizes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d);
  check_array(ptr_sfa, "ptr_sfa", gemm.groups);
  check_array(ptr_sfb, "ptr_sfb", gemm.groups);
  const int n = static_cast<int>(scale_n);
  auto layouts = bytes_on(problem_sizes, moe_cutlass::grouped_gemm_fp8_sm90_layout_bytes(gemm.groups, n));
  const moe_cutlass::GroupedGemmFp8Args args{gemm, ptr_sfa.data_ptr(), ptr_sfb.data_ptr(), n, layouts.data_ptr()};
  auto workspace = bytes_on(problem_sizes, moe_cutlass::grouped_gemm_fp8_sm90_workspace(args));
  const char* err = moe_cutlass::grouped_gemm_fp8_sm90(args, workspace.data_ptr(),
                                                       at::cuda::getCurrentCUDAStream(gemm.device));
  TORCH_CHECK(err == nullptr, err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_gemm_bf16", &grouped_gemm_bf16,
        "D_g = A_g @ B_g^T per group (bf16, SM90); problem sizes, addresses and leading dimensions as device arrays");
  m.def("grouped_gemm_fp8", &grouped_gemm_fp8,
        "D_g = (A_g x SFA_g) @ (B_g x SFB_g)^T per group (e4m3, fp32 scales per 1x128 of A and per scale_n x 128 "
        "of B (scale_n 128 or 1), bf16 out, SM90)");
}
