// The float SIMD block kernel compiles one loop per operand shape on some targets (AVX2:
// weight, pos_weight, dl/dx, dl/dy and a gradient divisor present or not, simd_block.cc). Every
// shape must give the same bits per element as the full shape with weights of one: absent
// operands are 1, absent outputs change nothing else. Run on every compiled target.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "hwy/highway.h"
#include "kernels/src/simd_block.h"

namespace lossd::kernels::internal {
namespace {

class SimdShapeTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { hwy::SetSupportedTargetsForTest(GetParam()); }
  void TearDown() override { hwy::SetSupportedTargetsForTest(0); }
};

uint32_t Bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

TEST_P(SimdShapeTest, EveryShapeMatchesTheFullShapeBitForBit) {
  // 1000 elements: whole vectors, the two-vector loop and a padded tail on every target; some
  // far, infinite and NaN logits for the rare-lane path.
  const int64_t n = 1000;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> ux(-20, 20), u01(0, 1);
  std::vector<float> x(n), y(n), ones(n, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = ux(rng);
    const float u = u01(rng);
    y[i] = u < 0.4f ? 0.0f : u < 0.8f ? 1.0f : u01(rng);
  }
  x[3] = 100.0f;
  x[500] = -INFINITY;
  x[999] = NAN;
  for (float divisor : {1.0f, 3.0f}) {
    std::vector<float> l_ref(n), gx_ref(n), gy_ref(n);
    BlockArgs<float> full;
    full.x = x.data();
    full.y = y.data();
    full.w = ones.data();
    full.p = ones.data();
    full.n = n;
    full.loss = l_ref.data();
    full.gx = gx_ref.data();
    full.gy = gy_ref.data();
    full.grad_divisor = divisor;
    BceBlock(full);
    for (int shape = 0; shape < 16; ++shape) {
      const bool has_w = shape & 1, has_p = shape & 2, want_gx = shape & 4, want_gy = shape & 8;
      std::vector<float> l(n, -1.0f), gx(n, -1.0f), gy(n, -1.0f);
      BlockArgs<float> a = full;
      a.w = has_w ? ones.data() : nullptr;
      a.p = has_p ? ones.data() : nullptr;
      a.loss = l.data();
      a.gx = want_gx ? gx.data() : nullptr;
      a.gy = want_gy ? gy.data() : nullptr;
      BceBlock(a);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(Bits(l[i]), Bits(l_ref[i]))
            << "loss, shape " << shape << ", divisor " << divisor << ", element " << i;
        if (want_gx) {
          ASSERT_EQ(Bits(gx[i]), Bits(gx_ref[i]))
              << "dl/dx, shape " << shape << ", divisor " << divisor << ", element " << i;
        }
        if (want_gy) {
          ASSERT_EQ(Bits(gy[i]), Bits(gy_ref[i]))
              << "dl/dy, shape " << shape << ", divisor " << divisor << ", element " << i;
        }
      }
    }
  }
}

std::vector<int64_t> Targets() { return hwy::SupportedAndGeneratedTargets(); }

INSTANTIATE_TEST_SUITE_P(EveryTarget, SimdShapeTest, ::testing::ValuesIn(Targets()),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return std::string(hwy::TargetName(info.param));
                         });

}  // namespace
}  // namespace lossd::kernels::internal
