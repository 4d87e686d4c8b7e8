// The .npy reader against files numpy.save wrote (bytes copied from numpy 2.3) and numpy's own
// values for them, and against the format's definition (numpy.lib.format) for the versions,
// dtypes and orders it must refuse.
#include "client/bench/npy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

namespace lossd::bench {
namespace {

// A version 1.0 file: magic, version, header length, the header dict padded with spaces and
// ended by '\n' so that the data starts at a multiple of 64 (as numpy writes it), then `data`.
std::string File(const std::string& dict, const std::string& data, int major = 1) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string header = dict;
  while ((prefix + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  const size_t n = header.size();
  out += static_cast<char>(n & 0xff);
  out += static_cast<char>((n >> 8) & 0xff);
  if (major != 1) {
    out += '\0';
    out += '\0';
  }
  return out + header + data;
}

template <typename T>
std::string Bytes(std::initializer_list<T> values) {
  std::string s;
  for (T v : values) s.append(reinterpret_cast<const char*>(&v), sizeof(T));
  return s;
}

TEST(NpyTest, ReadsWhatNumpyWroteFloat16) {
  // numpy.save(f, numpy.array([[1.5, -2, 0], [6.1035156e-05, 5.9604645e-08, 65504]],
  //                           numpy.float16))
  std::string header =
      "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }";
  header.resize(117, ' ');
  header += '\n';
  const std::string file = std::string("\x93NUMPY\x01\x00\x76\x00", 10) + header +
                           std::string("\x00\x3e\x00\xc0\x00\x00\x00\x04\x01\x00\xff\x7b", 12);
  auto a = ParseNpy(file);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dtype, NpyArray::DType::kFloat16);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  // numpy: a.astype(numpy.float64).tolist()
  EXPECT_EQ(a->values, (std::vector<double>{1.5, -2.0, 0.0, 6.103515625e-05,
                                            5.960464477539063e-08, 65504.0}));
}

TEST(NpyTest, ReadsWhatNumpyWroteFloat64) {
  // numpy.save(f, numpy.array([0.1, -1e300]))
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }";
  header.resize(117, ' ');
  header += '\n';
  const std::string file =
      std::string("\x93NUMPY\x01\x00\x76\x00", 10) + header +
      std::string("\x9a\x99\x99\x99\x99\x99\xb9\x3f\x9c\x75\x00\x88\x3c\xe4\x37\xfe", 16);
  auto a = ParseNpy(file);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(a->values, (std::vector<double>{0.1, -1e300}));
}

TEST(NpyTest, Float32ScalarsAndVersions) {
  auto a = ParseNpy(File("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                         Bytes<float>({0.5f, -3.25f, 1e-30f, 7.0f})));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->values, (std::vector<double>{0.5, -3.25, static_cast<double>(1e-30f), 7.0}));
  // 0-d array: one element; version 2.0 header; keys in another order, double quotes.
  a = ParseNpy(File("{\"shape\": (), \"fortran_order\": False, \"descr\": \"<f8\"}",
                    Bytes<double>({42.0}), 2));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->shape.empty());
  EXPECT_EQ(a->values, std::vector<double>{42.0});
  // An empty array.
  a = ParseNpy(File("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", ""));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->size(), 0);
}

TEST(NpyTest, HalfConversionMatchesTheBinary16Definition) {
  EXPECT_EQ(HalfToDouble(0x3c00), 1.0);
  EXPECT_EQ(HalfToDouble(0xc000), -2.0);
  EXPECT_EQ(HalfToDouble(0x7bff), 65504.0);
  EXPECT_EQ(HalfToDouble(0x0001), std::ldexp(1.0, -24));  // smallest subnormal
  EXPECT_EQ(HalfToDouble(0x03ff), std::ldexp(1023.0, -24));  // largest subnormal
  EXPECT_EQ(HalfToDouble(0x0400), std::ldexp(1.0, -14));  // smallest normal
  EXPECT_TRUE(std::signbit(HalfToDouble(0x8000)));
  EXPECT_EQ(HalfToDouble(0x7c00), std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(HalfToDouble(0x7e00)));
  // Every finite half: value = (-1)^s * 2^(e-15) * (1 + m/1024), or 2^-14 * m/1024 for e == 0.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const int e = (b >> 10) & 31, m = b & 1023;
    if (e == 31) continue;
    const double want = (b & 0x8000 ? -1 : 1) *
                        (e == 0 ? std::ldexp(m / 1024.0, -14) : std::ldexp(1 + m / 1024.0, e - 15));
    ASSERT_EQ(HalfToDouble(static_cast<uint16_t>(b)), want) << b;
  }
}

void ExpectError(const std::string& file, const std::string& part) {
  auto a = ParseNpy(file);
  ASSERT_FALSE(a.ok()) << part;
  EXPECT_NE(std::string(a.status().message()).find(part), std::string::npos)
      << a.status().message();
}

TEST(NpyTest, RefusesWhatItCannotReadAndSaysWhy) {
  const std::string four = Bytes<float>({1, 2, 3, 4});
  ExpectError("PK\x03\x04 not numpy at all", "not a .npy file");
  // Headers over the four float32 values, each refused for its own reason.
  const struct {
    const char* header;
    const char* error;
  } kHeaders[] = {
      {"{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }", "big-endian"},
      {"{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", "'<i4' is not read"},
      {"{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", "'<c8' is not read"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }", "structured"},
      {"{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", "Fortran order"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }",
       "needs 20 bytes of data, the file has 16"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", "needs 12 bytes"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (-4,), }", "bad dimension"},
      {"{'descr': '<f4', 'fortran_order': False}", "no 'shape'"},
  };
  for (const auto& c : kHeaders) {
    SCOPED_TRACE(c.header);
    ExpectError(File(c.header, four), c.error);
  }
  std::string v9 = File("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", four);
  v9[6] = 9;
  ExpectError(v9, "format version 9.0");
  std::string cut = File("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", four);
  ExpectError(cut.substr(0, 30), "truncated header");
}

TEST(NpyTest, ReadNpyNamesThePath) {
  auto a = ReadNpy("/nonexistent/x.npy");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(std::string(a.status().message()).find("/nonexistent/x.npy"), std::string::npos);
}

}  // namespace
}  // namespace lossd::bench
