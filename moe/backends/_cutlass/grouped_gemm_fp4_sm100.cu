// SM100 block-scaled FP4 grouped GEMMs for the cutlass_fp4 backend: D_g = (A_g, SFA_g) @ (B_g, SFB_g)^T per
// group, A and B in e2m1 (two a byte), D in bf16, fp32 accumulation, one instantiation per format:
//   nvfp4: e4m3 (ue4m3) scale factors per 16 values;  mxfp4: UE8M0 scale factors per 32 values.
// CUTLASS 3.x pointer-array grouped GEMM on tcgen05 (1-SM MMA, TMA, warp-specialized). The scale factors are
// in the SM100 block-scaled layout that moe/backends/cutlass_fp4.py builds (swizzle_scales); their per-group
// CuTe layouts (InternalLayoutSFA/SFB) come as device arrays.
// State: compiled for sm_100a only (no SM100 GPU here); no binding, never run.

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

namespace moe_cutlass {
namespace {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignmentAB = 32;  // 16 bytes of e2m1
constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;
using MmaTile = Shape<_128, _256, _256>;
using Cluster = Shape<_1, _1, _1>;

template <class ElementAB, class KernelSchedule>
struct Fp4Grouped {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignmentD, ElementD,
      LayoutD*, kAlignmentD, cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementAB, LayoutA*, kAlignmentAB,
      ElementAB, LayoutB*, kAlignmentAB, float, MmaTile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Mainloop = typename Kernel::CollectiveMainloop;
  using ElementData = typename Mainloop::ElementA;
  using ElementSF = typename Mainloop::ElementSF;
};

using Nvfp4 = Fp4Grouped<cutlass::nv_float4_t<cutlass::float_e2m1_t>,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmNvf4Sm100>;
using Mxfp4 = Fp4Grouped<cutlass::mx_float4_t<cutlass::float_e2m1_t>,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmMxf4Sm100>;

template <class G>
const char* run(int groups, void* problem_sizes, void* ptr_a, void* ld_a, void* ptr_b, void* ld_b, void* ptr_sfa,
                void* layout_sfa, void* ptr_sfb, void* layout_sfb, void* ptr_d, void* ld_d, int device, int sm_count,
                void* workspace, cudaStream_t stream) {
  using Gemm = typename G::Gemm;
  using Kernel = typename G::Kernel;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(problem_sizes), nullptr},
      {reinterpret_cast<const typename G::ElementData**>(ptr_a),
       reinterpret_cast<typename Kernel::InternalStrideA*>(ld_a),
       reinterpret_cast<const typename G::ElementData**>(ptr_b),
       reinterpret_cast<typename Kernel::InternalStrideB*>(ld_b),
       reinterpret_cast<const typename G::ElementSF**>(ptr_sfa),
       reinterpret_cast<typename G::Mainloop::InternalLayoutSFA*>(layout_sfa),
       reinterpret_cast<const typename G::ElementSF**>(ptr_sfb),
       reinterpret_cast<typename G::Mainloop::InternalLayoutSFB*>(layout_sfb)},
      {{}, nullptr, nullptr, reinterpret_cast<ElementD**>(ptr_d),
       reinterpret_cast<typename Kernel::InternalStrideD*>(ld_d)},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "cannot implement";
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "launch failed";
  return nullptr;
}

}  // namespace

// The two instantiations the backend launches (compiled and symbol-checked; not yet bound or run).
const char* grouped_gemm_nvfp4_sm100(int groups, void* problem_sizes, void* ptr_a, void* ld_a, void* ptr_b,
                                     void* ld_b, void* ptr_sfa, void* layout_sfa, void* ptr_sfb, void* layout_sfb,
                                     void* ptr_d, void* ld_d, int device, int sm_count, void* workspace,
                                     cudaStream_t stream) {
  return run<Nvfp4>(groups, problem_sizes, ptr_a, ld_a, ptr_b, ld_b, ptr_sfa, layout_sfa, ptr_sfb, layout_sfb,
                    ptr_d, ld_d, device, sm_count, workspace, stream);
}

const char* grouped_gemm_mxfp4_sm100(int groups, void* problem_sizes, void* ptr_a, void* ld_a, void* ptr_b,
                                     void* ld_b, void* ptr_sfa, void* layout_sfa, void* ptr_sfb, void* layout_sfb,
                                     void* ptr_d, void* ld_d, int device, int sm_count, void* workspace,
                                     cudaStream_t stream) {
  return run<Mxfp4>(groups, problem_sizes, ptr_a, ld_a, ptr_b, ld_b, ptr_sfa, layout_sfa, ptr_sfb, layout_sfb,
                    ptr_d, ld_d, device, sm_count, workspace, stream);
}

}  // namespace moe_cutlass
