// SM90 FP8 grouped GEMMs with scales applied in the K loop for the cutlass backend: D_g = (A_g x SFA_g) @
// (B_g x SFB_g)^T per group, e4m3 inputs, fp32 accumulation (CUTLASS's pointer-array blockwise-scaled
// mainloop), bf16 output. Two instantiations, by the rows of B one scale covers (`scale_n`):
//   128: fp8_block (DeepSeek-V3's 128x128 weight blocks), and fp8_tensor with its scales written as blocks
//   1:   fp8_channel (one weight scale per output row, written once per 128 columns)
//   A_g: [M_g, K] e4m3 row-major, SFA_g [M_g, K/128] fp32 row-major (one scale per row and 128 columns: the
//        dynamic 1x128 groups of moe.kernels.quant, or a row's or the tensor's scale repeated; K-major)
//   B_g: [N, K] e4m3 row-major (a weight [E, N, K] slice), SFB_g [N/scale_n, K/128] fp32 row-major
//   D_g: [M_g, N] bf16 row-major
// The per-group scale layouts depend on M_g, which lives on the device: a setup kernel writes them from the
// problem sizes before the GEMM, so nothing waits on the host. No torch headers (binding.cpp is the glue).

#include <cstdint>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "gemm_common.h"
#include "grouped_gemm.h"

namespace moe_cutlass {
namespace {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using ElementAB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using Accumulator = float;  // the blockwise mainloop needs the scales in the accumulator's type
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;  // B^T is [K, N] column-major: our [N, K] row-major weight
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignmentAB = 128 / cutlass::sizeof_bits<ElementAB>::value;  // 16 bytes: 16 elements
constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;

using TileShape = Shape<_128, _128, _128>;  // one 128-deep K step is one scale block
using ClusterShape = Shape<_1, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8BlockScaledAccum;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

using Fp8Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
    void, LayoutD*, kAlignmentD,  // no source operand (C)
    ElementD, LayoutD*, kAlignmentD, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, Accumulator>>::CollectiveOp;
// the epilogue's shared memory, which the mainloop's stage count leaves free (a namespace-scope constant: GCC
// rejects the sizeof inside the class template below)
constexpr int kEpilogueSmem = static_cast<int>(sizeof(typename Fp8Epilogue::SharedStorage));

// one GEMM type per weight-scale granularity along N (rows of B per scale); A: one scale per row and 128
// columns; both K-major (our row-major scales)
template <int ScaleN>
struct Fp8Gemm {
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, ScaleN, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using Fp8Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA*, LayoutSFA*>,
      kAlignmentAB, ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignmentAB, Accumulator, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmem>, KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Fp8Mainloop, Fp8Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static_assert(common::packed_arguments<GemmKernel, ProblemShape>());

  static LayoutSFA* sfa_layouts(const GroupedGemmFp8Args& a) { return reinterpret_cast<LayoutSFA*>(a.layouts); }

  static LayoutSFB* sfb_layouts(const GroupedGemmFp8Args& a) {
    return reinterpret_cast<LayoutSFB*>(static_cast<char*>(a.layouts) + a.gemm.groups * sizeof(LayoutSFA));
  }

  static size_t layout_bytes(int groups) {
    return static_cast<size_t>(groups) * (sizeof(LayoutSFA) + sizeof(LayoutSFB));
  }

  static typename Gemm::Arguments arguments(const GroupedGemmFp8Args& a) {
    const GroupedGemmArgs& g = a.gemm;
    const cutlass::KernelHardwareInfo hw = common::hardware(g);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {g.groups, reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(g.problem_sizes), nullptr},
        {reinterpret_cast<const ElementAB**>(g.ptr_a), reinterpret_cast<StrideA*>(g.ld_a),
         reinterpret_cast<const ElementAB**>(g.ptr_b), reinterpret_cast<StrideB*>(g.ld_b),
         reinterpret_cast<const Accumulator**>(a.ptr_sfa), sfa_layouts(a),
         reinterpret_cast<const Accumulator**>(a.ptr_sfb), sfb_layouts(a)},
        {{}, nullptr, nullptr, reinterpret_cast<ElementD**>(g.ptr_d), reinterpret_cast<StrideD*>(g.ld_d)},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }
};

// each group's scale layouts from its (M_g, N, K): the layouts CUTLASS expects for packed row-major scales
template <int ScaleN>
__global__ void fill_scale_layouts(const int* problem_sizes, int groups, typename Fp8Gemm<ScaleN>::LayoutSFA* sfa,
                                   typename Fp8Gemm<ScaleN>::LayoutSFB* sfb) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) {
    return;
  }
  using Config = typename Fp8Gemm<ScaleN>::ScaleConfig;
  const int m = problem_sizes[3 * g], n = problem_sizes[3 * g + 1], k = problem_sizes[3 * g + 2];
  sfa[g] = Config::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
  sfb[g] = Config::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
}

template <int ScaleN>
const char* run_fp8(const GroupedGemmFp8Args& a, void* workspace, cudaStream_t stream) {
  using G = Fp8Gemm<ScaleN>;
  const int groups = a.gemm.groups;
  fill_scale_layouts<ScaleN><<<(groups + 127) / 128, 128, 0, stream>>>(
      static_cast<const int*>(a.gemm.problem_sizes), groups, G::sfa_layouts(a), G::sfb_layouts(a));
  if (cudaGetLastError() != cudaSuccess) {
    return "CUTLASS fp8 grouped GEMM: the scale-layout kernel did not launch";
  }
  return common::run<typename G::Gemm>(G::arguments(a), workspace, stream,
                                       "CUTLASS cannot implement this fp8 grouped GEMM (K and N must be multiples "
                                       "of 128)");
}

}  // namespace

// the instantiations: scale_n is 128 (block scales) or 1 (one scale per row of B); binding.cpp checks it
size_t grouped_gemm_fp8_sm90_layout_bytes(int groups, int scale_n) {
  return scale_n == 1 ? Fp8Gemm<1>::layout_bytes(groups) : Fp8Gemm<128>::layout_bytes(groups);
}

size_t grouped_gemm_fp8_sm90_workspace(const GroupedGemmFp8Args& a) {
  return a.scale_n == 1 ? Fp8Gemm<1>::Gemm::get_workspace_size(Fp8Gemm<1>::arguments(a))
                        : Fp8Gemm<128>::Gemm::get_workspace_size(Fp8Gemm<128>::arguments(a));
}

const char* grouped_gemm_fp8_sm90(const GroupedGemmFp8Args& a, void* workspace, cudaStream_t stream) {
  if (a.scale_n != 1 && a.scale_n != 128) {
    return "CUTLASS fp8 grouped GEMM: scale_n must be 1 or 128";
  }
  return a.scale_n == 1 ? run_fp8<1>(a, workspace, stream) : run_fp8<128>(a, workspace, stream);
}

}  // namespace moe_cutlass
