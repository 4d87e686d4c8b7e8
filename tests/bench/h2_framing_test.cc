// lossd-bench's HTTP/2 transport helpers (client/loadtest/h2_framing.h): gRPC's message framing,
// replies split anywhere across DATA chunks, status and message decoding, grpc-timeout values
// and target parsing, against values written out by hand from gRPC's wire format.
#include "client/loadtest/h2_framing.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "absl/time/time.h"

namespace lossd::loadtest::h2 {
namespace {

TEST(H2Framing, FramesWithAFlagAndABigEndianLength) {
  EXPECT_EQ(FrameMessage(""), std::string("\0\0\0\0\0", 5));
  EXPECT_EQ(FrameMessage("abc"), std::string("\0\0\0\0\x03" "abc", 8));
  const std::string big(0x01020304 & 0xfffff, 'x');  // 0x20304 bytes
  const std::string framed = FrameMessage(big);
  ASSERT_EQ(framed.size(), 5 + big.size());
  EXPECT_EQ(framed.substr(0, 5), std::string("\0\0\x02\x03\x04", 5));
  uint8_t prefix[5];
  WritePrefix(0xdeadbeef, prefix);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(prefix), 5),
            std::string("\0\xde\xad\xbe\xef", 5));
}

TEST(H2Framing, ReassemblesAMessageSplitAnywhere) {
  std::string message(1000, '\0');
  for (size_t i = 0; i < message.size(); ++i) message[i] = static_cast<char>(i * 7);
  const std::string framed = FrameMessage(message);
  // Every split into two chunks, the prefix's bytes included.
  for (size_t cut = 0; cut <= framed.size(); ++cut) {
    std::string out = "stale";
    MessageReader r;
    r.Reset(&out);
    EXPECT_TRUE(out.empty());
    ASSERT_TRUE(r.Feed(absl::string_view(framed).substr(0, cut)).ok());
    EXPECT_EQ(r.complete(), cut == framed.size());
    EXPECT_EQ(r.started(), cut > 0);
    ASSERT_TRUE(r.Feed(absl::string_view(framed).substr(cut)).ok());
    ASSERT_TRUE(r.complete()) << cut;
    EXPECT_EQ(out, message);
  }
  // Random chunk sizes, one byte at a time among them.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    std::string out;
    MessageReader r;
    r.Reset(&out);
    size_t at = 0;
    while (at < framed.size()) {
      const size_t n = std::min<size_t>(framed.size() - at, rng() % 40);
      ASSERT_TRUE(r.Feed(absl::string_view(framed).substr(at, n)).ok());
      at += n;
    }
    ASSERT_TRUE(r.complete());
    EXPECT_EQ(out, message);
  }
}

TEST(H2Framing, AnEmptyMessageIsCompleteAfterItsPrefix) {
  std::string out;
  MessageReader r;
  r.Reset(&out);
  ASSERT_TRUE(r.Feed(std::string("\0\0\0", 3)).ok());
  EXPECT_FALSE(r.complete());
  ASSERT_TRUE(r.Feed(std::string("\0\0", 2)).ok());
  EXPECT_TRUE(r.complete());
  EXPECT_TRUE(out.empty());
}

TEST(H2Framing, RefusesASecondMessageACompressedOneAndStrayBytes) {
  std::string out;
  MessageReader r;
  r.Reset(&out);
  EXPECT_FALSE(r.Feed(FrameMessage("a") + FrameMessage("b")).ok());
  EXPECT_FALSE(r.status().ok());
  EXPECT_FALSE(r.Feed("more").ok());  // the error sticks

  r.Reset(&out);
  EXPECT_TRUE(r.status().ok());
  const absl::Status compressed = r.Feed(std::string("\x01\0\0\0\x01z", 6));
  EXPECT_FALSE(compressed.ok());
  EXPECT_NE(compressed.message().find("compressed"), std::string::npos);

  r.Reset(&out);
  ASSERT_TRUE(r.Feed(FrameMessage("ok")).ok());
  EXPECT_FALSE(r.Feed("x").ok());  // a byte past the one message
}

TEST(H2Framing, ResetKeepsTheBuffersCapacity) {
  std::string out;
  MessageReader r;
  r.Reset(&out);
  ASSERT_TRUE(r.Feed(FrameMessage(std::string(4096, 'q'))).ok());
  const size_t capacity = out.capacity();
  r.Reset(&out);
  EXPECT_TRUE(out.empty());
  EXPECT_GE(out.capacity(), capacity);
  ASSERT_TRUE(r.Feed(FrameMessage("hi")).ok());
  EXPECT_EQ(out, "hi");
}

TEST(H2Framing, GrpcStatusValues) {
  EXPECT_EQ(ParseGrpcStatus("0"), 0);
  EXPECT_EQ(ParseGrpcStatus("3"), 3);
  EXPECT_EQ(ParseGrpcStatus("16"), 16);
  // Not a code: UNKNOWN, as gRPC maps it.
  for (const char* bad : {"", "17", "-1", "+3", " 3", "3 ", "abc", "003", "99"}) {
    EXPECT_EQ(ParseGrpcStatus(bad), 2) << bad;
  }
  EXPECT_EQ(CodeName(0), "OK");
  EXPECT_EQ(CodeName(4), "DEADLINE_EXCEEDED");
  EXPECT_EQ(CodeName(16), "UNAUTHENTICATED");
  EXPECT_EQ(CodeName(99), "99");
}

TEST(H2Framing, GrpcMessageIsPercentDecoded) {
  EXPECT_EQ(PercentDecode("plain text"), "plain text");
  EXPECT_EQ(PercentDecode("logits%3A shape %5B2%2C 3%5D"), "logits: shape [2, 3]");
  EXPECT_EQ(PercentDecode("100%25"), "100%");
  EXPECT_EQ(PercentDecode("%e2%82%ac"), "\xe2\x82\xac");  // UTF-8 bytes, either case
  // Malformed escapes stay as they are.
  EXPECT_EQ(PercentDecode("50%"), "50%");
  EXPECT_EQ(PercentDecode("%4"), "%4");
  EXPECT_EQ(PercentDecode("%zz%41"), "%zzA");
}

TEST(H2Framing, HttpStatusAndResetMapping) {
  EXPECT_EQ(HttpStatusToCode(200), 13);  // trailers without grpc-status: INTERNAL
  EXPECT_EQ(HttpStatusToCode(400), 13);
  EXPECT_EQ(HttpStatusToCode(401), 16);
  EXPECT_EQ(HttpStatusToCode(403), 7);
  EXPECT_EQ(HttpStatusToCode(404), 12);
  for (int s : {429, 502, 503, 504}) EXPECT_EQ(HttpStatusToCode(s), 14) << s;
  for (int s : {0, 302, 500, 418}) EXPECT_EQ(HttpStatusToCode(s), 2) << s;
  EXPECT_EQ(ResetToCode(0x7), 14);  // REFUSED_STREAM
  EXPECT_EQ(ResetToCode(0x8), 1);   // CANCEL
  EXPECT_EQ(ResetToCode(0xb), 8);   // ENHANCE_YOUR_CALM
  EXPECT_EQ(ResetToCode(0xc), 7);   // INADEQUATE_SECURITY
  for (uint32_t e : {0x1u, 0x2u, 0x3u, 0xdu, 0x99u}) EXPECT_EQ(ResetToCode(e), 13) << e;
}

TEST(H2Framing, GrpcTimeoutHasAtMostEightDigitsRoundedUp) {
  EXPECT_EQ(FormatGrpcTimeout(absl::Nanoseconds(1)), "1n");
  EXPECT_EQ(FormatGrpcTimeout(absl::Milliseconds(1)), "1000000n");
  EXPECT_EQ(FormatGrpcTimeout(absl::Nanoseconds(99999999)), "99999999n");
  EXPECT_EQ(FormatGrpcTimeout(absl::Milliseconds(100)), "100000u");
  EXPECT_EQ(FormatGrpcTimeout(absl::Nanoseconds(100000001)), "100001u");  // rounded up
  EXPECT_EQ(FormatGrpcTimeout(absl::Seconds(5)), "5000000u");
  EXPECT_EQ(FormatGrpcTimeout(absl::Seconds(100)), "100000m");
  EXPECT_EQ(FormatGrpcTimeout(absl::Hours(30)), "108000S");
  EXPECT_EQ(FormatGrpcTimeout(absl::Hours(24 * 365 * 4)), "2102400M");
  for (int64_t ns : {int64_t{1}, int64_t{123456789}, int64_t{987654321012}}) {
    const std::string t = FormatGrpcTimeout(absl::Nanoseconds(ns));
    EXPECT_LE(t.size(), 9u) << t;
  }
}

TEST(H2Framing, Targets) {
  auto t = ParseTarget("127.0.0.1:50051");
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->unix_socket);
  EXPECT_EQ(t->host, "127.0.0.1");
  EXPECT_EQ(t->port, 50051);
  EXPECT_EQ(t->authority, "127.0.0.1:50051");

  t = ParseTarget("[::1]:8080");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->host, "::1");
  EXPECT_EQ(t->authority, "[::1]:8080");

  t = ParseTarget("dns:///localhost:1234");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->host, "localhost");
  EXPECT_EQ(t->port, 1234);
  t = ParseTarget("ipv6:[::1]:9");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->host, "::1");

  t = ParseTarget("unix:/tmp/x.sock");
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->unix_socket);
  EXPECT_EQ(t->path, "/tmp/x.sock");
  EXPECT_EQ(t->authority, "localhost");
  t = ParseTarget("unix:///tmp/y.sock");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->path, "/tmp/y.sock");
  t = ParseTarget("unix:rel.sock");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->path, "rel.sock");

  for (const char* bad : {"localhost", "host:", "host:0", "host:70000", ":80", "::1:80",
                          "[::1]80", "unix:", "unix://rel", "a:1,b:2", "ipv4:1.2.3.4:1,5.6.7.8:1",
                          "xds:///svc", "unix-abstract:x"}) {
    const auto r = ParseTarget(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_NE(r.status().message().find(bad), std::string::npos) << r.status().message();
    }
  }
}

}  // namespace
}  // namespace lossd::loadtest::h2
