// SM90 grouped GEMM for the cutlass backend: D_g = A_g @ B_g^T for every group g (one group per expert),
// bf16 inputs and output, fp32 accumulation. CUTLASS 3.x pointer-array grouped GEMM: TMA loads,
// warp-specialized cooperative kernel, persistent group tile scheduler. Problem shapes, pointers and leading
// dimensions come as device arrays (built on the device by moe/kernels/grouped.py), so a launch needs no host
// synchronization and can be captured in a CUDA graph.
//   A_g: [M_g, K] row-major (K contiguous)    B_g: [N, K] row-major (a weight [E, N, K] slice)
//   D_g: [M_g, N] row-major
// No torch headers here: binding.cpp holds the torch glue, so this file compiles with nvcc alone.

#include <cstdint>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
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
using Element = cutlass::bfloat16_t;
using Accumulator = float;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;  // B^T is [K, N] column-major: our [N, K] row-major weight
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte accesses: 8 elements

using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _2, _1>;
using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
    void, LayoutD*, kAlignment,  // no source operand (C): D = A @ B^T
    Element, LayoutD*, kAlignment, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<Element, Accumulator>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
    kAlignment, Accumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideD = typename GemmKernel::InternalStrideD;
static_assert(common::packed_arguments<GemmKernel, ProblemShape>());

typename Gemm::Arguments make_arguments(const GroupedGemmArgs& a) {
  const cutlass::KernelHardwareInfo hw = common::hardware(a);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {a.groups, reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(a.problem_sizes), nullptr},
      {reinterpret_cast<const Element**>(a.ptr_a), reinterpret_cast<StrideA*>(a.ld_a),
       reinterpret_cast<const Element**>(a.ptr_b), reinterpret_cast<StrideB*>(a.ld_b)},
      {{}, nullptr, nullptr, reinterpret_cast<Element**>(a.ptr_d), reinterpret_cast<StrideD*>(a.ld_d)},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

}  // namespace

size_t grouped_gemm_bf16_sm90_workspace(const GroupedGemmArgs& a) {
  return Gemm::get_workspace_size(make_arguments(a));
}

const char* grouped_gemm_bf16_sm90(const GroupedGemmArgs& a, void* workspace, cudaStream_t stream) {
  return common::run<Gemm>(make_arguments(a), workspace, stream,
                           "CUTLASS cannot implement this grouped GEMM (K and N must be multiples of 8)");
}

}  // namespace moe_cutlass
