// The correctly rounded mode (BceArgs::precision = kCorrectlyRounded, docs/kernels.md section 8)
// against an independent reference: the textbook torch formulas evaluated with MPFR at 1200
// bits (log1p(exp(z)) and 1 / (1 + exp(-z)) straight, no cancellation-free forms, no error
// bounds), rounded to float32, float16, bfloat16 or float64 by MPFR's own emulation of those
// formats (mpfr_check_range + mpfr_subnormalize). Every output must have the reference's bits
// (an exact zero is +0). The path under test is scalar double and MPFR code: it uses no SIMD,
// so it is the same on every Highway target. Each test prints how often the MPFR fallback ran.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/correctly_rounded.h"
#include "lossd/kernels/dtype.h"
#include "tests/kernels/test_util.h"

#if defined(LOSSD_HAVE_MPFR)
#include <mpfr.h>

#include "kernels/src/correctly_rounded.h"
#endif

namespace lossd::kernels {
namespace {

using ::lossd::testing::ScaledCount;
using ::lossd::testing::TestScale;

#if !defined(LOSSD_HAVE_MPFR)

TEST(CorrectlyRoundedTest, UnavailableWithoutMpfr) {
  EXPECT_FALSE(CorrectlyRoundedAvailable());
  GTEST_SKIP() << "built without MPFR: the correctly rounded mode is compiled out";
}

#else

constexpr mpfr_prec_t kRefBits = 1200;

struct RefFormat {
  int p, emin, emax;  // significand bits, smallest normal exponent, largest exponent
};
RefFormat RefFormatOf(DType d) {
  switch (d) {
    case DType::kFloat16:
      return {11, -14, 15};
    case DType::kBFloat16:
      return {8, -126, 127};
    case DType::kFloat64:
      return {53, -1022, 1023};
    default:
      return {24, -126, 127};
  }
}

class R {  // an MPFR number at the reference precision (or more)
 public:
  R() { mpfr_init2(v, kRefBits); }
  explicit R(double d, mpfr_prec_t bits = kRefBits) {
    mpfr_init2(v, bits);
    mpfr_set_d(v, d, MPFR_RNDN);
  }
  ~R() { mpfr_clear(v); }
  R(const R&) = delete;
  R& operator=(const R&) = delete;
  mpfr_t v;
};

// v rounded to the format by MPFR's emulation; an exact zero is +0.
double RefRound(const mpfr_t v, DType dtype) {
  if (mpfr_zero_p(v)) return 0.0;
  const RefFormat f = RefFormatOf(dtype);
  mpfr_t r;
  mpfr_init2(r, f.p);
  int inex = mpfr_set(r, v, MPFR_RNDN);
  const mpfr_exp_t emin = mpfr_get_emin(), emax = mpfr_get_emax();
  // MPFR's exponent convention: |x| in [2^(e-1), 2^e).
  mpfr_set_emin(f.emin - f.p + 2);
  mpfr_set_emax(f.emax + 1);
  inex = mpfr_check_range(r, inex, MPFR_RNDN);
  mpfr_subnormalize(r, inex, MPFR_RNDN);
  const double d = mpfr_get_d(r, MPFR_RNDN);
  mpfr_set_emin(emin);
  mpfr_set_emax(emax);
  mpfr_clear(r);
  return d;
}

void WideRange() {
  mpfr_set_emin(mpfr_get_emin_min());
  mpfr_set_emax(mpfr_get_emax_max());
}

// exp(-|z|) rounded up, so that it never underflows to 0 (beyond MPFR's exponent range, about
// |z| > 3e18, the smallest positive number stands in for it: right sign, negligible size).
void ExpNegAbs(mpfr_t out, const mpfr_t z) {
  mpfr_abs(out, z, MPFR_RNDN);
  mpfr_neg(out, out, MPFR_RNDN);
  mpfr_exp(out, out, MPFR_RNDU);
  // The stand-in is raised far above the smallest number so that products with the inputs do
  // not underflow to 0 (which would lose the sign).
  if (mpfr_get_exp(out) < mpfr_get_emin_min() + 100000) mpfr_mul_2si(out, out, 100000, MPFR_RNDN);
}
// softplus(z) = max(z, 0) + log(1 + exp(-|z|)); sigmoid(z) = 1 / (1 + exp(-z)), formed from
// exp(-|z|) (exp(|z|) overflows MPFR for huge |z|).
void Softplus(mpfr_t out, const mpfr_t z) {
  ExpNegAbs(out, z);
  mpfr_log1p(out, out, MPFR_RNDN);
  if (mpfr_sgn(z) > 0) mpfr_add(out, out, z, MPFR_RNDN);
}
void Sigmoid(mpfr_t out, const mpfr_t z) {
  mpfr_t e;
  mpfr_init2(e, mpfr_get_prec(out));
  ExpNegAbs(e, z);
  mpfr_add_ui(out, e, 1, MPFR_RNDN);
  if (mpfr_sgn(z) >= 0) {
    mpfr_ui_div(out, 1, out, MPFR_RNDN);
  } else {
    mpfr_div(out, e, out, MPFR_RNDN);
  }
  mpfr_clear(e);
}

struct Case {
  double x, y, w, p;
};

// The textbook formulas (torch's, with Keras smoothing):
//   y' = y (1 - s) + s / 2,  loss = w [(1 - y') sp(x) + p y' sp(-x)],
//   dl/dx = w [(1 - y') s(x) - p y' s(-x)],  dl/dy = (1 - s) w [p sp(-x) - sp(x)].
// Outputs undivided; `k`: 0 loss, 1 dl/dx, 2 dl/dy.
void RefOutput(const Case& c, double s, int k, mpfr_t out, mpfr_prec_t bits) {
  R x(c.x, bits), y(c.y, bits), w(c.w, bits), p(c.p, bits), ys(0, bits), a(0, bits), b(0, bits),
      t1(0, bits), t2(0, bits), mx(0, bits), om(0, bits);
  mpfr_ui_sub(om.v, 1, R(s).v, MPFR_RNDN);
  mpfr_mul(ys.v, y.v, om.v, MPFR_RNDN);
  mpfr_set_d(t1.v, s, MPFR_RNDN);
  mpfr_div_2ui(t1.v, t1.v, 1, MPFR_RNDN);
  mpfr_add(ys.v, ys.v, t1.v, MPFR_RNDN);
  mpfr_ui_sub(a.v, 1, ys.v, MPFR_RNDN);
  mpfr_mul(b.v, p.v, ys.v, MPFR_RNDN);
  mpfr_neg(mx.v, x.v, MPFR_RNDN);
  if (k == 0) {
    Softplus(t1.v, x.v);
    Softplus(t2.v, mx.v);
    mpfr_mul(t1.v, t1.v, a.v, MPFR_RNDN);
    mpfr_mul(t2.v, t2.v, b.v, MPFR_RNDN);
    mpfr_add(out, t1.v, t2.v, MPFR_RNDN);
  } else if (k == 1) {
    Sigmoid(t1.v, x.v);
    Sigmoid(t2.v, mx.v);
    mpfr_mul(t1.v, t1.v, a.v, MPFR_RNDN);
    mpfr_mul(t2.v, t2.v, b.v, MPFR_RNDN);
    mpfr_sub(out, t1.v, t2.v, MPFR_RNDN);
  } else {
    Softplus(t1.v, x.v);
    Softplus(t2.v, mx.v);
    mpfr_mul(t2.v, t2.v, p.v, MPFR_RNDN);
    mpfr_sub(out, t2.v, t1.v, MPFR_RNDN);
    mpfr_mul(out, out, om.v, MPFR_RNDN);
  }
  mpfr_mul(out, out, w.v, MPFR_RNDN);
}

// Whether v is exactly a rounding midpoint of the format (p + 1 significant bits, the last 1,
// within the normal range).
bool AtMidpoint(const mpfr_t v, DType dtype) {
  if (!mpfr_regular_p(v)) return false;
  const RefFormat f = RefFormatOf(dtype);
  mpfr_t t;
  mpfr_init2(t, f.p + 1);
  const int inex = mpfr_set(t, v, MPFR_RNDN);
  mpfr_t u;
  mpfr_init2(u, f.p);
  const int inex2 = mpfr_set(u, t, MPFR_RNDN);
  mpfr_clear(t);
  mpfr_clear(u);
  return inex == 0 && inex2 != 0;
}

// Reference outputs at 1200 bits land exactly on a midpoint when the exact value is a
// rational midpoint plus a transcendental part below 2^-1200 of it (large |x|): those are
// evaluated again with 1.5 |x| more bits, up to |x| = kDeepX; beyond, they are not compared
// here (HardCasesAtMidpoints checks such values).
constexpr double kDeepX = 1e5;

// Bits of element i of a tensor as double.
double At(DType d, const std::vector<uint8_t>& buf, int64_t i) {
  return LoadAsDouble(d, buf.data(), i);
}

std::vector<uint8_t> Encode(DType d, const std::vector<double>& v) {
  std::vector<uint8_t> buf(v.size() * ItemSize(d));
  for (size_t i = 0; i < v.size(); ++i) StoreFromDouble(d, buf.data(), i, v[i]);
  return buf;
}

bool SameBits(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

struct CrRun {
  std::vector<double> loss, gx, gy;
  std::vector<std::vector<int64_t>> unchecked;  // reference: outputs not compared
};

struct CrSetup {
  DType dtype = DType::kFloat32;
  Reduction reduction = Reduction::kNone;
  double smoothing = 0.0;
  bool normalize = false;
  bool ignore = false;
  double ignore_index = -100.0;
  int64_t last_dim = 1;
  bool per_element_weights = true;
};

// Runs the correctly rounded mode on `cases` (their x, y, w, p already values of `dtype`; w and
// p travel as full float64 tensors so that any value is possible) and returns the outputs.
CrRun RunCr(const std::vector<Case>& cases, const CrSetup& s, int threads = 2) {
  const int64_t n = static_cast<int64_t>(cases.size());
  std::vector<double> x(n), y(n), w(n), p(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = cases[i].x;
    y[i] = cases[i].y;
    w[i] = cases[i].w;
    p[i] = cases[i].p;
  }
  const auto xb = Encode(s.dtype, x), yb = Encode(s.dtype, y);
  const auto wb = Encode(DType::kFloat64, w), pb = Encode(DType::kFloat64, p);
  BceArgs a;
  a.numel = n;
  a.dtype = s.dtype;
  a.logits = xb.data();
  a.targets_dtype = s.dtype;
  a.targets = yb.data();
  a.weight = Operand{DType::kFloat64, wb.data(), 1, std::max<int64_t>(n, 1), nullptr};
  a.pos_weight = Operand{DType::kFloat64, pb.data(), 1, std::max<int64_t>(n, 1), nullptr};
  a.reduction = s.reduction;
  a.last_dim = s.last_dim;
  a.label_smoothing = s.smoothing;
  a.normalize = s.normalize;
  a.has_ignore_index = s.ignore;
  a.ignore_index = s.ignore_index;
  a.precision = Precision::kCorrectlyRounded;
  const size_t item = ItemSize(s.dtype);
  const int64_t lc = LossCount(a);
  std::vector<uint8_t> lb(std::max<int64_t>(lc, 1) * item), gxb(std::max<int64_t>(n, 1) * item),
      gyb(std::max<int64_t>(n, 1) * item);
  BceOutputs o;
  o.loss = lb.data();
  o.grad_logits = gxb.data();
  o.grad_targets = gyb.data();
  CpuOptions co;
  co.threads = threads;
  auto backend = MakeCpuBackend(co);
  const absl::Status st = backend->Bce(a, o);
  EXPECT_TRUE(st.ok()) << st;
  CrRun r;
  for (int64_t i = 0; i < lc; ++i) r.loss.push_back(At(s.dtype, lb, i));
  for (int64_t i = 0; i < n; ++i) {
    r.gx.push_back(At(s.dtype, gxb, i));
    r.gy.push_back(At(s.dtype, gyb, i));
  }
  return r;
}

double RoundTrip(DType d, double v) {
  uint8_t buf[8];
  StoreFromDouble(d, buf, 0, v);
  return LoadAsDouble(d, buf, 0);
}

// Inputs as the kernel sees them (x and y rounded to the tensor dtype).
std::vector<Case> Quantize(std::vector<Case> cases, DType dtype) {
  for (Case& c : cases) {
    c.x = RoundTrip(dtype, c.x);
    c.y = RoundTrip(dtype, c.y);
  }
  return cases;
}

// The reference outputs for `cases` under `s`.
CrRun Reference(const std::vector<Case>& cases, const CrSetup& s) {
  WideRange();
  const int64_t n = static_cast<int64_t>(cases.size());
  auto ignored = [&](const Case& c) { return s.ignore && c.y == s.ignore_index; };
  int64_t kept = n;
  if (s.normalize && s.ignore) {
    for (const Case& c : cases) kept -= ignored(c);
  }
  const double count = s.normalize ? static_cast<double>(std::max<int64_t>(kept, 1)) : 1.0;
  double gdiv = count;
  if (s.reduction == Reduction::kMean) gdiv *= static_cast<double>(n);
  if (s.reduction == Reduction::kPerSampleMean) gdiv *= static_cast<double>(s.last_dim);
  CrRun r;
  r.unchecked.resize(3);
  auto& unchecked = r.unchecked;
  R v, acc;
  mpfr_set_zero(acc.v, 1);
  const int64_t row = s.reduction == Reduction::kPerSampleMean ? s.last_dim : n;
  for (int64_t i = 0; i < n; ++i) {
    const Case& c = cases[i];
    double outs[3];
    for (int k = 0; k < 3; ++k) {
      if (ignored(c)) {
        mpfr_set_zero(v.v, 1);
      } else if (std::isinf(c.x)) {
        // The textbook form gives NaN for 0 * inf; the limits are InfiniteLogitsAreTheLimits'.
        mpfr_set_zero(v.v, 1);
        if (s.reduction == Reduction::kNone || k > 0) unchecked[k].push_back(i);
      } else {
        RefOutput(c, s.smoothing, k, v.v, kRefBits);
        if (s.reduction == Reduction::kNone || k > 0) {
          mpfr_t q;
          mpfr_init2(q, kRefBits);
          mpfr_div_d(q, v.v, k == 0 ? count : gdiv, MPFR_RNDN);
          if (AtMidpoint(q, s.dtype) && std::fabs(c.x) > 100) {
            if (std::fabs(c.x) <= kDeepX) {
              const auto bits = static_cast<mpfr_prec_t>(kRefBits + 1.5 * std::fabs(c.x));
              mpfr_set_prec(v.v, bits);
              RefOutput(c, s.smoothing, k, v.v, bits);
            } else {
              unchecked[k].push_back(i);
            }
          }
          mpfr_clear(q);
        }
      }
      if (k == 0) {
        mpfr_add(acc.v, acc.v, v.v, MPFR_RNDN);  // acc has 1200 bits: sums are not deepened
        mpfr_div_d(v.v, v.v, count, MPFR_RNDN);
      } else {
        mpfr_div_d(v.v, v.v, gdiv, MPFR_RNDN);
      }
      outs[k] = RefRound(v.v, s.dtype);
    }
    if (s.reduction == Reduction::kNone) r.loss.push_back(outs[0]);
    r.gx.push_back(outs[1]);
    r.gy.push_back(outs[2]);
    if (s.reduction != Reduction::kNone && (i + 1) % row == 0) {
      double d = count;
      if (s.reduction == Reduction::kMean) d *= static_cast<double>(n);
      if (s.reduction == Reduction::kPerSampleMean) d *= static_cast<double>(s.last_dim);
      mpfr_div_d(acc.v, acc.v, d, MPFR_RNDN);
      r.loss.push_back(RefRound(acc.v, s.dtype));
      mpfr_set_zero(acc.v, 1);
    }
  }
  return r;
}

std::string Describe(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "x=%.17g y=%.17g w=%.17g p=%.17g", c.x, c.y, c.w, c.p);
  return buf;
}

// Runs, compares every output bit for bit, prints the fallback counts; returns mismatches.
int64_t Check(const char* name, const std::vector<Case>& raw, const CrSetup& s) {
  const std::vector<Case> cases = Quantize(raw, s.dtype);
  const CorrectlyRoundedStats before = GetCorrectlyRoundedStats();
  const CrRun got = RunCr(cases, s);
  const CorrectlyRoundedStats after = GetCorrectlyRoundedStats();
  const CrRun want = Reference(cases, s);
  int64_t bad = 0;
  int64_t skipped = 0;
  auto cmp = [&](const char* what, const std::vector<double>& g, const std::vector<double>& w,
                 bool per_element, int k) {
    EXPECT_EQ(g.size(), w.size()) << what;
    std::vector<char> skip(g.size(), 0);
    for (int64_t i : want.unchecked[k]) {
      if (per_element) skip[i] = 1;
    }
    for (size_t i = 0; i < std::min(g.size(), w.size()); ++i) {
      if (skip[i]) {
        ++skipped;
        continue;
      }
      if (SameBits(g[i], w[i])) continue;
      if (++bad <= 8) {
        ADD_FAILURE() << name << " " << what << "[" << i << "] got " << g[i] << " want "
                      << w[i] << (per_element ? " at " + Describe(cases[i]) : std::string());
      }
    }
  };
  cmp("loss", got.loss, want.loss, s.reduction == Reduction::kNone, 0);
  cmp("dl/dx", got.gx, want.gx, true, 1);
  cmp("dl/dy", got.gy, want.gy, true, 2);
  const int64_t outputs = static_cast<int64_t>(got.loss.size() + got.gx.size() + got.gy.size());
  std::printf(
      "[ CR ] %-34s %s: %lld outputs (%lld not compared), %lld mismatches; fast %lld, MPFR fallback %lld (%.2e), "
      "MPFR direct %lld, special %lld, reductions %lld (fallback %lld), unresolved %lld\n",
      name, DTypeName(s.dtype).c_str(), static_cast<long long>(outputs),
      static_cast<long long>(skipped), static_cast<long long>(bad), static_cast<long long>(after.fast_outputs - before.fast_outputs),
      static_cast<long long>(after.fallback_outputs - before.fallback_outputs),
      static_cast<double>(after.fallback_outputs - before.fallback_outputs) /
          static_cast<double>(std::max<int64_t>(outputs, 1)),
      static_cast<long long>(after.direct_outputs - before.direct_outputs),
      static_cast<long long>(after.special_outputs - before.special_outputs),
      static_cast<long long>(after.reductions - before.reductions),
      static_cast<long long>(after.reduction_fallbacks - before.reduction_fallbacks),
      static_cast<long long>(after.unresolved - before.unresolved));
  EXPECT_EQ(after.unresolved, before.unresolved);
  return bad;
}

// Logits near the hard regions: tiny |x| (subnormal to 2^-10), a dense band around 0, the
// float exp underflow region (80..110), the double one (700..760) and huge |x| up to FLT_MAX.
std::vector<double> GridLogits(int64_t dense, std::mt19937_64& rng) {
  std::vector<double> xs = {0.0, 1e-45, 1.4e-45, 1e-40, 1e-30, 1e-20, 1e-10, 1e-7, 6e-8,
                            0.001, 0.5, 1.0, 2.0, 17.0, 87.3, 88.72, 89.0, 103.9, 104.0,
                            700.0, 708.3, 708.5, 745.1, 746.0, 1e4, 1e6, 1e20, 3.4028234e38};
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t k = 0; k < dense; ++k) xs.push_back(-30.0 + 60.0 * (k + u(rng)) / dense);
  for (int64_t k = 0; k < dense / 8; ++k) xs.push_back(80.0 + 30.0 * u(rng));
  for (int64_t k = 0; k < dense / 8; ++k) xs.push_back(700.0 + 60.0 * u(rng));
  for (int64_t k = 0; k < dense / 8; ++k) xs.push_back(std::ldexp(1.0 + u(rng), -(int)(rng() % 150)));
  const size_t m = xs.size();
  for (size_t k = 0; k < m; ++k) xs.push_back(-xs[k]);
  return xs;
}

std::vector<Case> Grid(const std::vector<double>& xs, const std::vector<double>& ys,
                       const std::vector<std::pair<double, double>>& wps) {
  std::vector<Case> cases;
  for (double x : xs) {
    for (double y : ys) {
      for (auto [w, p] : wps) cases.push_back({x, y, w, p});
    }
  }
  return cases;
}

// The references here use MPFR on the test's thread: its per-thread caches and pool are freed
// once every test has run (the leak check of `make asan`).
class MpfrCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    mpfr_free_cache2(MPFR_FREE_LOCAL_CACHE);
    mpfr_free_pool();
  }
};
[[maybe_unused]] ::testing::Environment* const kMpfrCleanup =
    ::testing::AddGlobalTestEnvironment(new MpfrCleanup);

class CorrectlyRoundedTest : public ::testing::Test {
 protected:
  void SetUp() override { internal::SetCorrectlyRoundedFastPathForTesting(true); }
  void TearDown() override { internal::SetCorrectlyRoundedFastPathForTesting(true); }
};

TEST_F(CorrectlyRoundedTest, Available) {
  EXPECT_TRUE(CorrectlyRoundedAvailable());
  EXPECT_TRUE(mpfr_buildopt_tls_p()) << "MPFR must be thread-safe (per-thread exponent range)";
}

TEST_F(CorrectlyRoundedTest, Float32DenseGridNearHardCases) {
  std::mt19937_64 rng(1);
  const auto xs = GridLogits(ScaledCount(1200, 200), rng);
  const std::vector<double> ys = {0.0, 1.0, 0.5, 0.25, 0.1, 0.9, 0.999, 1e-7, 0.3721};
  const std::vector<std::pair<double, double>> wps = {
      {1.0, 1.0}, {0.3, 3.0}, {1e3, 0.5}, {1e-20, 100.0}};
  CrSetup s;
  EXPECT_EQ(Check("dense grid", Grid(xs, ys, wps), s), 0);
}

TEST_F(CorrectlyRoundedTest, HalfTypesGrids) {
  std::mt19937_64 rng(2);
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    // Every 7th finite value of the type as the logit.
    std::vector<double> xs;
    for (uint32_t b = 0; b < 0x10000; b += 7) {
      uint8_t buf[2] = {static_cast<uint8_t>(b & 0xff), static_cast<uint8_t>(b >> 8)};
      const double v = LoadAsDouble(d, buf, 0);
      if (std::isfinite(v)) xs.push_back(v);
    }
    const std::vector<double> ys = {0.0, 1.0, 0.5, 0.2};
    const std::vector<std::pair<double, double>> wps = {{1.0, 1.0}, {2.5, 0.75}};
    std::vector<Case> cases = Grid(xs, ys, wps);
    if (TestScale() < 1) cases.resize(ScaledCount(cases.size(), 1000));
    CrSetup s;
    s.dtype = d;
    EXPECT_EQ(Check("every 7th value", cases, s), 0);
  }
}

// x: random finite float32 bit patterns (the whole range); y uniform in [0, 1] with some hard
// labels; w, p random in [0, 1e3] with some 0 and 1.
std::vector<Case> RandomCases(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<Case> cases;
  while (static_cast<int64_t>(cases.size()) < n) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    float x;
    std::memcpy(&x, &bits, 4);
    if (!std::isfinite(x)) continue;
    const double r = u(rng);
    const double y = r < 0.1 ? 0.0 : r < 0.2 ? 1.0 : u(rng);
    auto weight = [&] {
      const double q = u(rng);
      return q < 0.05 ? 0.0 : q < 0.2 ? 1.0 : static_cast<double>(static_cast<float>(1e3 * u(rng)));
    };
    cases.push_back({x, y, weight(), weight()});
  }
  return cases;
}

TEST_F(CorrectlyRoundedTest, Float32RandomFullRange) {
  const auto cases = RandomCases(ScaledCount(20000, 2000), 3);
  CrSetup s;
  EXPECT_EQ(Check("random, NONE", cases, s), 0);
  // Logits of moderate size, where both terms and the divisors matter.
  std::vector<Case> mid = cases;
  std::mt19937_64 rng(4);
  std::uniform_real_distribution<double> u(-40.0, 40.0);
  for (Case& c : mid) c.x = u(rng);
  EXPECT_EQ(Check("random |x| < 40, NONE", mid, s), 0);
  s.reduction = Reduction::kMean;
  EXPECT_EQ(Check("random |x| < 40, MEAN", mid, s), 0);
  s.reduction = Reduction::kSum;
  EXPECT_EQ(Check("random, SUM", cases, s), 0);
  s.reduction = Reduction::kPerSampleMean;
  s.last_dim = 10;
  EXPECT_EQ(Check("random |x| < 40, PER_SAMPLE_MEAN", mid, s), 0);
}

TEST_F(CorrectlyRoundedTest, OptionsSmoothingNormalizeIgnoreIndex) {
  auto cases = RandomCases(ScaledCount(4000, 800), 5);
  std::mt19937_64 rng(6);
  std::uniform_real_distribution<double> u(-60.0, 60.0);
  for (size_t i = 0; i < cases.size(); ++i) {
    if (i % 2) cases[i].x = u(rng);
    if (i % 9 == 0) cases[i].y = -100.0;
  }
  CrSetup s;
  s.smoothing = 0.1;
  s.normalize = true;
  s.ignore = true;
  EXPECT_EQ(Check("smoothing 0.1, normalize, ignore", cases, s), 0);
  s.reduction = Reduction::kMean;
  s.smoothing = 0.3;
  EXPECT_EQ(Check("smoothing 0.3, normalize, MEAN", cases, s), 0);
  s.dtype = DType::kFloat16;
  s.reduction = Reduction::kNone;
  EXPECT_EQ(Check("smoothing 0.3, normalize", cases, s), 0);
}

TEST_F(CorrectlyRoundedTest, Float64Outputs) {
  auto cases = RandomCases(ScaledCount(1500, 300), 7);
  std::mt19937_64 rng(8);
  std::uniform_real_distribution<double> u(-50.0, 50.0);
  for (size_t i = 0; i < cases.size(); i += 2) cases[i].x = u(rng);
  CrSetup s;
  s.dtype = DType::kFloat64;
  EXPECT_EQ(Check("random, NONE", cases, s), 0);
  s.reduction = Reduction::kSum;
  EXPECT_EQ(Check("random, SUM", cases, s), 0);
}

// The fallback on its own: with the double evaluation disabled, every output is resolved by
// MPFR, and must give the same bits.
TEST_F(CorrectlyRoundedTest, MpfrResolutionAloneAgrees) {
  std::mt19937_64 rng(9);
  const auto xs = GridLogits(ScaledCount(300, 100), rng);
  const auto cases = Grid(xs, {0.0, 1.0, 0.3}, {{1.0, 1.0}, {0.7, 4.0}});
  internal::SetCorrectlyRoundedFastPathForTesting(false);
  CrSetup s;
  EXPECT_EQ(Check("MPFR only, grid", cases, s), 0);
  s.reduction = Reduction::kMean;
  EXPECT_EQ(Check("MPFR only, grid, MEAN", cases, s), 0);
}

// Values at or extremely near a float32 rounding midpoint, where the double evaluation's bound
// cannot decide and the fallback must.
TEST_F(CorrectlyRoundedTest, HardCasesAtMidpoints) {
  const double m23 = std::ldexp(1.0, -23);
  CrSetup s;
  // Exact rational midpoints (x = 0: dl/dx = w (1 - y - p y) / 2): ties to even.
  // y = -0.25, p = 1: (1 - y - p y) = 1.5; w = 1 + 2^-23 gives 0.75 (1 + 2^-23), a midpoint.
  EXPECT_EQ(Check("x = 0 midpoints", {{0.0, -0.25, 1 + m23, 1.0}, {0.0, -0.25, 1 + 3 * m23, 1.0}},
                  s),
            0);
  // loss = w x + w L(x) for y = 0 and x > 0: w x an exact midpoint, L(x) > 0 decides upward,
  // against the tie's even choice (w = 1 + 3 2^-23, x = 1.5 2^k).
  for (int k : {6, 10, 16, 100}) {
    const double x = std::ldexp(1.5, k);
    const float got = [&] {
      const CrRun r = RunCr({{x, 0.0, 1 + 3 * m23, 1.0}}, s);
      return static_cast<float>(r.loss[0]);
    }();
    const double mid = x * (1 + 3 * m23);  // exact in double: 2^k (1.5 + 4.5 2^-23)
    const float below = static_cast<float>(std::ldexp(1.5 + 4 * m23, k));  // the even one
    const float above = std::nextafter(below, HUGE_VALF);
    ASSERT_LT(below, mid);
    ASSERT_GT(above, mid);
    EXPECT_EQ(got, above) << "x = " << x;
    // dl/dx = w (1 - y) s(x) = w - w S(x) with y = -0.5 (1 - y = 1.5) and w = 1 + 2^-23: just
    // below the midpoint 1.5 (1 + 2^-23), so downward (the tie would go up).
    const CrRun g = RunCr({{x, -0.5, 1 + m23, 1.0}}, s);
    EXPECT_EQ(static_cast<float>(g.gx[0]), static_cast<float>(1.5 + m23)) << "x = " << x;
  }
  // Far logits whose value is only the tiny transcendental part: its sign survives as the
  // zero's sign.
  const CrRun z = RunCr({{-1e6, 0.0, 1.0, 1.0}, {-1e6, 0.0, -1.0, 1.0}, {1e30, 1.0, 2.0, 1.0}}, s);
  EXPECT_TRUE(SameBits(z.loss[0], 0.0));
  EXPECT_TRUE(SameBits(z.loss[1], -0.0));
  EXPECT_TRUE(SameBits(z.gx[0], 0.0));
  EXPECT_TRUE(SameBits(z.gx[1], -0.0));
  EXPECT_TRUE(SameBits(z.loss[2], 0.0));
  EXPECT_TRUE(SameBits(z.gx[2], -0.0));  // -w p s(-x): tiny negative
}

TEST_F(CorrectlyRoundedTest, ExactCancellationInReductions) {
  CrSetup s;
  s.reduction = Reduction::kSum;
  // w = +1 and w = -1 on the same element: the exact sum is 0 (+0), not an endless refinement.
  const CrRun r = RunCr({{0.7, 0.3, 1.0, 2.0}, {0.7, 0.3, -1.0, 2.0}, {-3.0, 1.0, 2.0, 0.5},
                       {3.0, 0.0, -1.0, 0.5}},
                      s);
  EXPECT_TRUE(SameBits(r.loss[0], 0.0)) << r.loss[0];
  EXPECT_EQ(GetCorrectlyRoundedStats().unresolved, 0);
}

TEST_F(CorrectlyRoundedTest, InfiniteLogitsAreTheLimits) {
  CrSetup s;
  const CrRun r = RunCr({{HUGE_VAL, 1.0, 2.0, 1.0}, {HUGE_VAL, 0.25, 3.0, 1.0},
                       {-HUGE_VAL, 0.25, 3.0, 1.0}},
                      s);
  // x = +inf, y = 1: loss 0, dl/dx 0, dl/dy = w (p sp(-x) - sp(x)) = -inf.
  EXPECT_TRUE(SameBits(r.loss[0], 0.0));
  EXPECT_TRUE(SameBits(r.gx[0], 0.0));
  EXPECT_EQ(r.gy[0], -HUGE_VAL);
  EXPECT_EQ(r.loss[1], HUGE_VAL);
  EXPECT_EQ(r.gx[1], 2.25);   // w (1 - y)
  EXPECT_EQ(r.gx[2], -0.75);  // -w p y
}

TEST_F(CorrectlyRoundedTest, SameBitsForAnyThreadCount) {
  const auto cases = Quantize(RandomCases(ScaledCount(70000, 70000), 10), DType::kFloat32);
  CrSetup s;
  s.reduction = Reduction::kMean;
  const CrRun a = RunCr(cases, s, 1), b = RunCr(cases, s, 3);
  EXPECT_TRUE(SameBits(a.loss[0], b.loss[0]));
  for (size_t i = 0; i < a.gx.size(); ++i) {
    ASSERT_TRUE(SameBits(a.gx[i], b.gx[i])) << i;
    ASSERT_TRUE(SameBits(a.gy[i], b.gy[i])) << i;
  }
}

TEST_F(CorrectlyRoundedTest, RejectsFocalAndAccumulate) {
  std::vector<float> x = {0.5f}, y = {1.0f}, l(1);
  std::vector<double> values(1);
  BceArgs a;
  a.numel = 1;
  a.logits = x.data();
  a.targets = y.data();
  a.reduction = Reduction::kNone;
  a.precision = Precision::kCorrectlyRounded;
  BceOutputs o;
  o.loss = l.data();
  auto backend = MakeCpuBackend();
  a.loss = Loss::kFocal;
  EXPECT_EQ(backend->Bce(a, o).code(), absl::StatusCode::kInvalidArgument);
  a.loss = Loss::kBce;
  o.loss_values = values.data();
  EXPECT_EQ(backend->Bce(a, o).code(), absl::StatusCode::kInvalidArgument);
}

#endif  // LOSSD_HAVE_MPFR

}  // namespace
}  // namespace lossd::kernels
