// Shared pieces of the kernels library: dtypes, conversions, broadcasting, the loss count of a
// reduction, exact summation.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/checked_math.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "kernels/src/divisors.h"

namespace lossd::kernels {

std::vector<absl::Status> Backend::BceBatch(const std::vector<BceItem>& items) {
  std::vector<absl::Status> statuses;
  statuses.reserve(items.size());
  for (const BceItem& item : items) statuses.push_back(Bce(*item.args, *item.out));
  return statuses;
}

size_t ItemSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

std::string DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "FLOAT32";
    case DType::kFloat64:
      return "FLOAT64";
    case DType::kFloat16:
      return "FLOAT16";
    case DType::kBFloat16:
      return "BFLOAT16";
  }
  return absl::StrCat("DTYPE(", static_cast<int>(dtype), ")");
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: value = mant * 2^-24, exactly representable in float.
    bits = std::bit_cast<uint32_t>(static_cast<float>(mant) * 0x1p-24f) | sign;
  }
  return std::bit_cast<float>(bits);
}

uint16_t FloatToHalf(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | ((abs >> 13) & 0x3ffu) : 0u);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): scale so that the half ulp 2^-24 becomes 1 and round.
    const float scaled = std::bit_cast<float>(abs) * 0x1p24f;  // exact (power of two)
    const float r = std::nearbyint(scaled);  // default rounding mode: nearest even
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: drop 13 mantissa bits with round to nearest even.
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

float BFloat16ToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToBFloat16(float f) {
  uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

double LoadAsDouble(DType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: {
      float v;
      std::memcpy(&v, static_cast<const char*>(data) + 4 * i, 4);
      return v;
    }
    case DType::kFloat64: {
      double v;
      std::memcpy(&v, static_cast<const char*>(data) + 8 * i, 8);
      return v;
    }
    case DType::kFloat16: {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 2 * i, 2);
      return HalfToFloat(v);
    }
    case DType::kBFloat16: {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 2 * i, 2);
      return BFloat16ToFloat(v);
    }
  }
  return std::numeric_limits<double>::quiet_NaN();
}

void StoreFromDouble(DType dtype, void* data, int64_t i, double v) {
  switch (dtype) {
    case DType::kFloat32: {
      const float f = static_cast<float>(v);
      std::memcpy(static_cast<char*>(data) + 4 * i, &f, 4);
      return;
    }
    case DType::kFloat64:
      std::memcpy(static_cast<char*>(data) + 8 * i, &v, 8);
      return;
    case DType::kFloat16: {
      const uint16_t h = FloatToHalf(static_cast<float>(v));
      std::memcpy(static_cast<char*>(data) + 2 * i, &h, 2);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t h = FloatToBFloat16(static_cast<float>(v));
      std::memcpy(static_cast<char*>(data) + 2 * i, &h, 2);
      return;
    }
  }
}

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

}  // namespace

absl::StatusOr<Operand> MakeOperand(const std::string& field, DType dtype, const void* data,
                                    const std::vector<int64_t>& shape,
                                    const std::vector<int64_t>& out_shape, bool may_copy) {
  const size_t rank = out_shape.size();
  auto not_broadcastable = [&] {
    return absl::InvalidArgumentError(absl::StrCat(field, " shape ", ShapeString(shape),
                                                   " is not broadcastable to logits shape ",
                                                   ShapeString(out_shape)));
  };
  if (shape.size() > rank) return not_broadcastable();
  const std::optional<int64_t> out_numel = CheckedProduct(out_shape);
  if (!out_numel) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits shape ", ShapeString(out_shape), " has too many elements (overflow)"));
  }
  const int64_t numel = *out_numel;
  // Align trailing dimensions; per output dim, is the operand's extent 1 (broadcast) or full?
  std::vector<bool> bcast(rank, true);
  for (size_t k = 0; k < shape.size(); ++k) {
    const size_t od = rank - shape.size() + k;
    if (shape[k] == out_shape[od]) {
      bcast[od] = out_shape[od] == 1;
    } else if (shape[k] == 1) {
      bcast[od] = true;
    } else {
      return not_broadcastable();
    }
  }
  // Collapse into runs of "full" dims: the operand is (i / inner) % period iff the full dims
  // form one contiguous group [lo, hi).
  int lo = -1, hi = -1;
  bool one_group = true;
  for (size_t k = 0; k < rank; ++k) {
    if (out_shape[k] == 1 || bcast[k]) continue;
    if (lo < 0) {
      lo = static_cast<int>(k);
    } else if (hi != static_cast<int>(k)) {
      one_group = false;
    }
    hi = static_cast<int>(k) + 1;
  }
  Operand op;
  op.dtype = dtype;
  op.data = data;
  // With no output element nothing reads the operand; its view stays trivial (the extents of
  // an empty shape, such as [0, 2^40, 2^40], may not even have a representable product).
  if (lo < 0 || numel == 0) {  // scalar-like or empty
    op.inner = 1;
    op.period = 1;
    return op;
  }
  if (one_group) {
    // Both are factors of numel > 0, so neither product can overflow.
    op.inner = *CheckedProduct(out_shape, hi, rank);
    op.period = *CheckedProduct(out_shape, lo, hi);
    return op;
  }
  if (!may_copy) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " shape ", ShapeString(shape), " broadcasts to logits shape ",
        ShapeString(out_shape), " only by an expanded copy, which cannot be made of this tensor"));
  }
  // General pattern: expand into a full tensor of the output shape.
  const size_t item = ItemSize(dtype);
  std::vector<int64_t> src_strides(rank, 0);
  {
    int64_t s = 1;
    for (int k = static_cast<int>(shape.size()) - 1; k >= 0; --k) {
      const size_t od = rank - shape.size() + k;
      src_strides[od] = bcast[od] ? 0 : s;
      s *= shape[k];
    }
  }
  const std::optional<int64_t> bytes = CheckedMul(numel, static_cast<int64_t>(item));
  if (!bytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " expanded to logits shape ",
                                                   ShapeString(out_shape), " overflows"));
  }
  std::shared_ptr<char[]> buf(new char[static_cast<size_t>(*bytes)]);
  std::vector<int64_t> idx(rank, 0);
  int64_t src = 0;
  for (int64_t i = 0; i < numel; ++i) {
    std::memcpy(buf.get() + i * item, static_cast<const char*>(data) + src * item, item);
    for (int k = static_cast<int>(rank) - 1; k >= 0; --k) {
      if (++idx[k] < out_shape[k]) {
        src += src_strides[k];
        break;
      }
      src -= src_strides[k] * (out_shape[k] - 1);
      idx[k] = 0;
    }
  }
  op.data = buf.get();
  op.owned = std::shared_ptr<const void>(buf, buf.get());
  op.inner = 1;
  op.period = numel;
  return op;
}

// ---- Loss count ---------------------------------------------------------------------------

int64_t LossCount(const BceArgs& args) {
  switch (args.reduction) {
    case Reduction::kNone:
      return args.numel;
    case Reduction::kPerSampleMean:
      return args.last_dim > 0 ? args.numel / args.last_dim
                               : std::max<int64_t>(args.empty_rows, 0);
    case Reduction::kSum:
    case Reduction::kMean:
      return 1;
  }
  return 1;
}

namespace internal {

absl::Status EmptyRowMeans(const BceArgs& args, const BceOutputs& out) {
  // As many rows as a request may have elements: filled in chunks of kChunkElements rows,
  // polling should_stop before each and counting each in chunks_done, as the block loops do.
  const int64_t rows = LossCount(args);
  for (int64_t r0 = 0; r0 < rows; r0 += kChunkElements) {
    if (args.should_stop && args.should_stop()) {
      return absl::CancelledError("stopped before completion");
    }
    if (out.loss != nullptr) {
      const int64_t r1 = std::min(rows, r0 + kChunkElements);
      for (int64_t r = r0; r < r1; ++r) {
        StoreFromDouble(args.dtype, out.loss, r, std::nan(""));
      }
    }
    if (args.chunks_done != nullptr) args.chunks_done->fetch_add(1, std::memory_order_relaxed);
  }
  if (out.kept != nullptr) *out.kept = 0;
  return absl::OkStatus();
}

}  // namespace internal

// ---- Exact summation ----------------------------------------------------------------------

namespace {
constexpr int kOffset = 2;        // two zero digits below the lowest used one
constexpr int kBase = 1126;       // bit 0 of digit kOffset has weight 2^-kBase
constexpr int64_t kDigit = int64_t{1} << 32;

// A finite double as sign * mant * 2^(exp - 1075): mant the significand as an integer (the
// hidden bit set for a normal value, 0 for a zero), exp the biased exponent (1 for subnormals,
// which share the smallest normals' scale). `finite` is false for infinities and NaN.
struct DoubleParts {
  uint64_t mant;
  int exp;
  bool neg;
  bool finite;
};
DoubleParts PartsOf(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(v));
  const int biased = static_cast<int>((bits >> 52) & 0x7ff);
  uint64_t mant = bits & ((uint64_t{1} << 52) - 1);
  if (biased != 0) mant |= uint64_t{1} << 52;
  return {mant, biased != 0 ? biased : 1, (bits >> 63) != 0, biased != 0x7ff};
}
}  // namespace

ExactSum::ExactSum() : pending_(0), special_(0.0) {
  std::memset(words_, 0, sizeof(words_));
}

void ExactSum::Add(double v) {
  const DoubleParts p = PartsOf(v);
  if (!p.finite) {
    special_ += v;
    return;
  }
  if (p.mant == 0) return;  // +0 or -0
  const int pos = p.exp - 1075 + kBase;  // >= 52 for every finite double
  const unsigned __int128 t = static_cast<unsigned __int128>(p.mant) << (pos % 32);
  const int w = pos / 32 + kOffset;
  const int64_t d0 = static_cast<int64_t>(t & 0xffffffffu);
  const int64_t d1 = static_cast<int64_t>((t >> 32) & 0xffffffffu);
  const int64_t d2 = static_cast<int64_t>(t >> 64);
  if (p.neg) {
    words_[w] -= d0;
    words_[w + 1] -= d1;
    words_[w + 2] -= d2;
  } else {
    words_[w] += d0;
    words_[w + 1] += d1;
    words_[w + 2] += d2;
  }
  if (++pending_ >= (int64_t{1} << 29)) Normalize();
}

void ExactSum::Normalize() {
  for (int k = 0; k + 1 < kWords; ++k) {
    const int64_t carry = words_[k] >> 32;  // arithmetic shift: floor division
    words_[k] -= carry * kDigit;
    words_[k + 1] += carry;
  }
  pending_ = 0;
}

void ExactSum::Merge(const ExactSum& other) {
  if (pending_ + other.pending_ >= (int64_t{1} << 29)) Normalize();
  for (int k = 0; k < kWords; ++k) words_[k] += other.words_[k];
  pending_ += other.pending_ + 1;
  special_ += other.special_;
}

double ExactSum::Value() const {
  if (std::isnan(special_)) return std::numeric_limits<double>::quiet_NaN();
  if (special_ != 0.0) return special_;
  ExactSum c = *this;
  c.Normalize();
  bool neg = c.words_[kWords - 1] < 0;
  if (neg) {
    for (int k = 0; k < kWords; ++k) c.words_[k] = -c.words_[k];
    c.Normalize();
  }
  int top = kWords - 1;
  while (top >= 0 && c.words_[top] == 0) --top;
  if (top < 0) return 0.0;
  if (top < 2) top = 2;
  unsigned __int128 t = (static_cast<unsigned __int128>(c.words_[top]) << 64) |
                        (static_cast<unsigned __int128>(c.words_[top - 1]) << 32) |
                        static_cast<unsigned __int128>(c.words_[top - 2]);
  bool sticky = false;
  for (int k = 0; k < top - 2; ++k) sticky |= c.words_[k] != 0;
  t = (t << 1) | (sticky ? 1u : 0u);
  // t < 2^97 and the conversion rounds to nearest; the sticky bit keeps ties honest.
  const double d = static_cast<double>(t);
  const double r = std::ldexp(d, 32 * (top - 2 - kOffset) - kBase - 1);
  return neg ? -r : r;
}

void ExactSum::ExportState(int64_t words[kWords], double* special) const {
  ExactSum c = *this;
  c.Normalize();
  std::memcpy(words, c.words_, sizeof(c.words_));
  *special = std::isnan(special_) ? std::numeric_limits<double>::quiet_NaN() : special_;
}

absl::Status ExactSum::ImportState(const int64_t words[kWords], double special) {
  for (int k = 0; k < kWords; ++k) {
    const int64_t w = words[k];
    const bool ok = k < kOffset          ? w == 0
                    : k + 1 < kWords ? (w >= 0 && w < kDigit)
                                     : (w > -(int64_t{1} << 31) && w < (int64_t{1} << 31));
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("exact sum word ", k, " is ", w, ", outside its range"));
    }
  }
  uint64_t bits;
  std::memcpy(&bits, &special, sizeof(bits));
  if (std::isfinite(special) && bits != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "non-finite sum is ", special, ": expected 0, an infinity or NaN"));
  }
  std::memcpy(words_, words, sizeof(words_));
  pending_ = 0;
  special_ = special;
  return absl::OkStatus();
}

double ExactSumOf(const double* v, int64_t n) {
  // Fast path: with every biased exponent (1 for subnormals) in [lo, hi], hi - lo <= 60 and
  // n <= 8192, each value is an integer of at most 113 bits in units of 2^(lo - 1075), and the
  // sum of them fits 126 bits. Converting that integer to double rounds once (to nearest even),
  // and scaling by a power of two is exact: lo >= 53 keeps every nonzero result at or above
  // 2^-1022 (no subnormal rounding), hi <= 2000 keeps it far from overflow.
  constexpr int64_t kMaxTerms = 8192;
  constexpr int kMaxSpread = 60;
  if (n > 0 && n <= kMaxTerms) {
    int lo = 0x7ff, hi = 0;
    bool plain = true;
    for (int64_t i = 0; i < n; ++i) {
      const DoubleParts p = PartsOf(v[i]);
      if (!p.finite) {
        plain = false;
        break;
      }
      if (p.mant == 0) continue;  // +0 or -0
      lo = std::min(lo, p.exp);
      hi = std::max(hi, p.exp);
    }
    if (plain && hi == 0) return 0.0;  // only zeros
    if (plain && lo >= 53 && hi <= 2000 && hi - lo <= kMaxSpread) {
      __int128 sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        const DoubleParts p = PartsOf(v[i]);
        if (p.mant == 0) continue;  // a zero's exp (1) is below lo
        const __int128 t = static_cast<__int128>(p.mant) << (p.exp - lo);
        sum += p.neg ? -t : t;
      }
      if (sum == 0) return 0.0;
      return std::ldexp(static_cast<double>(sum), lo - 1075);
    }
  }
  ExactSum s;
  for (int64_t i = 0; i < n; ++i) s.Add(v[i]);
  return s.Value();
}

double TreeSumBlock(double* values, int64_t n) {
  // Equivalent to the zero-padded full tree: adding the padding zeros changes nothing but the
  // sign of a zero, which the exact block combination ignores.
  int64_t m = n;
  for (int64_t h = kReduceBlock / 2; h >= 1; h /= 2) {
    if (m <= h) continue;
    for (int64_t j = 0; j < m - h; ++j) values[j] += values[j + h];
    m = h;
  }
  return n > 0 ? values[0] : 0.0;
}

BlockSum::BlockSum(int64_t offset)
    : offset_(offset), head_need_((kReduceBlock - offset % kReduceBlock) % kReduceBlock) {
  partial_.reserve(kReduceBlock);
}

void BlockSum::Add(const double* values, int64_t n) {
  count_ += n;
  if (static_cast<int64_t>(head_.size()) < head_need_ && n > 0) {
    // The head belongs to a block that began before this slice: kept as it is.
    const int64_t take = std::min<int64_t>(n, head_need_ - static_cast<int64_t>(head_.size()));
    head_.insert(head_.end(), values, values + take);
    values += take;
    n -= take;
  }
  while (n > 0) {
    const int64_t take = std::min<int64_t>(n, kReduceBlock - static_cast<int64_t>(partial_.size()));
    partial_.insert(partial_.end(), values, values + take);
    values += take;
    n -= take;
    if (static_cast<int64_t>(partial_.size()) == kReduceBlock) {
      std::vector<double> scratch(partial_);
      total_.Add(TreeSumBlock(scratch.data(), kReduceBlock));
      partial_.clear();
    }
  }
}

double BlockSum::Value() const {
  ExactSum t = total_;
  std::vector<double> scratch(kReduceBlock);
  for (const std::vector<double>* part : {&head_, &partial_}) {
    if (part->empty()) continue;
    std::copy(part->begin(), part->end(), scratch.begin());
    t.Add(TreeSumBlock(scratch.data(), static_cast<int64_t>(part->size())));
  }
  return t.Value();
}

absl::Status BlockSum::Append(const BlockSum& next) {
  if (offset_ > std::numeric_limits<int64_t>::max() - count_ ||
      next.offset_ != offset_ + count_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slice at element ", next.offset_, " does not follow the slice [", offset_, ", ",
        offset_ + count_, ")"));
  }
  if (next.count_ > std::numeric_limits<int64_t>::max() - count_ - offset_) {
    return absl::InvalidArgumentError("element count overflows int64");
  }
  // The next slice's head completes the block in progress here (its missing part is ours).
  Add(next.head_.data(), static_cast<int64_t>(next.head_.size()));
  if (static_cast<int64_t>(next.head_.size()) < next.head_need_) return absl::OkStatus();
  // Both now end on a block boundary: nothing of ours is in progress.
  total_.Merge(next.total_);
  partial_ = next.partial_;
  count_ += next.count_ - static_cast<int64_t>(next.head_.size());
  return absl::OkStatus();
}

namespace {
void PutU32(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutF64(double v, std::string* out) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  PutU64(bits, out);
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
double GetF64(const char* p) {
  const uint64_t bits = GetU64(p);
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
}  // namespace

void BlockSum::Serialize(std::string* out) const {
  int64_t words[ExactSum::kWords];
  double special;
  total_.ExportState(words, &special);
  out->reserve(out->size() + kStateFixedBytes + 8 * (head_.size() + partial_.size()));
  PutU32(static_cast<uint32_t>(kReduceBlock), out);
  PutU32(static_cast<uint32_t>(ExactSum::kWords), out);
  PutU32(static_cast<uint32_t>(head_.size()), out);
  PutU32(static_cast<uint32_t>(partial_.size()), out);
  PutU64(static_cast<uint64_t>(offset_), out);
  PutU64(static_cast<uint64_t>(count_), out);
  PutF64(special, out);
  for (int64_t w : words) PutU64(static_cast<uint64_t>(w), out);
  for (double v : head_) PutF64(v, out);
  for (double v : partial_) PutF64(v, out);
}

absl::StatusOr<BlockSum> BlockSum::Deserialize(std::string_view bytes) {
  if (bytes.size() < kStateFixedBytes) {
    return absl::InvalidArgumentError(absl::StrCat("exact sum state has ", bytes.size(),
                                                   " bytes, fewer than ", kStateFixedBytes));
  }
  const char* p = bytes.data();
  const uint32_t block = GetU32(p), nwords = GetU32(p + 4);
  const uint64_t h = GetU32(p + 8), t = GetU32(p + 12);
  if (block != kReduceBlock) {
    return absl::InvalidArgumentError(
        absl::StrCat("reduction block is ", block, ", this server uses ", kReduceBlock));
  }
  if (nwords != ExactSum::kWords) {
    return absl::InvalidArgumentError(
        absl::StrCat("exact sum has ", nwords, " words, expected ", ExactSum::kWords));
  }
  if (h >= static_cast<uint64_t>(kReduceBlock) || t >= static_cast<uint64_t>(kReduceBlock)) {
    return absl::InvalidArgumentError(absl::StrCat("head of ", h, " and tail of ", t,
                                                   " values: each must be below ", kReduceBlock));
  }
  const uint64_t expected = kStateFixedBytes + 8 * (h + t);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("exact sum state has ", bytes.size(),
                                                   " bytes, expected ", expected, " (head ", h,
                                                   ", tail ", t, " values)"));
  }
  const int64_t offset = static_cast<int64_t>(GetU64(p + 16));
  const int64_t count = static_cast<int64_t>(GetU64(p + 24));
  if (offset < 0 || count < 0 || offset > std::numeric_limits<int64_t>::max() - count) {
    return absl::InvalidArgumentError(
        absl::StrCat("element offset ", offset, " and count ", count, " are out of range"));
  }
  BlockSum s(offset);
  // The head and tail sizes follow from offset and count.
  const int64_t want_h = std::min(count, s.head_need_);
  const int64_t want_t = count > s.head_need_ ? (offset + count) % kReduceBlock : 0;
  if (static_cast<int64_t>(h) != want_h || static_cast<int64_t>(t) != want_t) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head of ", h, " and tail of ", t, " values do not match elements [", offset, ", ",
        offset + count, "): expected ", want_h, " and ", want_t));
  }
  int64_t words[ExactSum::kWords];
  for (int k = 0; k < ExactSum::kWords; ++k) {
    words[k] = static_cast<int64_t>(GetU64(p + 40 + 8 * k));
  }
  if (absl::Status st = s.total_.ImportState(words, GetF64(p + 32)); !st.ok()) return st;
  const char* v = p + kStateFixedBytes;
  s.head_.resize(h);
  for (uint64_t i = 0; i < h; ++i, v += 8) s.head_[i] = GetF64(v);
  s.partial_.resize(t);
  for (uint64_t i = 0; i < t; ++i, v += 8) s.partial_[i] = GetF64(v);
  s.count_ = count;
  return s;
}

}  // namespace lossd::kernels
