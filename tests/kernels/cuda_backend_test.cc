// The CUDA backend against the float64 reference and the CPU backend (docs/design.md section 4).
// CudaBackendTest.* need a GPU and skip without one; CudaBuildTest.* runs everywhere. The
// device element math on the host: cuda_math_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tests/kernels/cuda_test_util.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"

#ifdef LOSSD_HAVE_CUDA
#include <cuda_runtime.h>

#include "../cuda/cuda_kernels.h"
#endif

namespace lossd::kernels {
namespace {

using namespace cuda_test;  // the helpers of tests/kernels/cuda_test_util.h

// ---- Runs everywhere ---------------------------------------------------------------------

TEST(CudaBuildTest, CompiledAndFailedPreconditionWithoutDevice) {
#ifdef LOSSD_HAVE_CUDA
  EXPECT_TRUE(CudaCompiled()) << "CUDA build without the CUDA backend";
#else
  EXPECT_FALSE(CudaCompiled());
#endif
  if (CudaDeviceCount() == 0) {
    auto b = MakeCudaBackend();
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition) << b.status();
    if (CudaCompiled()) {
      EXPECT_NE(b.status().message().find("no usable CUDA device: "), std::string::npos)
          << b.status();
    }
    EXPECT_EQ(CudaDeviceName(), "");
  } else {
    auto b = MakeCudaBackend();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->Name(), "cuda");
    EXPECT_FALSE(CudaDeviceName().empty());
  }
}

// ---- Need a GPU ----------------------------------------------------------------------------

// Every backend test runs with both element maths of the fused kernel for float and half
// inputs (CudaOptions::float_math false and true): "Cuda/CudaBackendTest.<test>/MixedMath" and
// ".../FloatMath".
// Each is skipped without a CUDA device (SetUp).
class CudaBackendTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
  bool float_math() const { return GetParam(); }
  std::unique_ptr<Backend> Cuda() const { return cuda_test::Cuda(float_math()); }
};

INSTANTIATE_TEST_SUITE_P(Cuda, CudaBackendTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "FloatMath" : "MixedMath");
                         });

TEST_P(CudaBackendTest, Float32WithinFourUlpOfReference) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(3001, 37, 11, true);  // not a multiple of the block size
  BceArgs a = F32Args(pr, Reduction::kNone, {pr.c}, {pr.c});
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  const int64_t max_ulp = ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
  std::printf("float32 loss: max %lld ulp from the reference\n", static_cast<long long>(max_ulp));
}

TEST_P(CudaBackendTest, Float32SpecialValues) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  SpecialGrid g;
  const std::vector<float>&x = g.x, &y = g.y, &w = g.w, &p = g.p;
  const int64_t n = static_cast<int64_t>(x.size());
  BceArgs a;
  a.numel = n;
  a.logits = x.data();
  a.targets = y.data();
  // Full-shape weight and pos_weight: the vectorized full-operand path.
  a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {n}, {n});
  a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, p.data(), {n}, {n});
  for (Reduction r : {Reduction::kNone, Reduction::kMean}) {
    a.reduction = r;
    std::vector<float> l(n), gx(n), gy(n);
    ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
    ExpectMatchesReference(a, r == Reduction::kNone ? l.data() : nullptr, gx.data(), gy.data());
    if (r == Reduction::kMean) {
      EXPECT_TRUE(std::isnan(l[0]));  // NaN inputs poison the mean
    }
  }
  // Limits: x = +inf, y = 1 gives loss 0 and gradient 0 (torch gives NaN).
  const float xi = kInf, yi = 1.0f;
  BceArgs b;
  b.numel = 1;
  b.logits = &xi;
  b.targets = &yi;
  b.reduction = Reduction::kNone;
  float l1 = -1, g1 = -1;
  ASSERT_TRUE(cuda->Bce(b, {&l1, &g1, nullptr}).ok());
  EXPECT_EQ(l1, 0.0f);
  EXPECT_EQ(g1, 0.0f);
}

TEST_P(CudaBackendTest, Float32Broadcasting) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  // C = 36: a multiple of 4, so [C] operands load 4 values at once and [N,1] operands (inner
  // 36) give each group of 4 elements one value; C = 29 takes the general index path.
  for (int64_t c : {36, 29}) {
    F32Problem pr = MakeF32Problem(1237, c, 3, true);
    const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> shapes = {
        {{pr.rows, 1}, {pr.c}},  // weight [N,1], pos_weight [C]
        {{pr.c}, {pr.rows, 1}},  // weight [C], pos_weight [N,1]
        {{}, {1, pr.c}},         // scalar weight, pos_weight [1,C]
        {{1}, {pr.rows, 1}},     // weight [1], pos_weight [N,1]
    };
    for (const auto& [ws, ps] : shapes) {
      for (Reduction r : {Reduction::kNone, Reduction::kMean}) {
        BceArgs a = F32Args(pr, r, ws, ps);
        std::vector<float> l(r == Reduction::kNone ? pr.n : 1), gx(pr.n), gy(pr.n);
        ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
        // MEAN: the gradients (the loss of this data, with infinite logits, is not finite).
        ExpectMatchesReference(a, r == Reduction::kNone ? l.data() : nullptr, gx.data(),
                               gy.data());
      }
    }
  }
  F32Problem pr = MakeF32Problem(1237, 29, 3, true);
  // Absent weight and pos_weight.
  BceArgs a = F32Args(pr, Reduction::kNone, {pr.c}, {pr.c});
  a.weight = Operand{};
  a.pos_weight = Operand{};
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
  // float16 targets with float32 logits (exact in float32: same 4-ulp bound).
  std::vector<uint16_t> yh(pr.n);
  std::vector<float> yr(pr.n);
  for (int64_t i = 0; i < pr.n; ++i) {
    yh[i] = FloatToHalf(pr.y[i]);
    yr[i] = HalfToFloat(yh[i]);
  }
  a.targets_dtype = DType::kFloat16;
  a.targets = yh.data();
  ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
}

// A problem in any dtype: logits and targets stored in `dtype`, weight [C] in float32,
// pos_weight [C] in `dtype` (mixed operand dtypes).
struct TypedProblem {
  DType dtype;
  int64_t rows, c, n;
  std::vector<char> x, y, w, p;
  BceArgs args(Reduction r) const {
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = dtype;
    a.logits = x.data();
    a.targets = y.data();
    a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {c}, {rows, c});
    a.pos_weight = *MakeOperand("pos_weight", dtype, p.data(), {c}, {rows, c});
    a.reduction = r;
    return a;
  }
};

TypedProblem MakeTyped(DType dtype, int64_t rows, int64_t c, double xmax, double wmax,
                       uint64_t seed, bool specials_too = true) {
  TypedProblem pr{dtype, rows, c, rows * c, {}, {}, {}, {}};
  const size_t item = ItemSize(dtype);
  pr.x.resize(pr.n * item);
  pr.y.resize(pr.n * item);
  pr.w.resize(c * sizeof(float));
  pr.p.resize(c * item);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  const double specials[] = {0.0, -0.0, kInf, -kInf, kNaN, xmax, -xmax, 1e-3};
  for (int64_t i = 0; i < pr.n; ++i) {
    const double xv = specials_too && u(rng) < 0.03 ? specials[rng() % std::size(specials)]
                                    : xmax * (2 * u(rng) - 1) * std::pow(u(rng), 3);
    const double t = u(rng);
    StoreFromDouble(dtype, pr.x.data(), i, xv);
    StoreFromDouble(dtype, pr.y.data(), i, t < 0.4 ? 0.0 : t < 0.8 ? 1.0 : u(rng));
  }
  for (int64_t k = 0; k < c; ++k) {
    StoreFromDouble(DType::kFloat32, pr.w.data(), k, k % 7 == 0 ? 0.0 : wmax * u(rng));
    StoreFromDouble(dtype, pr.p.data(), k, k % 5 == 0 ? 0.0 : wmax * u(rng));
  }
  return pr;
}

// A SUM or MEAN loss of the CUDA backend: within 1e-6 relative of the reference and of the
// CPU backend's.
void ExpectReducedLossMatches(const BceArgs& a, float got, Backend& cpu) {
  double ref;
  ReferenceBce(a, &ref, nullptr, nullptr);
  EXPECT_LE(std::fabs(got - ref), 1e-6 * std::fabs(ref))
      << "n=" << a.numel << " " << got << " vs " << ref;
  float cpu_loss = 0;
  ASSERT_TRUE(cpu.Bce(a, {&cpu_loss, nullptr, nullptr}).ok());
  EXPECT_LE(std::fabs(static_cast<double>(got) - cpu_loss), 1e-6 * std::fabs(cpu_loss))
      << "n=" << a.numel << " cuda " << got << " cpu " << cpu_loss;
}

void CheckTyped(bool float_math, DType dtype, double xmax, double wmax) {
  auto cuda = cuda_test::Cuda(float_math);
  ASSERT_NE(cuda, nullptr);
  TypedProblem pr = MakeTyped(dtype, 2011, 23, xmax, wmax, 17);
  const size_t item = ItemSize(dtype);
  for (Reduction r : {Reduction::kNone, Reduction::kMean, Reduction::kSum}) {
    BceArgs a = pr.args(r);
    std::vector<char> l(pr.n * item), gx(pr.n * item), gy(pr.n * item);
    ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
    ExpectMatchesReference(a, r == Reduction::kNone ? l.data() : nullptr, gx.data(), gy.data());
    if (r != Reduction::kNone) {
      double ref;
      ReferenceBce(a, &ref, nullptr, nullptr);
      const double got = LoadAsDouble(dtype, l.data(), 0);
      EXPECT_TRUE(std::isnan(got) && std::isnan(ref)) << got << " vs " << ref;  // NaN inputs
    }
  }
  // Reductions without special values: the reference rounded to the dtype, within 1 ulp of
  // the dtype and 1e-6 relative (a float16 SUM may overflow to inf in both).
  TypedProblem fin = MakeTyped(dtype, 2011, 23, xmax, wmax, 19, false);
  for (Reduction r : {Reduction::kMean, Reduction::kSum}) {
    BceArgs a = fin.args(r);
    std::vector<char> l(item);
    ASSERT_TRUE(cuda->Bce(a, {l.data(), nullptr, nullptr}).ok());
    double ref;
    ReferenceBce(a, &ref, nullptr, nullptr);
    std::vector<char> rounded(item);
    StoreFromDouble(dtype, rounded.data(), 0, ref);
    const double expected = LoadAsDouble(dtype, rounded.data(), 0);
    const double got = LoadAsDouble(dtype, l.data(), 0);
    EXPECT_TRUE(Close(got, expected, UlpOf(dtype, expected) + 1e-6 * std::fabs(ref)))
        << DTypeName(dtype) << (r == Reduction::kSum ? " SUM " : " MEAN ") << got << " vs "
        << ref;
  }
}

TEST_P(CudaBackendTest, Float64) {
  CheckTyped(float_math(), DType::kFloat64, 700, 1e3);
}

TEST_P(CudaBackendTest, Float16) {
  CheckTyped(float_math(), DType::kFloat16, 12, 10);
}

TEST_P(CudaBackendTest, BFloat16) {
  CheckTyped(float_math(), DType::kBFloat16, 60, 1e3);
}

// SUM and MEAN against the reference and the CPU backend, over sizes around the block size.
TEST_P(CudaBackendTest, ReductionsMatchReferenceAndCpu) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  auto cpu = MakeCpuBackend({2});
  for (int64_t rows : {1, 3, 2047, 2048, 2049, 4101, 100003}) {
    F32Problem pr = MakeF32Problem(rows, 1, 100 + rows, false);
    pr.p[0] = 2.5f;  // the scalar pos_weight
    for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
      BceArgs a = F32Args(pr, r, {pr.rows, 1}, {});
      float got = 0;
      std::vector<float> gx(pr.n), gy(pr.n);
      ASSERT_TRUE(cuda->Bce(a, {&got, gx.data(), gy.data()}).ok());
      ExpectReducedLossMatches(a, got, *cpu);
      ExpectMatchesReference(a, nullptr, gx.data(), gy.data());
    }
  }
}

TEST_P(CudaBackendTest, MatchesCpuBackend) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  auto cpu = MakeCpuBackend({2});
  F32Problem pr = MakeF32Problem(4099, 31, 23, true);
  BceArgs a = F32Args(pr, Reduction::kNone, {pr.c}, {pr.c});
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n), cl(pr.n), cgx(pr.n), cgy(pr.n);
  ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  ASSERT_TRUE(cpu->Bce(a, {cl.data(), cgx.data(), cgy.data()}).ok());
  int64_t failures = 0;
  for (int64_t i = 0; i < pr.n && failures < 10; ++i) {
    const auto [sx, sy] = GradTermScales(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c]);
    const bool ok = UlpDistance(l[i], cl[i]) <= 4 && Close(gx[i], cgx[i], 4 * UlpF32(sx)) &&
                    Close(gy[i], cgy[i], 4 * UlpF32(sy));
    if (!ok) {
      ++failures;
      ADD_FAILURE() << "element " << i << " x=" << pr.x[i] << " y=" << pr.y[i] << ": cuda (" << l[i]
                    << ", " << gx[i] << ", " << gy[i] << ") cpu (" << cl[i] << ", " << cgx[i]
                    << ", " << cgy[i] << ")";
    }
  }
}

TEST_P(CudaBackendTest, LargeReduction) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  auto cpu = MakeCpuBackend();
  F32Problem pr = MakeF32Problem(81967, 61, 99, false);  // 4,999,987 elements
  for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
    BceArgs a = F32Args(pr, r, {pr.c}, {pr.c});
    float got = 0, cpu_loss = 0;
    std::vector<float> gx(pr.n);
    ASSERT_TRUE(cuda->Bce(a, {&got, gx.data(), nullptr}).ok());
    ASSERT_TRUE(cpu->Bce(a, {&cpu_loss, nullptr, nullptr}).ok());
    double ref;
    ReferenceBce(a, &ref, nullptr, nullptr);
    if (!std::isfinite(static_cast<float>(ref))) {
      // The exact sum overflows float32 (the data has logits up to 1e30): both must say so.
      EXPECT_EQ(got, static_cast<float>(ref));
      EXPECT_EQ(got, cpu_loss);
    } else {
      EXPECT_LE(std::fabs(got - ref), 1e-6 * std::fabs(ref)) << got << " vs " << ref;
      EXPECT_LE(std::fabs(static_cast<double>(got) - cpu_loss), 1e-6 * std::fabs(cpu_loss));
    }
    if (r == Reduction::kMean) {
      ExpectMatchesReference(a, nullptr, gx.data(), nullptr);
    }
  }
}

// MEAN gradients for an element count that float32 cannot hold exactly (2^24 + 3): both
// backends then divide in double; per element against the CPU backend (4 ulp of the larger
// term over n) and the loss against it (1e-6 relative).
TEST_P(CudaBackendTest, MeanGradientsBeyondFloatExactCounts) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  auto cpu = MakeCpuBackend();
  F32Problem pr = MakeF32Problem((int64_t{1} << 24) + 3, 1, 5, false);
  pr.w.assign(1, 0.75f);
  pr.p.assign(1, 3.0f);
  const BceArgs a = F32Args(pr, Reduction::kMean, {1}, {1});
  ASSERT_NE(static_cast<double>(static_cast<float>(pr.n)), static_cast<double>(pr.n));
  float loss = 0, cpu_loss = 0;
  std::vector<float> gx(pr.n), cgx(pr.n);
  ASSERT_TRUE(cuda->Bce(a, {&loss, gx.data(), nullptr}).ok());
  ASSERT_TRUE(cpu->Bce(a, {&cpu_loss, cgx.data(), nullptr}).ok());
  EXPECT_TRUE(Close(loss, cpu_loss, 1e-6 * std::fabs(cpu_loss))) << loss << " vs " << cpu_loss;
  int64_t failures = 0;
  for (int64_t i = 0; i < pr.n && failures < 10; ++i) {
    const double sx = GradTermScales(pr.x[i], pr.y[i], 0.75, 3.0).first / pr.n;
    if (!Close(gx[i], cgx[i], 4 * UlpF32(sx))) {
      ++failures;
      ADD_FAILURE() << "element " << i << " x=" << pr.x[i] << " y=" << pr.y[i] << ": cuda "
                    << gx[i] << " cpu " << cgx[i];
    }
  }
}

// The options over many reduction blocks (each CUDA block loops, so the tree's two buffers
// alternate) and the ignored-target count over many CUDA blocks: ignore_index + normalize and
// label smoothing (both in the fused kernel) on 1.5M elements, against the reference (1e-6
// relative for SUM and MEAN, 4 ulp per element for NONE) and bitwise repeatable.
TEST_P(CudaBackendTest, GenericReductionsOverManyBlocks) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(40009, 37, 61, false);  // 1,480,333 elements
  for (int64_t i = 0; i < pr.n; i += 7) pr.y[i] = -100.0f;
  for (int variant = 0; variant < 2; ++variant) {
    std::vector<float> y = pr.y;
    if (variant == 1) {
      for (float& v : y) v = v == -100.0f ? 0.0f : v;
    }
    for (Reduction r : {Reduction::kNone, Reduction::kSum, Reduction::kMean}) {
      SCOPED_TRACE(::testing::Message() << (variant == 0 ? "ignore+normalize" : "smoothing")
                                        << " reduction " << static_cast<int>(r));
      BceArgs a = F32Args(pr, r, {pr.c}, {pr.c});
      a.targets = y.data();
      a.has_ignore_index = variant == 0;
      a.normalize = variant == 0;
      a.label_smoothing = variant == 1 ? 0.05 : 0.0;
      const int64_t nl = LossCount(a);
      std::vector<float> loss(nl), again(nl), gx(pr.n);
      ASSERT_TRUE(cuda->Bce(a, {loss.data(), gx.data(), nullptr}).ok());
      ASSERT_TRUE(cuda->Bce(a, {again.data(), nullptr, nullptr}).ok());
      EXPECT_EQ(std::memcmp(loss.data(), again.data(), nl * sizeof(float)), 0);
      std::vector<double> rl(nl);
      ReferenceBce(a, rl.data(), nullptr, nullptr);
      if (r == Reduction::kNone) {
        int64_t failures = 0;
        for (int64_t k = 0; k < nl && failures < 10; ++k) {
          const int64_t d = UlpDistance(loss[k], static_cast<float>(rl[k]));
          if (d > 4) {
            ++failures;
            ADD_FAILURE() << "loss " << k << ": " << loss[k] << " vs " << rl[k];
          }
        }
      } else if (!std::isfinite(static_cast<float>(rl[0]))) {
        // The exact sum is beyond the float32 range (logits up to 1e4, w and p up to 1e3).
        EXPECT_EQ(loss[0], static_cast<float>(rl[0]));
      } else {
        EXPECT_LE(std::fabs(loss[0] - rl[0]), 1e-6 * std::fabs(rl[0])) << loss[0] << " vs "
                                                                        << rl[0];
      }
    }
  }
}

// The fused kernel over more reduction blocks than the grid holds (each CUDA block loops, so
// the [C] operands' per-thread cursors advance by the grid's stride), with C = 36 (vector loads
// of [C] operands), C = 36 with pos_weight [N,1], and a partial last block (1,440,324 elements:
// 703 whole blocks and one of 596): per element against the reference (4 ulp, gradients 4 ulp of
// the larger term), MEAN within 1e-6 of the reference and of the CPU backend.
TEST_P(CudaBackendTest, FusedOverManyBlocksWithVectorOperands) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  auto cpu = MakeCpuBackend({2});
  F32Problem pr = MakeF32Problem(40009, 36, 67, false);
  const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> shapes = {
      {{pr.c}, {pr.c}}, {{pr.c}, {pr.rows, 1}}};
  for (const auto& [ws, ps] : shapes) {
    for (Reduction r : {Reduction::kNone, Reduction::kMean}) {
      SCOPED_TRACE(::testing::Message() << "pos_weight rank " << ps.size() << " reduction "
                                        << static_cast<int>(r));
      BceArgs a = F32Args(pr, r, ws, ps);
      std::vector<float> l(r == Reduction::kNone ? pr.n : 1), gx(pr.n), gy(pr.n);
      ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
      ExpectMatchesReference(a, r == Reduction::kNone ? l.data() : nullptr, gx.data(), gy.data());
      if (r == Reduction::kMean) ExpectReducedLossMatches(a, l[0], *cpu);
    }
  }
}

TEST_P(CudaBackendTest, RepeatedAndConcurrentRunsAreBitwiseIdentical) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(50021, 7, 31, true);
  for (Reduction r : {Reduction::kNone, Reduction::kSum, Reduction::kMean}) {
    BceArgs a = F32Args(pr, r, {pr.c}, {pr.c});
    const int64_t nl = r == Reduction::kNone ? pr.n : 1;
    auto run = [&](std::vector<float>* out) {
      out->assign(nl + 2 * pr.n, 0.0f);
      return cuda->Bce(a, {out->data(), out->data() + nl, out->data() + nl + pr.n});
    };
    std::vector<float> first;
    ASSERT_TRUE(run(&first).ok());
    for (int k = 0; k < 3; ++k) {
      std::vector<float> again;
      ASSERT_TRUE(run(&again).ok());
      EXPECT_EQ(std::memcmp(first.data(), again.data(), first.size() * 4), 0);
    }
    std::vector<std::vector<float>> outs(6);
    std::vector<absl::Status> st(outs.size());
    std::vector<std::thread> threads;
    for (size_t t = 0; t < outs.size(); ++t) {
      threads.emplace_back([&, t] { st[t] = run(&outs[t]); });
    }
    for (auto& t : threads) t.join();
    for (size_t t = 0; t < outs.size(); ++t) {
      ASSERT_TRUE(st[t].ok()) << st[t];
      EXPECT_EQ(std::memcmp(first.data(), outs[t].data(), first.size() * 4), 0) << t;
    }
  }
}

TEST_P(CudaBackendTest, EmptyTensor) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  BceArgs a;
  a.numel = 0;
  float loss = 1;
  a.reduction = Reduction::kMean;
  ASSERT_TRUE(cuda->Bce(a, {&loss, nullptr, nullptr}).ok());
  EXPECT_TRUE(std::isnan(loss));
  a.reduction = Reduction::kSum;
  ASSERT_TRUE(cuda->Bce(a, {&loss, nullptr, nullptr}).ok());
  EXPECT_EQ(loss, 0.0f);
  a.reduction = Reduction::kNone;
  EXPECT_TRUE(cuda->Bce(a, {nullptr, nullptr, nullptr}).ok());
}

// Any subset of outputs may be requested; each equals the full run's bit for bit.
TEST_P(CudaBackendTest, NullOutputsAreSkipped) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(777, 13, 41, true);
  for (Reduction r : {Reduction::kNone, Reduction::kMean}) {
    BceArgs a = F32Args(pr, r, {pr.c}, {pr.c});
    const int64_t nl = r == Reduction::kNone ? pr.n : 1;
    std::vector<float> l(nl), gx(pr.n), gy(pr.n);
    ASSERT_TRUE(cuda->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
    std::vector<float> l2(nl, -1), gx2(pr.n, -1), gy2(pr.n, -1);
    ASSERT_TRUE(cuda->Bce(a, {nullptr, nullptr, gy2.data()}).ok());
    ASSERT_TRUE(cuda->Bce(a, {nullptr, gx2.data(), nullptr}).ok());
    ASSERT_TRUE(cuda->Bce(a, {l2.data(), nullptr, nullptr}).ok());
    EXPECT_EQ(std::memcmp(l.data(), l2.data(), nl * 4), 0);
    EXPECT_EQ(std::memcmp(gx.data(), gx2.data(), pr.n * 4), 0);
    EXPECT_EQ(std::memcmp(gy.data(), gy2.data(), pr.n * 4), 0);
  }
}

// Every option (ignore_index + normalize and label smoothing: the fused kernel, or the option
// kernel with per-sample mean or per-element values; focal: the option kernel) under every
// reduction, with and without per-element values, against the float64 reference.
TEST_P(CudaBackendTest, GenericOptionsMatchReference) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(517, 13, 57, false);       // 6721 elements: 4 reduction blocks
  for (int64_t i = 0; i < pr.n; i += 9) pr.y[i] = -100.0f;  // ignored where ignore_index is on
  struct Case {
    const char* name;
    Loss loss;
    bool ignore_normalize;
    double smoothing;
    double gamma;
    bool normalize_only = false;  // normalize without ignore_index: the count is numel
  };
  const Case cases[] = {{"ignore+normalize", Loss::kBce, true, 0.0, 2.0},
                        {"normalize", Loss::kBce, false, 0.0, 2.0, true},
                        {"smoothing 0.1", Loss::kBce, false, 0.1, 2.0},
                        {"focal gamma 0.5", Loss::kFocal, false, 0.0, 0.5},
                        {"focal gamma 2", Loss::kFocal, false, 0.0, 2.0}};
  for (const Case& c : cases) {
    // With and without loss_values: the reductions must not depend on them.
    for (bool with_values : {true, false}) {
      // Without ignore_index the -100 targets stay ordinary (out-of-range) labels: use 0 instead.
      std::vector<float> y = pr.y;
      if (!c.ignore_normalize) {
        for (float& v : y) v = v == -100.0f ? 0.0f : v;
      }
      for (Reduction r :
           {Reduction::kNone, Reduction::kSum, Reduction::kMean, Reduction::kPerSampleMean}) {
        SCOPED_TRACE(::testing::Message() << c.name << " reduction " << static_cast<int>(r)
                                          << (with_values ? " with" : " without") << " values");
        BceArgs a = F32Args(pr, r, {pr.c}, {pr.c});
        a.targets = y.data();
        a.last_dim = pr.c;
        a.loss = c.loss;
        a.has_ignore_index = c.ignore_normalize;
        a.normalize = c.ignore_normalize || c.normalize_only;
        a.label_smoothing = c.smoothing;
        a.focal_gamma = c.gamma;
        if (c.loss == Loss::kFocal) a.pos_weight = Operand();
        const bool focal = c.loss == Loss::kFocal;
        const int64_t nl = LossCount(a);
        std::vector<float> loss(nl), gx(pr.n), gy(pr.n);
        std::vector<double> values(pr.n, -1.0);
        std::atomic<int64_t> chunks{0};
        a.chunks_done = &chunks;
        BceOutputs out{loss.data(), gx.data(), focal ? nullptr : gy.data(),
                       with_values ? values.data() : nullptr};
        ASSERT_TRUE(cuda->Bce(a, out).ok());
        EXPECT_EQ(chunks.load(), (pr.n + kChunkElements - 1) / kChunkElements);

        std::vector<double> rl(nl), rgx(pr.n), rgy(pr.n);
        ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
        // Per-element values: the reference's kNone loss before normalize.
        BceArgs ea = a;
        ea.reduction = Reduction::kNone;
        ea.normalize = false;
        std::vector<double> rv(pr.n);
        ReferenceBce(ea, rv.data(), nullptr, nullptr);

        if (r == Reduction::kSum || r == Reduction::kMean) {
          if (!std::isfinite(static_cast<float>(rl[0]))) {
            EXPECT_EQ(loss[0], static_cast<float>(rl[0]));
          } else {
            EXPECT_LE(std::fabs(loss[0] - rl[0]), 1e-6 * std::fabs(rl[0]))
                << loss[0] << " vs " << rl[0];
          }
        } else {
          int64_t failures = 0;
          for (int64_t k = 0; k < nl && failures < 10; ++k) {
            const int64_t d = UlpDistance(loss[k], static_cast<float>(rl[k]));
            if (d > 4) {
              ++failures;
              ADD_FAILURE() << "loss " << k << ": " << loss[k] << " vs " << rl[k] << ", " << d
                            << " ulp";
            }
          }
        }

        // Gradient divisor, as the reference computes it.
        double count = 1.0;
        if (a.normalize) {
          int64_t kept = 0;
          for (float v : y) kept += v != -100.0f;
          count = kept > 0 ? static_cast<double>(kept) : 1.0;
        }
        double grad_div = count;
        if (r == Reduction::kMean) grad_div *= static_cast<double>(pr.n);
        if (r == Reduction::kPerSampleMean) grad_div *= static_cast<double>(pr.c);
        int64_t failures = 0;
        for (int64_t i = 0; i < pr.n && failures < 10; ++i) {
          const double x = pr.x[i];
          const double w = OperandAt(a.weight, i);
          const double p = OperandAt(a.pos_weight, i);
          const double scale = w * std::max(1.0, p) / grad_div;
          const bool vok =
              !with_values || Close(values[i], rv[i], 1e-9 * std::fabs(rv[i]) + 1e-300);
          const bool gxok = Close(gx[i], rgx[i], 1e-6 * (std::fabs(rgx[i]) + scale));
          const bool gyok = focal || Close(gy[i], rgy[i],
                                           1e-6 * (std::fabs(rgy[i]) + scale * (std::fabs(x) + 1)));
          if (!vok || !gxok || !gyok) {
            ++failures;
            ADD_FAILURE() << "element " << i << " x=" << x << " y=" << y[i] << " w=" << w
                          << " p=" << p << ": value " << values[i] << " vs " << rv[i] << ", gx "
                          << gx[i] << " vs " << rgx[i] << ", gy " << (focal ? 0.0f : gy[i])
                          << " vs " << rgy[i];
          }
        }
      }
    }
  }
}

// should_stop is polled before any work: CANCELLED, nothing counted.
TEST_P(CudaBackendTest, ShouldStopCancelsBeforeLaunch) {
  auto cuda = Cuda();
  ASSERT_NE(cuda, nullptr);
  F32Problem pr = MakeF32Problem(100, 3, 5, false);
  BceArgs a = F32Args(pr, Reduction::kMean, {pr.c}, {pr.c});
  a.should_stop = [] { return true; };
  std::atomic<int64_t> chunks{0};
  a.chunks_done = &chunks;
  float loss = 0;
  EXPECT_EQ(cuda->Bce(a, {&loss, nullptr, nullptr}).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(chunks.load(), 0);
}

#ifdef LOSSD_HAVE_CUDA
// The device entry point on misaligned pointers (scalar loads and stores) equals the aligned,
// vectorized run bit for bit, for every dtype.
TEST_P(CudaBackendTest, UnalignedDevicePointersMatchAligned) {
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    TypedProblem pr = MakeTyped(dtype, 301, 11, 20, 10, 5);
    const size_t item = ItemSize(dtype), bytes = pr.n * item;
    char* dev = nullptr;
    ASSERT_EQ(cudaMalloc(&dev, 8 * (bytes + 256)), cudaSuccess);
    auto run = [&](size_t shift, std::vector<char>* out) {
      char* x = dev + shift;
      char* y = x + bytes + 256;
      char* p = y + bytes + 256;
      char* w = dev + (7 * (bytes + 256) + 255) / 256 * 256;  // float32 weight: aligned
      char* l = p + 256;
      char* g = l + bytes + 256;
      ASSERT_EQ(cudaMemcpy(x, pr.x.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(y, pr.y.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(p, pr.p.data(), pr.c * item, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(w, pr.w.data(), pr.c * 4, cudaMemcpyHostToDevice), cudaSuccess);
      cuda::DeviceBce d;
      d.numel = pr.n;
      d.dtype = d.targets_dtype = dtype;
      d.logits = x;
      d.targets = y;
      d.weight = {DType::kFloat32, w, 1, pr.c};
      d.pos_weight = {dtype, p, 1, pr.c};
      d.loss = l;
      d.grad_logits = g;
      d.float_math = float_math();
      ASSERT_EQ(cuda::LaunchBce(d, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      out->resize(2 * bytes);
      ASSERT_EQ(cudaMemcpy(out->data(), l, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(out->data() + bytes, g, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    };
    std::vector<char> aligned, shifted;
    run(0, &aligned);
    run(item, &shifted);  // every pointer one element off 16-byte alignment
    EXPECT_EQ(aligned, shifted) << DTypeName(dtype);
    cudaFree(dev);
  }
}

// DeviceBce::float_math on the device: the 4-ulp bounds against the reference on the random
// problem and on the special grid, and the host's BceElementF32 (with its fallback) within
// 1 ulp per element (the reciprocal's seed is the only part allowed to differ).
TEST(CudaFloatMathTest, MatchesReferenceAndHost) {
  SKIP_WITHOUT_GPU();
  SpecialGrid g;
  F32Problem pr = MakeF32Problem(1601, 41, 17, true);
  struct Case {
    std::vector<float> x, y, w, p;  // w and p: one value per element
  };
  Case cases[2];
  for (int64_t i = 0; i < pr.n; ++i) {
    cases[0].x.push_back(pr.x[i]);
    cases[0].y.push_back(pr.y[i]);
    cases[0].w.push_back(pr.w[i % pr.c]);
    cases[0].p.push_back(pr.p[i % pr.c]);
  }
  cases[1] = {g.x, g.y, g.w, g.p};
  for (const Case& c : cases) {
    const int64_t n = static_cast<int64_t>(c.x.size());
    const size_t bytes = n * sizeof(float);
    float* dev = nullptr;
    ASSERT_EQ(cudaMalloc(&dev, 7 * bytes), cudaSuccess);
    float *x = dev, *y = dev + n, *w = dev + 2 * n, *p = dev + 3 * n, *l = dev + 4 * n,
          *gx = dev + 5 * n, *gy = dev + 6 * n;
    ASSERT_EQ(cudaMemcpy(x, c.x.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(y, c.y.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(w, c.w.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(p, c.p.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    cuda::DeviceBce d;
    d.numel = n;
    d.logits = x;
    d.targets = y;
    d.weight = {DType::kFloat32, w, 1, n};
    d.pos_weight = {DType::kFloat32, p, 1, n};
    d.loss = l;
    d.grad_logits = gx;
    d.grad_targets = gy;
    d.float_math = true;
    ASSERT_EQ(cuda::LaunchBce(d, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> hl(n), hgx(n), hgy(n);
    ASSERT_EQ(cudaMemcpy(hl.data(), l, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(hgx.data(), gx, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(hgy.data(), gy, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    cudaFree(dev);
    const BceArgs a = lossd::testing::FlatArgs(DType::kFloat32, n, c.x.data(), c.y.data(),
                                               c.w.data(), c.p.data(), Reduction::kNone);
    EXPECT_LE(ExpectMatchesReference(a, hl.data(), hgx.data(), hgy.data()), 4);
    int64_t worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      float el, egx, egy;
      F32Element(c.x[i], c.y[i], c.w[i], c.p[i], &el, &egx, &egy, true);
      worst = std::max(worst, UlpDistance(hl[i], el));
    }
    EXPECT_LE(worst, 1);
    std::printf("float_math on the device vs the host's BceElementF32: loss worst %lld ulp\n",
                static_cast<long long>(worst));
  }
}
#endif

}  // namespace
}  // namespace lossd::kernels
