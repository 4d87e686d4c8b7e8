#include "client/bench/npy.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lossd::bench {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(".npy: ", what));
}

// The value of `key` in the header dict: the text after "'key':" up to its end (a quoted
// string, a parenthesised tuple, or a bare word).
absl::StatusOr<std::string> Field(absl::string_view header, absl::string_view key) {
  std::string quoted = absl::StrCat("'", key, "'");
  size_t at = header.find(quoted);
  if (at == absl::string_view::npos) {
    quoted = absl::StrCat("\"", key, "\"");
    at = header.find(quoted);
  }
  if (at == absl::string_view::npos) return Bad(absl::StrCat("the header has no '", key, "'"));
  absl::string_view rest = header.substr(at + quoted.size());
  rest = absl::StripLeadingAsciiWhitespace(rest);
  if (!absl::ConsumePrefix(&rest, ":")) return Bad(absl::StrCat("no ':' after '", key, "'"));
  rest = absl::StripLeadingAsciiWhitespace(rest);
  if (rest.empty()) return Bad(absl::StrCat("'", key, "' has no value"));
  if (rest[0] == '\'' || rest[0] == '"') {
    const size_t end = rest.find(rest[0], 1);
    if (end == absl::string_view::npos) return Bad(absl::StrCat("'", key, "' is not closed"));
    return std::string(rest.substr(1, end - 1));
  }
  if (rest[0] == '(') {
    const size_t end = rest.find(')');
    if (end == absl::string_view::npos) return Bad(absl::StrCat("'", key, "' is not closed"));
    return std::string(rest.substr(0, end + 1));
  }
  if (rest[0] == '[') {
    return Bad(absl::StrCat("'", key, "' is a structured type: only float16, float32 and "
                            "float64 arrays are read"));
  }
  size_t end = 0;
  while (end < rest.size() && (absl::ascii_isalnum(rest[end]) || rest[end] == '_')) ++end;
  return std::string(rest.substr(0, end));
}

}  // namespace

double HalfToDouble(uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  double v;
  if (exponent == 0) {
    v = std::ldexp(static_cast<double>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    v = mantissa == 0 ? std::numeric_limits<double>::infinity()
                      : std::numeric_limits<double>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -v : v;
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes) {
  if (bytes.size() < kMagicSize + 4 || bytes.substr(0, kMagicSize) !=
                                           absl::string_view(kMagic, kMagicSize)) {
    return Bad("not a .npy file (no \\x93NUMPY magic)");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  const int minor = static_cast<unsigned char>(bytes[7]);
  size_t header_len = 0, header_at = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) |
                 (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    header_at = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return Bad("truncated header");
    for (int i = 0; i < 4; ++i) {
      header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    }
    header_at = 12;
  } else {
    return Bad(absl::StrCat("format version ", major, ".", minor,
                            " is not supported (1.0, 2.0 and 3.0 are)"));
  }
  if (bytes.size() < header_at + header_len) return Bad("truncated header");
  const absl::string_view header = bytes.substr(header_at, header_len);

  NpyArray a;
  auto descr = Field(header, "descr");
  if (!descr.ok()) return descr.status();
  a.descr = *descr;
  auto fortran = Field(header, "fortran_order");
  if (!fortran.ok()) return fortran.status();
  auto shape = Field(header, "shape");
  if (!shape.ok()) return shape.status();

  size_t item = 0;
  if (a.descr == "<f2") {
    a.dtype = NpyArray::DType::kFloat16;
    item = 2;
  } else if (a.descr == "<f4") {
    a.dtype = NpyArray::DType::kFloat32;
    item = 4;
  } else if (a.descr == "<f8") {
    a.dtype = NpyArray::DType::kFloat64;
    item = 8;
  } else if (a.descr.size() >= 2 && a.descr[0] == '>') {
    return Bad(absl::StrCat("dtype '", a.descr, "' is big-endian: save a little-endian copy "
                            "(array.astype(array.dtype.newbyteorder('<')))"));
  } else {
    return Bad(absl::StrCat("dtype '", a.descr, "' is not read: only little-endian float16 "
                            "('<f2'), float32 ('<f4') and float64 ('<f8')"));
  }
  if (*fortran == "True") {
    return Bad("the array is in Fortran order: save a C-order copy (numpy.ascontiguousarray)");
  }
  if (*fortran != "False") return Bad(absl::StrCat("fortran_order is '", *fortran, "'"));

  absl::string_view dims = *shape;
  if (!absl::ConsumePrefix(&dims, "(") || !absl::ConsumeSuffix(&dims, ")")) {
    return Bad(absl::StrCat("shape '", *shape, "' is not a tuple"));
  }
  double count = 1;
  for (absl::string_view d : absl::StrSplit(dims, ',', absl::SkipWhitespace())) {
    d = absl::StripAsciiWhitespace(d);
    if (absl::EndsWith(d, "L")) d.remove_suffix(1);  // written by Python 2
    int64_t n = 0;
    if (!absl::SimpleAtoi(d, &n) || n < 0) {
      return Bad(absl::StrCat("shape '", *shape, "' has a bad dimension '", d, "'"));
    }
    a.shape.push_back(n);
    count *= static_cast<double>(n);
  }
  const size_t data_at = header_at + header_len;
  const size_t have = bytes.size() - data_at;
  if (count * static_cast<double>(item) != static_cast<double>(have)) {
    return Bad(absl::StrCat("shape (", absl::StrJoin(a.shape, ", "), ") of ", a.descr,
                            " needs ", count * static_cast<double>(item), " bytes of data, the "
                            "file has ", have));
  }
  const size_t n = have / item;
  a.values.resize(n);
  const char* p = bytes.data() + data_at;
  for (size_t i = 0; i < n; ++i) {  // little-endian host (x86-64, aarch64)
    switch (a.dtype) {
      case NpyArray::DType::kFloat16: {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        a.values[i] = HalfToDouble(h);
        break;
      }
      case NpyArray::DType::kFloat32: {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        a.values[i] = f;
        break;
      }
      case NpyArray::DType::kFloat64:
        std::memcpy(&a.values[i], p + 8 * i, 8);
        break;
    }
  }
  return a;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read \"", path, "\""));
  std::stringstream ss;
  ss << in.rdbuf();
  auto a = ParseNpy(ss.str());
  if (!a.ok()) {
    return absl::Status(a.status().code(), absl::StrCat(path, ": ", a.status().message()));
  }
  return a;
}

}  // namespace lossd::bench
