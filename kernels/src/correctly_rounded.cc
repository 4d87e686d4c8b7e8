// The correctly rounded mode (docs/kernels.md section 8): every output is the exact value of
// the loss formula for the given inputs, rounded once to nearest-even in the output's format.
//
// Each output has the form (R + C T(t)) / D: R and C are exact rationals built from the inputs
// (products and sums of doubles), t = |x|, T is L(t) = log1p(exp(-t)) or S(t) = exp(-t) / (1 +
// exp(-t)), and D is a positive integer (the reduction's and normalize's divisor):
//   loss  = w [A x+ + B x-] + w (A + B) L,        A = 1 - y', B = p y', x+ = max(x, 0), x- = ...
//   dl/dx = w A - w (A + B) S   (x >= 0),          -w B + w (A + B) S   (x < 0)
//   dl/dy = (1 - s) w [p x- - x+] + (1 - s) w (p - 1) L
// with y' = y (1 - s) + s / 2 the smoothed target. The double evaluation (Ax) carries a
// running bound of its error; when the bound cannot decide the rounding, MPFR evaluates the same
// form with exact R, C and D and a Ziv loop on T. This file is a plain scalar path: no SIMD.
#include "kernels/src/correctly_rounded.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/src/bce_math.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/correctly_rounded.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "kernels/src/resolved_loss.h"

#if defined(LOSSD_HAVE_MPFR)
#include <mpfr.h>
#endif

namespace lossd::kernels {

namespace {

struct Counters {
  std::atomic<int64_t> elements{0}, fast{0}, fallback{0}, direct{0}, special{0}, reductions{0},
      reduction_fallbacks{0}, unresolved{0}, max_bits{0};
};
Counters& Stats() {
  static Counters c;
  return c;
}
std::atomic<bool> g_fast_path{true};

}  // namespace

CorrectlyRoundedStats GetCorrectlyRoundedStats() {
  Counters& c = Stats();
  CorrectlyRoundedStats s;
  s.elements = c.elements.load();
  s.fast_outputs = c.fast.load();
  s.fallback_outputs = c.fallback.load();
  s.direct_outputs = c.direct.load();
  s.special_outputs = c.special.load();
  s.reductions = c.reductions.load();
  s.reduction_fallbacks = c.reduction_fallbacks.load();
  s.unresolved = c.unresolved.load();
  s.max_bits = c.max_bits.load();
  return s;
}

void ResetCorrectlyRoundedStats() {
  Counters& c = Stats();
  for (auto* a : {&c.elements, &c.fast, &c.fallback, &c.direct, &c.special, &c.reductions,
                  &c.reduction_fallbacks, &c.unresolved, &c.max_bits}) {
    a->store(0);
  }
}

namespace internal {

void SetCorrectlyRoundedFastPathForTesting(bool enabled) { g_fast_path.store(enabled); }

}  // namespace internal

#if !defined(LOSSD_HAVE_MPFR)

bool CorrectlyRoundedAvailable() { return false; }

namespace internal {
absl::Status CorrectlyRoundedBce(const BceArgs&, const BceOutputs&, ThreadPool&) {
  return absl::UnimplementedError(
      "precision CORRECTLY_ROUNDED is not available in this build (built without MPFR)");
}
}  // namespace internal

#else  // LOSSD_HAVE_MPFR

bool CorrectlyRoundedAvailable() { return true; }

namespace internal {
namespace {

// ---------------------------------------------------------------------------------------------
// Output formats and rounding to them.

struct Fmt {
  int p;     // significand bits
  int emin;  // exponent of the smallest normal (2^emin)
  int emax;  // exponent of the largest finite binade
};
constexpr Fmt kF32{24, -126, 127};
constexpr Fmt kF16{11, -14, 15};
constexpr Fmt kBF16{8, -126, 127};
constexpr Fmt kF64{53, -1022, 1023};

Fmt FmtOf(DType d) {
  switch (d) {
    case DType::kFloat16:
      return kF16;
    case DType::kBFloat16:
      return kBF16;
    case DType::kFloat64:
      return kF64;
    default:
      return kF32;
  }
}

double MaxFinite(const Fmt& f) { return std::ldexp(2.0 - std::ldexp(1.0, 1 - f.p), f.emax); }

// Exponent of the quantum (ulp) of a value v != 0 of binade [2^(e-1), 2^e) in format f.
int Quantum(const Fmt& f, int e) { return std::max(e - f.p, f.emin - f.p + 1); }

// d rounded to nearest-even in f, as the exact double of that value (+-inf past the largest
// finite value). Needs the default rounding mode (to nearest).
double RoundTo(const Fmt& f, double d) {
  if (f.p == 53 || d == 0 || !std::isfinite(d)) return d;
  int e;
  std::frexp(d, &e);
  const int q = Quantum(f, e);
  const double r = std::ldexp(std::nearbyint(std::ldexp(d, -q)), q);
  if (std::fabs(r) > MaxFinite(f)) return std::copysign(HUGE_VAL, d);
  return r;
}

bool SameBits(double a, double b) {
  return a == b && std::signbit(a) == std::signbit(b);
}

// ---------------------------------------------------------------------------------------------
// The double evaluation with a running error bound (docs/kernels.md section 8.2).

constexpr double kU = 0x1p-53;         // unit roundoff of double
constexpr double kEta = 0x1p-1074;     // absolute error of an underflowing product or quotient
constexpr double kTinyProd = 0x1p-1021;  // below this a product may have lost bits to underflow
// Relative error bound of L(t) and S(t) as evaluated below, assuming libm's exp and log1p within
// 2 ulp (glibc states 1): section 8.2.
constexpr double kEpsT = 0x1p-49;
// Beyond it exp(-t) < 2^-1021 and the double evaluation takes T = 0 with that absolute error.
constexpr double kFarT = 708.0;
constexpr double kFarBound = 0x1p-1021;

// A double v and a bound e >= |v - exact|. e == 0 means v is exact.
struct Ax {
  double v = 0.0;
  double e = 0.0;
};

Ax Ex(double v) { return {v, 0.0}; }
Ax Neg(Ax a) { return {-a.v, a.e}; }
Ax Add(Ax a, Ax b) {
  const double v = a.v + b.v;  // an underflowing sum is exact: no absolute term
  return {v, a.e + b.e + kU * std::fabs(v)};
}
Ax Sub(Ax a, Ax b) { return Add(a, Neg(b)); }
Ax Mul(Ax a, Ax b) {
  if ((a.v == 0 && a.e == 0) || (b.v == 0 && b.e == 0)) return {0.0, 0.0};  // exact zero factor
  const double v = a.v * b.v;
  double e = std::fabs(a.v) * b.e + std::fabs(b.v) * a.e + a.e * b.e + kU * std::fabs(v);
  if (std::fabs(v) < kTinyProd) e += kEta;
  return {v, e};
}
// a / d for d.v > d.e >= 0.
Ax Div(Ax a, Ax d) {
  if (a.v == 0 && a.e == 0) return {0.0, 0.0};  // exact zero
  const double v = a.v / d.v;
  const double lo = d.v - d.e;
  double e = a.e / lo + std::fabs(a.v) * d.e / (d.v * lo) + kU * std::fabs(v);
  if (std::fabs(v) < kTinyProd) e += kEta;
  return {v, e};
}

// Rounds `a` to f when its whole error interval rounds to one value of f.
bool Decide(const Fmt& f, Ax a, double* out) {
  if (!std::isfinite(a.v) || !std::isfinite(a.e)) return false;
  if (a.e == 0) {  // the double is the exact value (an exact zero is +0)
    *out = a.v == 0 ? 0.0 : RoundTo(f, a.v);
    return true;
  }
  // The bound's own evaluation rounds (at most ~40 operations on non-negative terms).
  const double e = a.e * (1.0 + 0x1p-40);
  const double lo = std::nextafter(a.v - e, -HUGE_VAL);
  const double hi = std::nextafter(a.v + e, HUGE_VAL);
  const double rl = RoundTo(f, lo);
  const double rh = RoundTo(f, hi);
  if (!SameBits(rl, rh)) return false;
  *out = rl;
  return true;
}

// ---------------------------------------------------------------------------------------------
// MPFR: exact rationals and the Ziv loop.

constexpr mpfr_prec_t kMaxBits = 1 << 14;
// Beyond it MPFR takes exp(-t) as 0 with the bound 2^-kFarExpBits (far inside its extended
// exponent range).
constexpr double kMpFarT = 1e9;
constexpr long kFarExpBits = 1400000000;

// MPFR keeps caches per thread (constants such as log 2, tables of its exp) and a pool of
// small allocations; they are freed when the thread that filled them ends, so that no thread
// leaves them behind (the leak check of `make asan`). Every MPFR number here is an Mp, whose
// constructor registers the cleanup on its thread.
struct MpfrThreadCleanup {
  ~MpfrThreadCleanup() {
    mpfr_free_cache2(MPFR_FREE_LOCAL_CACHE);
    mpfr_free_pool();
  }
};
void CleanUpMpfrOnThreadExit() {
  thread_local MpfrThreadCleanup cleanup;
  (void)cleanup;
}

class Mp {
 public:
  Mp() {
    CleanUpMpfrOnThreadExit();
    mpfr_init2(v, 64);
  }
  explicit Mp(mpfr_prec_t p) {
    CleanUpMpfrOnThreadExit();
    mpfr_init2(v, p);
  }
  ~Mp() { mpfr_clear(v); }
  Mp(const Mp& o) {
    CleanUpMpfrOnThreadExit();
    mpfr_init2(v, mpfr_get_prec(o.v));
    mpfr_set(v, o.v, MPFR_RNDN);
  }
  Mp& operator=(const Mp& o) {
    if (this != &o) {
      mpfr_set_prec(v, mpfr_get_prec(o.v));
      mpfr_set(v, o.v, MPFR_RNDN);
    }
    return *this;
  }
  mpfr_t v;
};

// MPFR's exponent range is per thread: widen it once per thread (exp(-t) for t up to 1e9).
void WidenExponents() {
  thread_local bool done = false;
  if (done) return;
  mpfr_set_emin(mpfr_get_emin_min());
  mpfr_set_emax(mpfr_get_emax_max());
  done = true;
}

Mp FromD(double d) {
  Mp r(53);
  mpfr_set_d(r.v, d, MPFR_RNDN);
  return r;
}
Mp FromI(int64_t i) {
  Mp r(64);
  mpfr_set_sj(r.v, i, MPFR_RNDN);
  return r;
}

// a + b exactly.
Mp XAdd(const Mp& a, const Mp& b) {
  if (mpfr_zero_p(a.v) && mpfr_zero_p(b.v)) {
    Mp r(8);
    mpfr_add(r.v, a.v, b.v, MPFR_RNDN);
    return r;
  }
  if (mpfr_zero_p(a.v)) return b;
  if (mpfr_zero_p(b.v)) return a;
  if (!mpfr_number_p(a.v) || !mpfr_number_p(b.v)) {
    Mp r(8);
    mpfr_add(r.v, a.v, b.v, MPFR_RNDN);
    return r;
  }
  const mpfr_exp_t ea = mpfr_get_exp(a.v), eb = mpfr_get_exp(b.v);
  const mpfr_exp_t la = ea - mpfr_get_prec(a.v), lb = eb - mpfr_get_prec(b.v);
  const mpfr_exp_t bits = std::max(ea, eb) + 1 - std::min(la, lb);
  Mp r(static_cast<mpfr_prec_t>(std::max<mpfr_exp_t>(bits, 2)));
  mpfr_add(r.v, a.v, b.v, MPFR_RNDN);  // exact
  return r;
}
Mp XNeg(const Mp& a) {
  Mp r(mpfr_get_prec(a.v));
  mpfr_neg(r.v, a.v, MPFR_RNDN);
  return r;
}
Mp XSub(const Mp& a, const Mp& b) { return XAdd(a, XNeg(b)); }
// a * b exactly; a zero factor gives zero even against an infinity (a term with a zero
// coefficient is left out, docs/design.md section 3).
Mp XMul(const Mp& a, const Mp& b) {
  if (mpfr_nan_p(a.v) || mpfr_nan_p(b.v)) {
    Mp r(8);
    mpfr_set_nan(r.v);
    return r;
  }
  if (mpfr_zero_p(a.v) || mpfr_zero_p(b.v)) {
    Mp r(8);
    mpfr_set_zero(r.v, mpfr_signbit(a.v) == mpfr_signbit(b.v) ? 1 : -1);
    return r;
  }
  Mp r(mpfr_get_prec(a.v) + mpfr_get_prec(b.v));
  mpfr_mul(r.v, a.v, b.v, MPFR_RNDN);  // exact
  return r;
}

enum class TKind { kNone, kL, kS };

// One transcendental term C T(t) of an output.
struct Term {
  Mp c;
  double t = 0.0;  // |x| >= 0, finite
  TKind kind = TKind::kNone;
};

// T(t) at precision `bits` with a bound of its absolute error in `err` (64 bits, rounded up).
void EvalT(TKind kind, double t, mpfr_prec_t bits, Mp* T, Mp* err) {
  mpfr_set_prec(T->v, bits);
  if (t > kMpFarT) {
    mpfr_set_zero(T->v, 1);
    mpfr_set_ui_2exp(err->v, 1, -kFarExpBits, MPFR_RNDU);
    return;
  }
  Mp e(bits + 4);
  mpfr_set_d(e.v, -t, MPFR_RNDN);  // exact: t is a double
  mpfr_exp(e.v, e.v, MPFR_RNDN);   // relative error <= 2^-(bits+4)
  if (kind == TKind::kL) {
    mpfr_log1p(T->v, e.v, MPFR_RNDN);
  } else {
    Mp d(bits + 4);
    mpfr_add_ui(d.v, e.v, 1, MPFR_RNDN);
    mpfr_div(T->v, e.v, d.v, MPFR_RNDN);
  }
  // L: 2^-bits + 1.45 * 2^-(bits+4); S: 2^-bits + 1.5 * 2^-(bits+4) + 2^-(bits+4): both below
  // 2^(1-bits) relative (section 8.3).
  mpfr_abs(err->v, T->v, MPFR_RNDU);
  mpfr_mul_2si(err->v, err->v, 1 - bits, MPFR_RNDU);
}

// v rounded to nearest-even in f, exactly, as a double (+-inf past the largest finite value).
double RoundMp(const Fmt& f, const mpfr_t v) {
  if (mpfr_nan_p(v)) return std::numeric_limits<double>::quiet_NaN();
  if (mpfr_inf_p(v)) return mpfr_signbit(v) ? -HUGE_VAL : HUGE_VAL;
  if (mpfr_zero_p(v)) return mpfr_signbit(v) ? -0.0 : 0.0;
  const bool neg = mpfr_signbit(v) != 0;
  const mpfr_exp_t e = mpfr_get_exp(v);  // |v| in [2^(e-1), 2^e)
  if (e > f.emax + 1) return neg ? -HUGE_VAL : HUGE_VAL;
  const mpfr_exp_t q = std::max<mpfr_exp_t>(e - f.p, f.emin - f.p + 1);
  double r;
  if (e - q < 0) {
    r = 0.0;  // below half the smallest subnormal
  } else if (e - q == 0) {
    // [2^(q-1), 2^q): 0 or 2^q; exactly 2^(q-1) is a tie, to the even 0.
    Mp h(8);
    mpfr_set_ui_2exp(h.v, 1, q - 1, MPFR_RNDN);
    r = mpfr_cmpabs(v, h.v) == 0 ? 0.0 : std::ldexp(1.0, static_cast<int>(q));
  } else {
    // e - q significant bits, rounded to nearest-even by MPFR.
    Mp t(static_cast<mpfr_prec_t>(e - q));
    mpfr_abs(t.v, v, MPFR_RNDN);
    r = mpfr_get_d(t.v, MPFR_RNDN);  // exact: at most 53 bits within double's range
  }
  if (r > MaxFinite(f)) r = HUGE_VAL;
  return neg ? -r : r;
}

// Whether a (a value of f) has an even significand (ties go to it); zero and inf count as even.
bool EvenIn(const Fmt& f, double a) {
  if (a == 0 || !std::isfinite(a)) return true;
  int e;
  std::frexp(a, &e);
  const double n = std::ldexp(std::fabs(a), -Quantum(f, e));
  return std::fmod(n, 2.0) == 0.0;
}

void NoteBits(mpfr_prec_t bits) {
  std::atomic<int64_t>& m = Stats().max_bits;
  int64_t prev = m.load();
  while (bits > prev && !m.compare_exchange_weak(prev, bits)) {
  }
}

// The value (R + sum_k C_k T_k(t_k)) / D rounded to f: a Ziv loop on the precision, then, if
// the value is within 2^-kMaxBits of a rounding boundary of f, an exact decision for the cases
// where that happens (a rational value at a midpoint, or a transcendental part far smaller than
// the distance of the rational part to the midpoint): section 8.3.
double Resolve(const Fmt& f, const Mp& R, const std::vector<Term>& terms, const Mp& D) {
  WidenExponents();
  if (mpfr_nan_p(R.v) || mpfr_inf_p(R.v)) return RoundMp(f, R.v);
  std::vector<const Term*> live;
  for (const Term& t : terms) {
    if (t.kind != TKind::kNone && !mpfr_zero_p(t.c.v)) live.push_back(&t);
  }
  if (live.empty() && mpfr_zero_p(R.v)) return 0.0;  // an exact zero is +0
  double lo_r = 0, hi_r = 0;
  for (mpfr_prec_t bits = 2 * f.p + 40;; bits *= 2) {
    bits = std::min(bits, kMaxBits);
    NoteBits(bits);
    Mp V(bits), err(64), T(bits), Te(64), CT(bits), tmp(64);
    mpfr_set(V.v, R.v, MPFR_RNDN);  // error <= 2^-bits |V|
    mpfr_abs(err.v, V.v, MPFR_RNDU);
    mpfr_mul_2si(err.v, err.v, -bits, MPFR_RNDU);
    for (const Term* t : live) {
      EvalT(t->kind, t->t, bits, &T, &Te);
      mpfr_mul(CT.v, t->c.v, T.v, MPFR_RNDN);
      // |C| Te + 2^-bits |CT|
      mpfr_abs(tmp.v, t->c.v, MPFR_RNDU);
      mpfr_mul(tmp.v, tmp.v, Te.v, MPFR_RNDU);
      mpfr_add(err.v, err.v, tmp.v, MPFR_RNDU);
      mpfr_abs(tmp.v, CT.v, MPFR_RNDU);
      mpfr_mul_2si(tmp.v, tmp.v, -bits, MPFR_RNDU);
      mpfr_add(err.v, err.v, tmp.v, MPFR_RNDU);
      mpfr_add(V.v, V.v, CT.v, MPFR_RNDN);
      mpfr_abs(tmp.v, V.v, MPFR_RNDU);
      mpfr_mul_2si(tmp.v, tmp.v, -bits, MPFR_RNDU);
      mpfr_add(err.v, err.v, tmp.v, MPFR_RNDU);
    }
    // W = V / D: err / (D) + 2^-bits |W| (D is exact and >= 1).
    Mp W(bits);
    mpfr_div(W.v, V.v, D.v, MPFR_RNDN);
    mpfr_div(err.v, err.v, D.v, MPFR_RNDU);
    mpfr_abs(tmp.v, W.v, MPFR_RNDU);
    mpfr_mul_2si(tmp.v, tmp.v, -bits, MPFR_RNDU);
    mpfr_add(err.v, err.v, tmp.v, MPFR_RNDU);
    Mp lo(bits), hi(bits);
    mpfr_sub(lo.v, W.v, err.v, MPFR_RNDD);
    mpfr_add(hi.v, W.v, err.v, MPFR_RNDU);
    lo_r = RoundMp(f, lo.v);
    hi_r = RoundMp(f, hi.v);
    if (SameBits(lo_r, hi_r)) return lo_r;
    if (bits == kMaxBits) break;
  }
  // Within 2^-kMaxBits of a boundary between lo_r and hi_r: the midpoint m between them (0 when
  // both are zeros; the overflow threshold when hi_r is infinite).
  Mp m(128);
  if (lo_r == 0 && hi_r == 0) {
    mpfr_set_zero(m.v, 1);
  } else if (std::isinf(lo_r) || std::isinf(hi_r)) {
    const double fin = std::isinf(lo_r) ? hi_r : lo_r;
    mpfr_set_d(m.v, fin, MPFR_RNDN);
    Mp h(8);
    mpfr_set_ui_2exp(h.v, 1, f.emax - f.p, MPFR_RNDN);
    if (fin < 0) mpfr_neg(h.v, h.v, MPFR_RNDN);
    mpfr_add(m.v, m.v, h.v, MPFR_RNDN);  // exact at 128 bits
  } else {
    mpfr_set_d(m.v, lo_r, MPFR_RNDN);
    mpfr_add_d(m.v, m.v, hi_r, MPFR_RNDN);
    mpfr_div_2ui(m.v, m.v, 1, MPFR_RNDN);  // exact at 128 bits
  }
  // value - m = (R - m D + sum C T) / D.
  const Mp rest = XSub(R, XMul(m, D));
  // sum |C| T_upper and whether every C has one sign.
  Mp bound(64), T(64), Te(64), tmp(64);
  mpfr_set_zero(bound.v, 1);
  int sign = 0;
  bool mixed = false;
  for (const Term* t : live) {
    EvalT(t->kind, t->t, 64, &T, &Te);
    mpfr_add(tmp.v, T.v, Te.v, MPFR_RNDU);
    mpfr_abs(T.v, t->c.v, MPFR_RNDU);
    mpfr_mul(tmp.v, tmp.v, T.v, MPFR_RNDU);
    mpfr_add(bound.v, bound.v, tmp.v, MPFR_RNDU);
    const int s = mpfr_sgn(t->c.v);
    if (sign == 0) sign = s;
    if (s != sign) mixed = true;
  }
  if (mpfr_zero_p(rest.v)) {
    if (live.empty()) {
      // A rational value exactly at the midpoint: ties to even.
      return EvenIn(f, lo_r) ? lo_r : hi_r;
    }
    if (!mixed) return sign > 0 ? hi_r : lo_r;  // T > 0 for finite t
  } else {
    Mp ar(64);
    mpfr_abs(ar.v, rest.v, MPFR_RNDD);
    if (mpfr_cmp(bound.v, ar.v) < 0) return mpfr_sgn(rest.v) > 0 ? hi_r : lo_r;
  }
  Stats().unresolved.fetch_add(1);
  return lo_r;
}

// ---------------------------------------------------------------------------------------------
// Element forms.

// One output as a double form (fast) and how to build its exact form.
enum Out { kLoss = 0, kGx = 1, kGy = 2 };

struct Element {
  double x, y, w, p;
};

struct Options {
  double s = 0.0;  // label smoothing
};

// The fast forms of the three outputs: R + C T with T's kind, before the division by D.
struct FastForms {
  Ax r[3], c[3];
  TKind kind[3];
};

void FastFormsOf(const Element& el, double s, FastForms* ff) {
  const Ax w = Ex(el.w), p = Ex(el.p), x = Ex(el.x);
  Ax A, B, om = Ex(1.0);
  if (s == 0.0) {
    A = Sub(Ex(1.0), Ex(el.y));
    B = Mul(p, Ex(el.y));
  } else {
    om = Sub(Ex(1.0), Ex(s));
    const Ax half_s = {s * 0.5, s < 0x1p-1020 ? kEta : 0.0};
    const Ax Y = Add(Mul(Ex(el.y), om), half_s);
    A = Sub(Ex(1.0), Y);
    B = Mul(p, Y);
  }
  const Ax wc = Mul(w, Add(A, B));
  // loss
  if (el.x > 0) {
    ff->r[kLoss] = Mul(Mul(w, A), x);
  } else if (el.x < 0) {
    ff->r[kLoss] = Mul(Mul(w, B), Neg(x));
  } else {
    ff->r[kLoss] = Ex(0.0);
  }
  ff->c[kLoss] = wc;
  ff->kind[kLoss] = TKind::kL;
  // dl/dx
  if (el.x >= 0) {
    ff->r[kGx] = Mul(w, A);
    ff->c[kGx] = Neg(wc);
  } else {
    ff->r[kGx] = Neg(Mul(w, B));
    ff->c[kGx] = wc;
  }
  ff->kind[kGx] = TKind::kS;
  // dl/dy
  const Ax wom = Mul(w, om);
  if (el.x > 0) {
    ff->r[kGy] = Neg(Mul(wom, x));
  } else if (el.x < 0) {
    ff->r[kGy] = Mul(Mul(wom, p), Neg(x));
  } else {
    ff->r[kGy] = Ex(0.0);
  }
  ff->c[kGy] = Mul(wom, Sub(p, Ex(1.0)));
  ff->kind[kGy] = TKind::kL;
}

// L(t) and S(t) in double with their error bounds (section 8.2).
void FastT(double t, Ax* L, Ax* S) {
  if (t > kFarT) {
    *L = {0.0, kFarBound};
    *S = {0.0, kFarBound};
    return;
  }
  const double e = std::exp(-t);
  const double l = std::log1p(e);
  const double sv = e / (1.0 + e);
  *L = {l, kEpsT * l + (l < kTinyProd ? kEta : 0.0)};
  *S = {sv, kEpsT * sv + (sv < kTinyProd ? kEta : 0.0)};
}

// The exact forms of one output: R exact, the one term C T, for elements with finite x (or
// infinite x, where T = 0).
void ExactForm(const Element& el, double s, Out which, Mp* R, Term* term) {
  const Mp w = FromD(el.w), p = FromD(el.p), x = FromD(el.x), one = FromD(1.0);
  Mp Y = FromD(el.y), om = one;
  if (s != 0.0) {
    om = XSub(one, FromD(s));
    Mp half = FromD(s);
    mpfr_div_2ui(half.v, half.v, 1, MPFR_RNDN);  // exact (wide exponent range)
    Y = XAdd(XMul(Y, om), half);
  }
  const Mp A = XSub(one, Y);
  const Mp B = XMul(p, Y);
  const Mp wc = XMul(w, XAdd(A, B));
  const Mp zero = FromD(0.0);
  const bool pos = el.x > 0, neg = el.x < 0;
  term->t = std::fabs(el.x);
  switch (which) {
    case kLoss:
      *R = pos ? XMul(XMul(w, A), x) : neg ? XMul(XMul(w, B), XNeg(x)) : zero;
      term->c = wc;
      term->kind = TKind::kL;
      break;
    case kGx:
      if (el.x >= 0) {
        *R = XMul(w, A);
        term->c = XNeg(wc);
      } else {
        *R = XNeg(XMul(w, B));
        term->c = wc;
      }
      term->kind = TKind::kS;
      if (el.x == 0) {  // S(0) = 1/2: the value is rational
        Mp half = term->c;
        mpfr_div_2ui(half.v, half.v, 1, MPFR_RNDN);
        *R = XAdd(*R, half);
        term->kind = TKind::kNone;
      }
      break;
    case kGy: {
      const Mp wom = XMul(w, om);
      *R = pos ? XNeg(XMul(wom, x)) : neg ? XMul(XMul(wom, p), XNeg(x)) : zero;
      term->c = XMul(wom, XSub(p, one));
      term->kind = TKind::kL;
      break;
    }
  }
  if (std::isinf(el.x)) term->kind = TKind::kNone;  // T(inf) = 0
}

// ---------------------------------------------------------------------------------------------
// The call.

// Exact integer divisors (docs/design.md section 3): DivisorRule (divisors.h) as integers, for
// the exact forms.
struct ExactDivisors {
  int64_t count = 1;   // normalize: kept elements of the whole (>= 1)
  int64_t mean_n = 1;  // MEAN: the whole's element count
  int64_t last = 1;    // PER_SAMPLE_MEAN: the last dimension
};

struct Call {
  const BceArgs* args;
  const BceOutputs* out;
  Fmt fmt;
  bool fast = true;
  const ResolvedLoss* loss;  // the loss options, read once (resolved_loss.h)
  ExactDivisors div;
  Mp D_elem_loss;  // NONE: count
  Mp D_grad;       // count * (mean_n | last | 1)
  Mp D_reduced;    // SUM: count, MEAN: count * mean_n, PER_SAMPLE_MEAN: count * last
  Ax D_elem_loss_f, D_grad_f, D_reduced_f;
};

double OperandAt(const Operand& op, int64_t i) {
  if (op.data == nullptr) return 1.0;
  return LoadAsDouble(op.dtype, op.data, (i / op.inner) % op.period);
}

Ax DivisorAx(int64_t a, int64_t b) {
  return Mul(Ax{static_cast<double>(a), kU * static_cast<double>(a)},
             Ax{static_cast<double>(b), kU * static_cast<double>(b)});
}
Mp DivisorMp(int64_t a, int64_t b) { return XMul(FromI(a), FromI(b)); }

// What one element contributes to a reduction: a fast value with its bound, or a special
// (non-finite) value.
struct Contribution {
  Ax fast;
  double special = 0.0;  // inf / NaN contributions; 0 when none
  bool exact_needed = false;  // float64 outputs or infinite x: no usable fast value
};

// Per-thread tallies of DoElement, added to the process-wide counters once per unit of work
// (an atomic increment per output would make the threads contend for one cache line).
struct LocalCounts {
  int64_t fast = 0, fallback = 0, direct = 0, special = 0;
};
thread_local LocalCounts tl_counts;

void FlushCounts() {
  Counters& st = Stats();
  st.fast.fetch_add(tl_counts.fast, std::memory_order_relaxed);
  st.fallback.fetch_add(tl_counts.fallback, std::memory_order_relaxed);
  st.direct.fetch_add(tl_counts.direct, std::memory_order_relaxed);
  st.special.fetch_add(tl_counts.special, std::memory_order_relaxed);
  tl_counts = LocalCounts();
}

// Evaluates element i: writes its per-element outputs (those wanted) and returns its loss
// contribution for a reduction.
Contribution DoElement(const Call& c, int64_t i, bool write_loss) {
  const BceArgs& a = *c.args;
  const BceOutputs& o = *c.out;
  LocalCounts& st = tl_counts;
  const double y_raw = LoadAsDouble(a.targets_dtype, a.targets, i);
  Element el{LoadAsDouble(a.dtype, a.logits, i), y_raw, OperandAt(a.weight, i),
             OperandAt(a.pos_weight, i)};
  const ElementOptions<double>& opt = c.loss->element;
  const double s = opt.smoothing;
  void* dst[3] = {write_loss ? o.loss : nullptr, o.grad_logits, o.grad_targets};
  int wanted = 0;
  for (void* d : dst) wanted += d != nullptr;
  Contribution contrib;
  // Ignored elements: 0 everywhere. NaN or infinite y, w, p: the float64 element's IEEE special
  // values (the limits are not real numbers to round).
  const bool ignored = opt.has_ignore_index && y_raw == opt.ignore_index;
  const bool special = std::isnan(el.x) || !std::isfinite(el.y) || !std::isfinite(el.w) ||
                       !std::isfinite(el.p);
  if (ignored || special) {
    double v[3] = {0.0, 0.0, 0.0};
    if (!ignored) {
      internal::ElementOptions<double> eo;
      eo.smoothing = s;
      internal::LossElement<double>(eo, el.x, el.y, el.w, el.p, &v[0], &v[1], &v[2]);
      v[0] /= static_cast<double>(c.div.count);
      v[1] /= mpfr_get_d(c.D_grad.v, MPFR_RNDN);
      v[2] /= mpfr_get_d(c.D_grad.v, MPFR_RNDN);
      contrib.special = std::isfinite(v[0]) ? 0.0 : v[0];
    }
    for (int k = 0; k < 3; ++k) {
      if (dst[k] != nullptr) StoreFromDouble(a.dtype, dst[k], i, RoundTo(c.fmt, v[k]));
    }
    st.special += wanted;
    return contrib;
  }
  const bool inf_x = std::isinf(el.x);
  const bool direct = c.fmt.p == 53 || inf_x;
  FastForms ff;
  Ax L, S;
  bool have_fast = false;
  if (!direct) {
    FastFormsOf(el, s, &ff);
    FastT(std::fabs(el.x), &L, &S);
    have_fast = true;
    contrib.fast = Add(ff.r[kLoss], Mul(ff.c[kLoss], L));
  } else {
    contrib.exact_needed = true;
  }
  const Mp* Ds[3] = {&c.D_elem_loss, &c.D_grad, &c.D_grad};
  const Ax* Dfs[3] = {&c.D_elem_loss_f, &c.D_grad_f, &c.D_grad_f};
  for (int k = 0; k < 3; ++k) {
    if (dst[k] == nullptr) continue;
    double v;
    bool done = false;
    if (have_fast && c.fast) {
      const Ax& T = ff.kind[k] == TKind::kL ? L : S;
      // Far logits with an exactly zero rational part: the value is C T / D, whose sign is
      // C's (T > 0) when the bound cannot settle it.
      const Ax val = Div(Add(ff.r[k], Mul(ff.c[k], T)), *Dfs[k]);
      done = Decide(c.fmt, val, &v);
      if (!done && ff.r[k].v == 0 && ff.r[k].e == 0 && std::fabs(ff.c[k].v) > ff.c[k].e &&
          std::isfinite(val.e)) {
        const double up =
            std::nextafter((std::fabs(val.v) + val.e) * (1.0 + 0x1p-40), HUGE_VAL);
        if (RoundTo(c.fmt, up) == 0) {
          v = std::copysign(0.0, ff.c[k].v);
          done = true;
        }
      }
      if (done) ++st.fast;
    }
    if (!done) {
      Mp R;
      std::vector<Term> terms(1);
      ExactForm(el, s, static_cast<Out>(k), &R, &terms[0]);
      v = Resolve(c.fmt, R, terms, *Ds[k]);
      ++(direct ? st.direct : st.fallback);
    }
    StoreFromDouble(a.dtype, dst[k], i, v);
  }
  return contrib;
}

// The exact loss form of element i for a reduction (R_i, C_i, t_i), added into the running
// exact sums. Returns false for an ignored element (nothing to add).
bool ExactLossOf(const Call& c, int64_t i, Mp* R, Term* term) {
  const BceArgs& a = *c.args;
  const ElementOptions<double>& opt = c.loss->element;
  const double y_raw = LoadAsDouble(a.targets_dtype, a.targets, i);
  if (opt.has_ignore_index && y_raw == opt.ignore_index) return false;
  Element el{LoadAsDouble(a.dtype, a.logits, i), y_raw, OperandAt(a.weight, i),
             OperandAt(a.pos_weight, i)};
  ExactForm(el, opt.smoothing, kLoss, R, term);
  return true;
}

// The reduced loss of elements [i0, i1) divided by D, rounded to f, through MPFR: the exact
// rational parts summed, the coefficients of equal t merged (so that exact cancellations are
// seen), then Resolve.
double ResolveReduction(const Call& c, int64_t i0, int64_t i1, const Mp& D) {
  WidenExponents();
  Mp R = FromD(0.0);
  std::map<std::pair<double, int>, Mp> coef;
  for (int64_t i = i0; i < i1; ++i) {
    Mp r;
    Term t;
    if (!ExactLossOf(c, i, &r, &t)) continue;
    R = XAdd(R, r);
    if (t.kind == TKind::kNone || mpfr_zero_p(t.c.v)) continue;
    auto key = std::make_pair(t.t, static_cast<int>(t.kind));
    auto it = coef.find(key);
    if (it == coef.end()) {
      coef.emplace(key, t.c);
    } else {
      it->second = XAdd(it->second, t.c);
    }
  }
  std::vector<Term> terms;
  terms.reserve(coef.size());
  for (auto& [key, cc] : coef) {
    Term t;
    t.c = cc;
    t.t = key.first;
    t.kind = static_cast<TKind>(key.second);
    terms.push_back(t);
  }
  return Resolve(c.fmt, R, terms, D);
}

// A reduction over elements whose fast contributions were summed: `sum` exactly, `err` the
// sum of their bounds, `special` the sum of non-finite values, `exact_needed` when some
// element had no fast value. Writes the rounded value into loss element `index`.
void FinishReduction(const Call& c, const ExactSum& sum, double err, double special,
                     bool exact_needed, int64_t i0, int64_t i1, const Mp& D, const Ax& Df,
                     int64_t index) {
  Counters& st = Stats();
  st.reductions.fetch_add(1, std::memory_order_relaxed);
  double v;
  if (special != 0.0) {
    v = special;  // +-inf or NaN: the IEEE sum of the special values
  } else {
    bool done = false;
    if (!exact_needed && c.fast && c.fmt.p != 53) {
      const double s = sum.Value();
      // n values of bounds e_i summed in double: (1 + n u) covers that rounding.
      const double n = static_cast<double>(i1 - i0);
      const Ax total{s, err * (1.0 + (n + 2.0) * kU) + kU * std::fabs(s)};
      done = Decide(c.fmt, Div(total, Df), &v);
    }
    if (!done) {
      v = ResolveReduction(c, i0, i1, D);
      st.reduction_fallbacks.fetch_add(1, std::memory_order_relaxed);
    }
  }
  StoreFromDouble(c.args->dtype, c.out->loss, index, v);
}

}  // namespace

absl::Status CorrectlyRoundedBce(const BceArgs& args, const BceOutputs& out, ThreadPool& pool) {
  if (args.loss != Loss::kBce) {
    return absl::InvalidArgumentError(
        "precision PRECISION_CORRECTLY_ROUNDED is only offered for bce_with_logits");
  }
  if (out.loss_values != nullptr) {
    return absl::InvalidArgumentError(
        "precision PRECISION_CORRECTLY_ROUNDED is not offered for Accumulate (per-element "
        "values); use Evaluate with reduction SUM or MEAN");
  }
  Call c;
  c.args = &args;
  c.out = &out;
  c.fmt = FmtOf(args.dtype);
  c.fast = g_fast_path.load();
  const ResolvedLoss loss = ResolveLoss(args);
  c.loss = &loss;
  const DivisorRule& rule = loss.divisors;
  const int64_t n = args.numel;
  int64_t ignored = 0;
  if (rule.CountsIgnored()) {
    for (int64_t i = 0; i < n; ++i) {
      ignored += LoadAsDouble(args.targets_dtype, args.targets, i) == loss.element.ignore_index;
    }
  }
  c.div.count = rule.KeptDivisor(ignored);
  c.div.mean_n = rule.whole;
  c.div.last = rule.last_dim;
  int64_t grad_factor = 1, reduced_factor = 1;
  if (rule.reduction == Reduction::kMean) grad_factor = reduced_factor = rule.whole;
  if (rule.reduction == Reduction::kPerSampleMean) {
    grad_factor = reduced_factor = rule.last_dim;
  }
  c.D_elem_loss = DivisorMp(c.div.count, 1);
  c.D_grad = DivisorMp(c.div.count, std::max<int64_t>(grad_factor, 1));
  c.D_reduced = DivisorMp(c.div.count, std::max<int64_t>(reduced_factor, 1));
  c.D_elem_loss_f = DivisorAx(c.div.count, 1);
  c.D_grad_f = DivisorAx(c.div.count, std::max<int64_t>(grad_factor, 1));
  c.D_reduced_f = DivisorAx(c.div.count, std::max<int64_t>(reduced_factor, 1));
  Stats().elements.fetch_add(n, std::memory_order_relaxed);

  const bool reduce = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
  const bool per_sample = args.reduction == Reduction::kPerSampleMean;
  const bool elem_loss = args.reduction == Reduction::kNone;
  if (reduce && n == 0 && out.loss != nullptr) {
    // SUM of nothing is 0, MEAN of nothing NaN (the exact 0 / 0).
    StoreFromDouble(args.dtype, out.loss, 0,
                    args.reduction == Reduction::kSum ? 0.0
                                                      : std::numeric_limits<double>::quiet_NaN());
    return absl::OkStatus();
  }
  // Units of work: kChunkElements elements; for PER_SAMPLE_MEAN whole rows of about that size.
  const int64_t row = per_sample ? std::max<int64_t>(args.last_dim, 1) : 1;
  const int64_t unit = per_sample ? std::max<int64_t>(1, kChunkElements / row) * row
                                  : kChunkElements;
  const int64_t units = (n + unit - 1) / unit;
  std::vector<ExactSum> sums(reduce ? std::max<int64_t>(units, 1) : 0);
  std::vector<double> errs(sums.size(), 0.0), specials(sums.size(), 0.0);
  std::vector<char> needs(sums.size(), 0);
  const absl::Status run =
      pool.ParallelForChunks(units, args.should_stop, args.chunks_done, [&](int64_t u) {
    const int64_t i0 = u * unit, i1 = std::min(n, i0 + unit);
    if (per_sample) {
      for (int64_t r0 = i0; r0 < i1; r0 += row) {
        ExactSum s;
        double err = 0.0, special = 0.0;
        bool need = false;
        for (int64_t i = r0; i < r0 + row; ++i) {
          const Contribution k = DoElement(c, i, false);
          s.Add(k.fast.v);
          err += k.fast.e;
          special += k.special;
          need = need || k.exact_needed;
        }
        if (out.loss != nullptr) {
          FinishReduction(c, s, err, special, need, r0, r0 + row, c.D_reduced, c.D_reduced_f,
                          r0 / row);
        }
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const Contribution k = DoElement(c, i, elem_loss);
        if (reduce) {
          sums[u].Add(k.fast.v);
          errs[u] += k.fast.e;
          specials[u] += k.special;
          needs[u] = needs[u] || k.exact_needed;
        }
      }
    }
    FlushCounts();
  });
  if (!run.ok()) return run;
  if (reduce && out.loss != nullptr) {
    ExactSum total;
    double err = 0.0, special = 0.0;
    bool need = false;
    for (size_t u = 0; u < sums.size(); ++u) {
      total.Merge(sums[u]);
      err += errs[u];
      special += specials[u];
      need = need || needs[u];
    }
    FinishReduction(c, total, err, special, need, 0, n, c.D_reduced, c.D_reduced_f, 0);
  }
  return absl::OkStatus();
}

}  // namespace internal

#endif  // LOSSD_HAVE_MPFR

}  // namespace lossd::kernels
