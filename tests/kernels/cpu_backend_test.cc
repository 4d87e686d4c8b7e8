// The CPU backend against the float64 reference, and its determinism across thread counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "tests/kernels/test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::ScaledCount;
using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;

// Random float32 problem: logits over many magnitudes plus specials, soft and hard labels,
// weight [C], pos_weight [C].
struct Problem {
  int64_t n, c;
  std::vector<float> x, y, w, p;
  BceArgs args(Reduction r) const {
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = DType::kFloat32;
    a.logits = x.data();
    a.targets = y.data();
    a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {c}, {n / c, c});
    a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, p.data(), {c}, {n / c, c});
    a.reduction = r;
    return a;
  }
};

Problem MakeProblem(int64_t rows, int64_t c, uint64_t seed) {
  Problem pr;
  pr.n = rows * c;
  pr.c = c;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  const float specials[] = {0.0f, -0.0f, 30.0f, -30.0f, 1e30f, -1e30f, 1e-30f, -1e-30f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 88.0f, -88.0f, -17.0f};
  for (int64_t i = 0; i < pr.n; ++i) {
    float x;
    const double r = u(rng);
    if (r < 0.05) {
      x = specials[rng() % std::size(specials)];
    } else {
      // log-uniform magnitude in [1e-8, 1e4], random sign
      x = static_cast<float>(std::pow(10.0, -8 + 12 * u(rng)) * (u(rng) < 0.5 ? -1 : 1));
    }
    pr.x.push_back(x);
    const double t = u(rng);
    pr.y.push_back(t < 0.4 ? 0.0f : t < 0.8 ? 1.0f : static_cast<float>(u(rng)));
  }
  for (int64_t k = 0; k < c; ++k) {
    pr.w.push_back(k % 7 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
    pr.p.push_back(k % 5 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
  }
  return pr;
}

// Spacing of a half type at |v|: float16 has 11 significant bits and subnormals of spacing
// 2^-24 below 2^-14; bfloat16 has 8 significant bits and subnormals of spacing 2^-133 below
// 2^-126.
double UlpHalf(DType dt, double v) {
  const double a = std::fabs(v);
  if (dt == DType::kFloat16) return a < 0x1p-14 ? 0x1p-24 : std::ldexp(1.0, std::ilogb(a) - 10);
  return a < 0x1p-126 ? 0x1p-133 : std::ldexp(1.0, std::ilogb(a) - 7);
}

// Magnitude of the larger of the two gradient terms, for the gradient's ulp bound.
double GradScale(double x, double y, double w, double p) {
  const double e = std::exp(-std::fabs(x));
  const double sp = x >= 0 ? 1 / (1 + e) : e / (1 + e);
  const double sn = x >= 0 ? e / (1 + e) : 1 / (1 + e);
  return std::max(std::fabs(w * (1 - y) * sp), std::fabs(w * p * y * sn));
}

TEST(CpuBackendTest, Float32WithinFourUlpOfReference) {
  Problem pr = MakeProblem(3001, 37, 11);  // not a multiple of the block size
  auto cpu = MakeCpuBackend({2});
  BceArgs a = pr.args(Reduction::kNone);
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  ASSERT_TRUE(cpu->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  std::vector<double> rl(pr.n), rgx(pr.n), rgy(pr.n);
  ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
  int64_t worst = 0;
  for (int64_t i = 0; i < pr.n; ++i) {
    const int64_t d = UlpDistance(l[i], static_cast<float>(rl[i]));
    worst = std::max(worst, d);
    ASSERT_LE(d, 4) << "i=" << i << " x=" << pr.x[i] << " y=" << pr.y[i] << " got " << l[i]
                    << " want " << rl[i];
    const double scale = GradScale(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c]);
    if (!std::isnan(rgx[i])) {
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 4 * UlpF32(scale) + 0.0) << "gx i=" << i;
    }
    if (std::isfinite(rgy[i])) {
      ASSERT_LE(std::fabs(gy[i] - rgy[i]),
                4 * UlpF32(rgy[i]) + 4 * UlpF32(pr.w[i % pr.c] * (std::fabs(pr.x[i]) + 1)))
          << "gy i=" << i;
    } else {
      ASSERT_EQ(static_cast<double>(gy[i]), rgy[i]) << "gy i=" << i;
    }
  }
  RecordProperty("worst_loss_ulp", static_cast<int>(worst));
}

// Tensors marked as CUDA device memory are refused before anything is read or written: the
// CPU backend must never dereference a device pointer (the pointers here are unreadable).
TEST(CpuBackendTest, RefusesDeviceTensors) {
  auto cpu = MakeCpuBackend({2});
  const auto* unreadable = reinterpret_cast<const void*>(uintptr_t{8});
  for (uint32_t in_mask : {0u, on_device::kLogits, on_device::kTargets | on_device::kWeight}) {
    for (uint32_t out_mask : {0u, on_device::kGradLogits}) {
      if (in_mask == 0 && out_mask == 0) continue;
      BceArgs a;
      a.numel = 4;
      a.logits = unreadable;
      a.targets = unreadable;
      a.on_device = in_mask;
      BceOutputs o;
      o.grad_logits = const_cast<void*>(unreadable);
      o.on_device = out_mask;
      const absl::Status s = cpu->Bce(a, o);
      EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << in_mask << " " << out_mask;
      EXPECT_NE(s.message().find("CUDA device memory"), std::string::npos) << s.message();
    }
  }
}

TEST(CpuBackendTest, OtherDtypesMatchReference) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(-20, 20), t(0, 1);
  const int64_t n = 5000;
  std::vector<double> xd(n), yd(n);
  for (int64_t i = 0; i < n; ++i) {
    xd[i] = u(rng);
    yd[i] = t(rng) < 0.5 ? std::round(t(rng)) : t(rng);
  }
  // float64: within 4 ulp of a long double evaluation of the same formula is checked in the
  // float64 accuracy suite; here the backend must agree with the reference to ~1e-15.
  {
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = DType::kFloat64;
    a.logits = xd.data();
    a.targets = yd.data();
    a.reduction = Reduction::kNone;
    std::vector<double> l(n), rl(n);
    ASSERT_TRUE(MakeCpuBackend({1})->Bce(a, {l.data(), nullptr, nullptr}).ok());
    ReferenceBce(a, rl.data(), nullptr, nullptr);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_LE(std::fabs(l[i] - rl[i]), 4 * lossd::testing::UlpF64(rl[i]));
    }
  }
  // Half types compute in float32 and round once (docs/design.md section 3), with weight and
  // pos_weight of the full shape in the same type. The reference reads the same half inputs.
  // Loss: within 1 ulp of the half type of the reference. Gradients: 1 ulp of the half type of
  // the reference plus 4 float32 ulps of the larger term (the float32 bound of a gradient that
  // cancels, then one rounding). Measured worst (seed 5), in ulps of the half type: float16
  // loss 0.50, dl/dx 0.50, dl/dy 0.50; bfloat16 likewise 0.50 (one rounding of a float32 result
  // that is far more accurate than the half ulp).
  std::vector<double> wd(n), pd(n);
  for (int64_t i = 0; i < n; ++i) {
    wd[i] = i % 11 == 0 ? 0.0 : 4 * t(rng);
    pd[i] = i % 13 == 0 ? 0.0 : 4 * t(rng);
  }
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint16_t> xh(n), yh(n), wh(n), ph(n);
    for (int64_t i = 0; i < n; ++i) {
      StoreFromDouble(dt, xh.data(), i, xd[i]);
      StoreFromDouble(dt, yh.data(), i, yd[i]);
      StoreFromDouble(dt, wh.data(), i, wd[i]);
      StoreFromDouble(dt, ph.data(), i, pd[i]);
    }
    const BceArgs a = lossd::testing::FlatArgs(dt, n, xh.data(), yh.data(), wh.data(),
                                               ph.data(), Reduction::kNone);
    std::vector<uint16_t> l(n), gx(n), gy(n);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
    std::vector<double> rl(n), rgx(n), rgy(n);
    ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
    double worst[3] = {0, 0, 0};  // loss, dl/dx, dl/dy: in ulps of the half type
    for (int64_t i = 0; i < n; ++i) {
      const double x = LoadAsDouble(dt, xh.data(), i), y = LoadAsDouble(dt, yh.data(), i);
      const double w = LoadAsDouble(dt, wh.data(), i), p = LoadAsDouble(dt, ph.data(), i);
      const auto [sx, sy] = lossd::testing::GradTermScales(x, y, w, p);
      const struct {
        const char* name;
        const uint16_t* got;
        double ref, bound;
      } outs[] = {
          {"loss", l.data(), rl[i], UlpHalf(dt, rl[i])},
          {"dl/dx", gx.data(), rgx[i], UlpHalf(dt, rgx[i]) + 4 * UlpF32(sx)},
          {"dl/dy", gy.data(), rgy[i], UlpHalf(dt, rgy[i]) + 4 * UlpF32(sy)},
      };
      for (int k = 0; k < 3; ++k) {
        const double got = LoadAsDouble(dt, outs[k].got, i);
        const double err = std::fabs(got - outs[k].ref);
        worst[k] = std::max(worst[k], err / UlpHalf(dt, outs[k].ref));
        ASSERT_LE(err, outs[k].bound)
            << DTypeName(dt) << " " << outs[k].name << " i=" << i << " x=" << x << " y=" << y
            << " w=" << w << " p=" << p << ": got " << got << " want " << outs[k].ref;
      }
    }
    const std::string name = DTypeName(dt);
    RecordProperty("worst_loss_ulp_" + name, std::to_string(worst[0]));
    RecordProperty("worst_grad_logits_ulp_" + name, std::to_string(worst[1]));
    RecordProperty("worst_grad_targets_ulp_" + name, std::to_string(worst[2]));
  }
}

TEST(CpuBackendTest, MixedDtypesAndFullWeight) {
  const int64_t n = 4099;
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<double> u(-5, 5), t(0, 1);
  std::vector<float> x(n);
  std::vector<double> y(n);
  std::vector<uint16_t> w(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(u(rng));
    y[i] = t(rng);
    w[i] = FloatToBFloat16(static_cast<float>(3 * t(rng)));
  }
  BceArgs a;
  a.numel = n;
  a.dtype = DType::kFloat32;
  a.logits = x.data();
  a.targets_dtype = DType::kFloat64;
  a.targets = y.data();
  a.weight = *MakeOperand("weight", DType::kBFloat16, w.data(), {n}, {n});
  a.reduction = Reduction::kNone;
  std::vector<float> l(n);
  ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {l.data(), nullptr, nullptr}).ok());
  std::vector<double> rl(n);
  ReferenceBce(a, rl.data(), nullptr, nullptr);
  for (int64_t i = 0; i < n; ++i) ASSERT_LE(UlpDistance(l[i], static_cast<float>(rl[i])), 4) << i;
}

TEST(CpuBackendTest, ReductionsMatchReferenceAndGradsAreScaled) {
  Problem pr = MakeProblem(20000, 13, 21);
  for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
    BceArgs a = pr.args(r);
    // Keep the sum finite: drop infinite logits with zero coefficients' complements.
    float loss;
    std::vector<float> gx(pr.n);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {&loss, gx.data(), nullptr}).ok());
    double rloss;
    std::vector<double> rgx(pr.n);
    ReferenceBce(a, &rloss, rgx.data(), nullptr);
    if (std::isfinite(rloss)) {
      EXPECT_NEAR(loss, rloss, 1e-6 * std::fabs(rloss));
    } else {
      EXPECT_EQ(static_cast<double>(loss), rloss);
    }
    const double div = r == Reduction::kMean ? static_cast<double>(pr.n) : 1.0;
    for (int64_t i = 0; i < pr.n; ++i) {
      if (std::isnan(rgx[i])) continue;
      const double scale = GradScale(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c]) / div;
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 4 * UlpF32(scale) + 1e-44) << i;
    }
  }
}

// Per-sample mean: each row's result is the exact sum of that row's per-element values
// (loss_values, the numbers the reductions add) divided by the row length and rounded once,
// bit for bit, whether the row lies within one reduction block (summed there) or crosses a
// block edge (summed after all blocks): row lengths that divide the block, that do not, of one
// element, of a whole block and longer than a block; float32 and float64; 1 and 3 threads.
TEST(CpuBackendTest, PerSampleMeanIsTheExactRowSumOfTheValues) {
  std::mt19937_64 rng(29);
  std::uniform_real_distribution<double> u(-8, 8), u01(0, 1);
  for (int64_t len : {64, 37, 1, 2048, 3000, 5000}) {
    const int64_t rows = 30000 / len + 3, n = rows * len;
    std::vector<double> x(n), y(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = u(rng);
      y[i] = u01(rng) < 0.5 ? static_cast<double>(rng() & 1) : u01(rng);
    }
    const std::vector<float> xf(x.begin(), x.end()), yf(y.begin(), y.end());
    for (DType dtype : {DType::kFloat32, DType::kFloat64}) {
      for (int threads : {1, 3}) {
        SCOPED_TRACE(::testing::Message() << "last_dim " << len << ", dtype "
                                          << static_cast<int>(dtype) << ", threads " << threads);
        auto cpu = MakeCpuBackend({threads});
        BceArgs a = lossd::testing::FlatArgs(
            dtype, n, dtype == DType::kFloat32 ? static_cast<const void*>(xf.data()) : x.data(),
            dtype == DType::kFloat32 ? static_cast<const void*>(yf.data()) : y.data(), nullptr,
            nullptr, Reduction::kPerSampleMean);
        a.last_dim = len;
        std::vector<double> loss64(rows), values(n);
        std::vector<float> loss32(rows);
        BceOutputs out;
        out.loss = dtype == DType::kFloat32 ? static_cast<void*>(loss32.data()) : loss64.data();
        out.loss_values = values.data();
        ASSERT_TRUE(cpu->Bce(a, out).ok());
        for (int64_t r = 0; r < rows; ++r) {
          ExactSum s;
          for (int64_t j = 0; j < len; ++j) s.Add(values[r * len + j]);
          const double want = s.Value() / static_cast<double>(len);
          if (dtype == DType::kFloat32) {
            ASSERT_EQ(loss32[r], static_cast<float>(want)) << "row " << r;
          } else {
            ASSERT_EQ(loss64[r], want) << "row " << r;
          }
        }
      }
    }
  }
}

TEST(CpuBackendTest, ReductionBitwiseIdenticalForAnyThreadCount) {
  // Finite data so the sum is an ordinary number sensitive to summation order.
  // 46 tasks; at least 16 (one per thread of the largest pool) under LOSSD_TEST_SCALE.
  const int64_t n = ScaledCount(3'000'000, 16 << 16) + 1;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(-8, 8), t(0, 1);
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = u(rng);
    y[i] = t(rng);
  }
  BceArgs a;
  a.numel = n;
  a.dtype = a.targets_dtype = DType::kFloat32;
  a.logits = x.data();
  a.targets = y.data();
  for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
    a.reduction = r;
    uint32_t first_bits = 0;
    for (int threads : {1, 2, 3, 7, 16}) {
      auto cpu = MakeCpuBackend({threads});
      for (int run = 0; run < 2; ++run) {
        float v;
        ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        if (threads == 1 && run == 0) first_bits = bits;
        EXPECT_EQ(bits, first_bits) << "threads=" << threads << " run=" << run;
      }
    }
    // Double output exposes all bits of the accumulation.
    std::vector<double> xd(x.begin(), x.end()), yd(y.begin(), y.end());
    BceArgs ad = a;
    ad.dtype = ad.targets_dtype = DType::kFloat64;
    ad.logits = xd.data();
    ad.targets = yd.data();
    double d1, d7;
    ASSERT_TRUE(MakeCpuBackend({1})->Bce(ad, {&d1, nullptr, nullptr}).ok());
    ASSERT_TRUE(MakeCpuBackend({7})->Bce(ad, {&d7, nullptr, nullptr}).ok());
    EXPECT_EQ(std::memcmp(&d1, &d7, 8), 0);
    double ref;
    ReferenceBce(ad, &ref, nullptr, nullptr);
    EXPECT_NEAR(d1, ref, 1e-12 * std::fabs(ref));
  }
}

// The option paths and the half types are bitwise identical for any thread count and any run
// too: ignore_index + normalize, label smoothing, focal (gamma 0.5 and 2), float16 and bfloat16
// (plain and with options), and float64, whose outputs keep every bit of the reductions. Each
// case runs under MEAN and/or the per-sample mean (last_dim 37), and every output is
// compared: loss, dl/dx, dl/dy (not offered for focal) and the per-element values. Before each
// call the outputs are filled with a byte of that call's own, so an element that some split of
// the work leaves unwritten differs too. 13001 x 37 elements: 235 blocks in 8 chunks, 4 tasks
// of per-sample rows, the [C] weight and pos_weight read from a tile at varying offsets
// (LOSSD_TEST_SCALE below 1: at least 3601 rows, 66 blocks in 3 chunks).
TEST(CpuBackendTest, OptionsAndHalfTypesBitwiseIdenticalForAnyThreadCount) {
  const int64_t rows = ScaledCount(13000, 3600) + 1, cols = 37, n = rows * cols;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0, 1);
  // y_ign has -100 markers (ignored where ignore_index is on); y has 0 there.
  std::vector<double> x(n), y(n), y_ign(n), w(cols), p(cols);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = 16 * u(rng) - 8;
    const double r = u(rng);
    y_ign[i] = r < 0.1 ? -100 : r < 0.4 ? 0 : r < 0.7 ? 1 : u(rng);
    y[i] = y_ign[i] == -100 ? 0 : y_ign[i];
  }
  for (int64_t c = 0; c < cols; ++c) {
    w[c] = 2 * u(rng);
    p[c] = 2 * u(rng);
  }
  struct Case {
    const char* name;
    DType dtype;
    Loss loss;
    double gamma;
    bool ignore_normalize;
    double smoothing;
    std::vector<Reduction> reductions;
  };
  // Focal cases (scalar element code in double, ~7x the time of BCE) take one reduction each.
  const Reduction kMean = Reduction::kMean, kPerSample = Reduction::kPerSampleMean;
  const Case cases[] = {
      {"ignore_index+normalize", DType::kFloat32, Loss::kBce, 2, true, 0, {kMean, kPerSample}},
      {"label smoothing", DType::kFloat32, Loss::kBce, 2, false, 0.1, {kMean, kPerSample}},
      {"focal gamma 0.5", DType::kFloat32, Loss::kFocal, 0.5, false, 0, {kMean}},
      {"focal gamma 2, ignore_index+normalize", DType::kFloat32, Loss::kFocal, 2, true, 0,
       {kPerSample}},
      {"float16", DType::kFloat16, Loss::kBce, 2, false, 0, {kMean, kPerSample}},
      {"bfloat16", DType::kBFloat16, Loss::kBce, 2, false, 0, {kMean, kPerSample}},
      {"float16, every BCE option", DType::kFloat16, Loss::kBce, 2, true, 0.1,
       {kMean, kPerSample}},
      {"bfloat16 focal gamma 0.5", DType::kBFloat16, Loss::kFocal, 0.5, true, 0, {kMean}},
      {"float64, every BCE option", DType::kFloat64, Loss::kBce, 2, true, 0.1,
       {kMean, kPerSample}},
      {"float64 focal gamma 2", DType::kFloat64, Loss::kFocal, 2, false, 0, {kPerSample}},
  };
  // Index of the first element where two outputs differ, -1 when bitwise identical.
  auto first_difference = [](const std::vector<unsigned char>& a,
                             const std::vector<unsigned char>& b, size_t item) -> int64_t {
    if (a == b) return -1;
    for (size_t k = 0; k < a.size(); ++k) {
      if (a[k] != b[k]) return static_cast<int64_t>(k / item);
    }
    return -1;
  };
  uint8_t fill = 0;
  for (const Case& c : cases) {
    const size_t item = ItemSize(c.dtype);
    auto store = [&](const std::vector<double>& v) {
      std::vector<unsigned char> out(v.size() * item);
      for (size_t i = 0; i < v.size(); ++i) StoreFromDouble(c.dtype, out.data(), i, v[i]);
      return out;
    };
    const auto xs = store(x), ys = store(c.ignore_normalize ? y_ign : y), ws = store(w),
               ps = store(p);
    const bool focal = c.loss == Loss::kFocal;
    for (Reduction r : c.reductions) {
      SCOPED_TRACE(::testing::Message() << c.name << ", reduction " << static_cast<int>(r));
      BceArgs a;
      a.numel = n;
      a.dtype = a.targets_dtype = c.dtype;
      a.logits = xs.data();
      a.targets = ys.data();
      a.weight = *MakeOperand("weight", c.dtype, ws.data(), {cols}, {rows, cols});
      if (!focal) {
        a.pos_weight = *MakeOperand("pos_weight", c.dtype, ps.data(), {cols}, {rows, cols});
      }
      a.reduction = r;
      a.last_dim = cols;
      a.loss = c.loss;
      a.focal_gamma = c.gamma;
      a.has_ignore_index = a.normalize = c.ignore_normalize;
      a.label_smoothing = c.smoothing;
      // loss, dl/dx, dl/dy, per-element values: bytes of the first call, then of the current.
      const char* const names[] = {"loss", "dl/dx", "dl/dy", "per-element values"};
      const size_t items[] = {item, item, item, sizeof(double)};
      const size_t bytes[] = {static_cast<size_t>(LossCount(a)) * item, n * item,
                              focal ? 0 : n * item, n * sizeof(double)};
      std::vector<unsigned char> first[4], got[4];
      for (int threads : {1, 2, 3, 7, 16}) {
        auto cpu = MakeCpuBackend({threads});
        for (int run = 0; run < 2; ++run) {
          ++fill;
          for (int k = 0; k < 4; ++k) got[k].assign(bytes[k], fill);
          BceOutputs out{got[0].data(), got[1].data(), focal ? nullptr : got[2].data(),
                         reinterpret_cast<double*>(got[3].data())};
          ASSERT_TRUE(cpu->Bce(a, out).ok());
          if (threads == 1 && run == 0) {
            for (int k = 0; k < 4; ++k) first[k] = got[k];
            continue;
          }
          for (int k = 0; k < 4; ++k) {
            const int64_t d = first_difference(first[k], got[k], items[k]);
            EXPECT_EQ(d, -1) << names[k] << " differs at element " << d << " with " << threads
                             << " threads, run " << run;
          }
        }
      }
    }
  }
}

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// A part of a larger evaluation (BceArgs::whole_numel / whole_kept), split at row bounds:
// its per-element losses, per-sample losses and gradients are the bits of the same elements
// of the whole evaluation, for every reduction, with normalize + ignore_index, label
// smoothing and the focal loss; the reference divides the same way.
TEST(CpuBackendTest, PartsWithWholeCountsMatchTheWholeBitwise) {
  const int64_t rows = 97, c = 64;
  Problem pr = MakeProblem(rows, c, 31);
  for (int64_t i = 0; i < pr.n; i += 11) pr.y[i] = -100.0f;  // ignored with ignore_index
  auto backend = MakeCpuBackend({2});
  struct Option {
    const char* name;
    void (*apply)(BceArgs*);
  };
  const Option options[] = {
      {"plain", [](BceArgs*) {}},
      {"ignore+normalize",
       [](BceArgs* a) {
         a->has_ignore_index = true;
         a->ignore_index = -100.0;
         a->normalize = true;
       }},
      {"normalize", [](BceArgs* a) { a->normalize = true; }},
      {"smoothing", [](BceArgs* a) { a->label_smoothing = 0.1; }},
      {"focal",
       [](BceArgs* a) {
         a->loss = Loss::kFocal;
         a->focal_gamma = 1.5;
       }},
  };
  for (Reduction r : {Reduction::kNone, Reduction::kSum, Reduction::kMean,
                      Reduction::kPerSampleMean}) {
    for (const Option& opt : options) {
      SCOPED_TRACE(std::string(opt.name) + " reduction " + std::to_string(static_cast<int>(r)));
      BceArgs whole = pr.args(r);
      whole.last_dim = c;
      opt.apply(&whole);
      const int64_t count = LossCount(whole);
      std::vector<float> loss(count), gx(pr.n), gy(pr.n);
      const bool gy_ok = whole.loss == Loss::kBce;
      ASSERT_TRUE(backend->Bce(whole, {loss.data(), gx.data(), gy_ok ? gy.data() : nullptr}).ok());
      int64_t kept = 0;
      for (int64_t i = 0; i < pr.n; ++i) {
        kept += !(whole.has_ignore_index && pr.y[i] == -100.0f);
      }
      std::vector<double> ref_gx(pr.n);
      ReferenceBce(whole, nullptr, ref_gx.data(), nullptr);
      for (const int64_t cut : {int64_t{1}, int64_t{40}, int64_t{96}}) {
        for (const bool first : {true, false}) {
          const int64_t r0 = first ? 0 : cut, r1 = first ? cut : rows;
          BceArgs part = whole;
          part.numel = (r1 - r0) * c;
          part.logits = pr.x.data() + r0 * c;
          part.targets = pr.y.data() + r0 * c;
          part.whole_numel = pr.n;
          if (part.normalize) part.whole_kept = kept;
          std::vector<float> pl(LossCount(part)), pgx(part.numel), pgy(part.numel);
          ASSERT_TRUE(
              backend->Bce(part, {pl.data(), pgx.data(), gy_ok ? pgy.data() : nullptr}).ok());
          for (int64_t i = 0; i < part.numel; ++i) {
            ASSERT_EQ(Bits(pgx[i]), Bits(gx[r0 * c + i])) << "dl/dx of element " << r0 * c + i;
            if (gy_ok) ASSERT_EQ(Bits(pgy[i]), Bits(gy[r0 * c + i])) << "dl/dy " << i;
          }
          if (r == Reduction::kNone || r == Reduction::kPerSampleMean) {
            const int64_t per_row = r == Reduction::kNone ? c : 1;
            for (size_t k = 0; k < pl.size(); ++k) {
              ASSERT_EQ(Bits(pl[k]), Bits(loss[r0 * per_row + k])) << "loss value " << k;
            }
          }
          // The reference divides a part as the whole too.
          std::vector<double> part_ref(part.numel);
          ReferenceBce(part, nullptr, part_ref.data(), nullptr);
          for (int64_t i = 0; i < part.numel; ++i) {
            ASSERT_EQ(std::isnan(part_ref[i]), std::isnan(ref_gx[r0 * c + i])) << i;
            if (!std::isnan(part_ref[i])) {
              ASSERT_EQ(part_ref[i], ref_gx[r0 * c + i]) << "reference dl/dx " << i;
            }
          }
        }
      }
    }
  }
}

TEST(CpuBackendTest, EmptyAndConcurrentCalls) {
  auto cpu = MakeCpuBackend({3});
  BceArgs a;
  a.numel = 0;
  a.reduction = Reduction::kMean;
  float v = 0;
  ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
  EXPECT_TRUE(std::isnan(v));
  a.reduction = Reduction::kSum;
  ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
  EXPECT_EQ(v, 0.0f);
  // Several threads share one backend.
  Problem pr = MakeProblem(5000, 40, 2);
  BceArgs b = pr.args(Reduction::kSum);
  float want;
  ASSERT_TRUE(cpu->Bce(b, {&want, nullptr, nullptr}).ok());
  std::vector<std::thread> ts;
  std::vector<float> got(6);
  for (int k = 0; k < 6; ++k) {
    ts.emplace_back([&, k] { (void)cpu->Bce(b, {&got[k], nullptr, nullptr}); });
  }
  for (auto& t : ts) t.join();
  for (float g : got) EXPECT_EQ(std::memcmp(&g, &want, 4), 0);
}

}  // namespace
}  // namespace lossd::kernels
