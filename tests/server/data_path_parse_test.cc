// The wire-level request parse of the data path (server/message_io.h) against protobuf's own
// parser: random messages written field by field (any order, repeated fields, unknown fields
// and groups, fields of the wrong wire type, sub-messages that merge, oneof switches), split at
// random slice boundaries, then mutated and truncated. For every input both parsers fail, or
// both succeed with the same message once the views are put back into the tensors' data.
#include <grpc/grpc.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "server/buffer_pool.h"
#include "google/protobuf/stubs/logging.h"
#include "google/protobuf/util/message_differencer.h"
#include "lossd/v1/lossd.pb.h"
#include "server/memory.h"
#include "server/message_io.h"
#include "server/wire.h"

namespace lossd::server {
namespace {

using Rng = std::mt19937_64;

class Wire {
 public:
  static void Varint(uint64_t v, std::string* out) {
    while (v >= 0x80) {
      out->push_back(static_cast<char>(v | 0x80));
      v >>= 7;
    }
    out->push_back(static_cast<char>(v));
  }
  static void Tag(uint32_t field, uint32_t wire, std::string* out) {
    Varint((field << 3) | wire, out);
  }
  static void Len(uint32_t field, const std::string& body, std::string* out) {
    Tag(field, 2, out);
    Varint(body.size(), out);
    out->append(body);
  }
};

uint64_t Below(Rng& rng, uint64_t n) { return rng() % n; }
bool OneIn(Rng& rng, uint64_t n) { return Below(rng, n) == 0; }

// A message of `fields` fields, each appended by add_field (which picks it, so that the fields
// come in random order and repeat at random).
template <typename AddField>
std::string Fields(int fields, AddField add_field) {
  std::string m;
  for (int i = 0; i < fields; ++i) add_field(m);
  return m;
}

std::string RandomBytes(Rng& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

// An unknown field of any wire type (groups nested at most `depth` more levels).
void Unknown(Rng& rng, uint32_t field, int depth, std::string* out) {
  switch (Below(rng, depth > 0 ? 5 : 4)) {
    case 0:
      Wire::Tag(field, 0, out);
      Wire::Varint(rng() >> Below(rng, 64), out);
      break;
    case 1:
      Wire::Tag(field, 1, out);
      out->append(RandomBytes(rng, 8));
      break;
    case 2:
      Wire::Tag(field, 5, out);
      out->append(RandomBytes(rng, 4));
      break;
    case 3:
      Wire::Len(field, RandomBytes(rng, Below(rng, 20)), out);
      break;
    default: {
      Wire::Tag(field, 3, out);
      const int n = static_cast<int>(Below(rng, 3));
      for (int i = 0; i < n; ++i) Unknown(rng, 1 + static_cast<uint32_t>(Below(rng, 30)), depth - 1, out);
      Wire::Tag(field, 4, out);
    }
  }
}

std::string TensorBody(Rng& rng) {
  return Fields(static_cast<int>(Below(rng, 7)), [&rng](std::string& b) {
    switch (Below(rng, 9)) {
      case 0:
        Wire::Tag(1, 0, &b);
        Wire::Varint(Below(rng, 6), &b);
        break;
      case 1: {  // packed shape
        std::string packed;
        for (int k = static_cast<int>(Below(rng, 4)); k > 0; --k) Wire::Varint(Below(rng, 9), &packed);
        Wire::Len(2, packed, &b);
        break;
      }
      case 2:  // unpacked shape entry
        Wire::Tag(2, 0, &b);
        Wire::Varint(Below(rng, 9), &b);
        break;
      case 3:
      case 4:
      case 5: {  // data, of any length (the differences are in where it lies)
        const size_t n = OneIn(rng, 6) ? 0 : Below(rng, OneIn(rng, 3) ? 3000 : 64);
        Wire::Len(3, RandomBytes(rng, n), &b);
        break;
      }
      case 6: {  // ref
        v1::TensorReference ref;
        ref.set_region(OneIn(rng, 2) ? "r1" : "region-two");
        ref.set_offset(Below(rng, 1000));
        ref.set_byte_size(Below(rng, 1000));
        Wire::Len(4, ref.SerializeAsString(), &b);
        break;
      }
      case 7:  // data with the wrong wire type: an unknown field
        Wire::Tag(3, OneIn(rng, 2) ? 0 : 5, &b);
        if (b.back() == 24) {
          Wire::Varint(rng() % 1000, &b);
        } else {
          b.append(RandomBytes(rng, 4));
        }
        break;
      default:
        Unknown(rng, 5 + static_cast<uint32_t>(Below(rng, 40)), 2, &b);
    }
  });
}

std::string BceBody(Rng& rng) {
  return Fields(static_cast<int>(Below(rng, 5)), [&rng](std::string& b) {
    switch (Below(rng, 6)) {
      case 0:
      case 1:
        Wire::Len(1, TensorBody(rng), &b);  // pos_weight, merged when repeated
        break;
      case 2:
        Wire::Tag(2, 0, &b);
        Wire::Varint(rng(), &b);
        break;
      case 3:
        Wire::Tag(3, 0, &b);
        Wire::Varint(Below(rng, 2), &b);
        break;
      case 4:
        Wire::Tag(4, 1, &b);
        b.append(RandomBytes(rng, 8));
        break;
      default:
        Unknown(rng, 5 + static_cast<uint32_t>(Below(rng, 20)), 2, &b);
    }
  });
}

// A valid EvaluateRequest in wire format, fields in random order and repeated at random.
std::string RandomRequest(Rng& rng) {
  return Fields(1 + static_cast<int>(Below(rng, 14)), [&rng](std::string& m) {
    switch (Below(rng, 13)) {
      case 0:
        Wire::Len(1, OneIn(rng, 2) ? "req-" + std::to_string(rng() % 100) : "", &m);
        break;
      case 1:
      case 2:
      case 3:
      case 4:
        Wire::Len(2 + static_cast<uint32_t>(Below(rng, 3)), TensorBody(rng), &m);
        break;
      case 5:
        Wire::Len(5, BceBody(rng), &m);
        break;
      case 6: {
        v1::SigmoidFocalLoss focal;
        if (OneIn(rng, 2)) focal.set_gamma(1.5);
        Wire::Len(6, focal.SerializeAsString(), &m);
        break;
      }
      case 7:
        Wire::Tag(16, 0, &m);
        Wire::Varint(Below(rng, 6), &m);
        break;
      case 8: {
        v1::GradientRequest g;
        g.set_logits(OneIn(rng, 2));
        g.set_targets(OneIn(rng, 2));
        Wire::Len(17, g.SerializeAsString(), &m);
        break;
      }
      case 9: {
        v1::OutputPlacement o;
        o.mutable_grad_logits()->set_region("out");
        Wire::Len(21, o.SerializeAsString(), &m);
        break;
      }
      case 10:  // a data-carrying field number with the wrong wire type: unknown
        Wire::Tag(2 + static_cast<uint32_t>(Below(rng, 4)), 0, &m);
        Wire::Varint(rng() % 100000, &m);
        break;
      default:
        Unknown(rng, OneIn(rng, 2) ? 7 + static_cast<uint32_t>(Below(rng, 9))
                                   : 22 + static_cast<uint32_t>(Below(rng, 5000)),
                3, &m);
    }
  });
}

// `bytes` as a ByteBuffer of slices cut at random places (empty slices included).
grpc::ByteBuffer Split(Rng& rng, const std::string& bytes, int max_cuts) {
  std::vector<size_t> cuts = {0, bytes.size()};
  const int n = static_cast<int>(Below(rng, static_cast<uint64_t>(max_cuts) + 1));
  for (int i = 0; i < n; ++i) cuts.push_back(bytes.empty() ? 0 : Below(rng, bytes.size() + 1));
  std::sort(cuts.begin(), cuts.end());
  std::vector<grpc::Slice> slices;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    slices.emplace_back(bytes.data() + cuts[i], cuts[i + 1] - cuts[i]);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// Our parse with the views put back, or nullopt when it failed.
std::optional<v1::EvaluateRequest> Ours(grpc::ByteBuffer buffer, BufferPool* pool,
                                        MemoryBudget* budget, absl::Status* status) {
  Reservation reservation(budget);
  const int64_t received = MessageBytes(buffer);
  EXPECT_TRUE(reservation.Add(received, "test").ok());
  ReceivedRequest parsed;
  *status = ParseEvaluateRequest(&buffer, pool, &reservation, &parsed);
  EXPECT_FALSE(buffer.Valid() && buffer.Length() > 0) << "the parse empties the buffer";
  if (!status->ok()) {
    EXPECT_EQ(reservation.bytes(), 0) << "a failed parse holds nothing";
    return std::nullopt;
  }
  EXPECT_EQ(reservation.bytes(), parsed.held_bytes());
  EXPECT_LE(parsed.held_bytes(), received + parsed.copied_bytes());
  v1::EvaluateRequest m = parsed.message();
  // The skeleton never holds tensor data; the views do.
  EXPECT_TRUE(m.logits().data().empty() && m.targets().data().empty() &&
              m.weight().data().empty() && m.bce_with_logits().pos_weight().data().empty());
  auto put = [&](bool has, v1::Tensor* (*get)(v1::EvaluateRequest*), int k) {
    if (has) {
      get(&m)->set_data(std::string(parsed.data(k)));
    } else {
      EXPECT_TRUE(parsed.data(k).empty()) << "data of an absent tensor " << k;
    }
  };
  put(m.has_logits(), [](v1::EvaluateRequest* r) { return r->mutable_logits(); }, kLogitsData);
  put(m.has_targets(), [](v1::EvaluateRequest* r) { return r->mutable_targets(); },
      kTargetsData);
  put(m.has_weight(), [](v1::EvaluateRequest* r) { return r->mutable_weight(); }, kWeightData);
  put(m.has_bce_with_logits() && m.bce_with_logits().has_pos_weight(),
      [](v1::EvaluateRequest* r) { return r->mutable_bce_with_logits()->mutable_pos_weight(); },
      kPosWeightData);
  return m;
}

class DataPathParseTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    grpc_init();
    InstallProtobufLogHandler();  // protobuf's UTF-8 complaints become the error message
  }
  static void TearDownTestSuite() { grpc_shutdown(); }

  // Both parsers on `bytes` split at random; returns whether protobuf accepted it.
  bool Compare(Rng& rng, const std::string& bytes, int max_cuts) {
    v1::EvaluateRequest expected;
    google::protobuf::SetLogHandler(nullptr);  // its UTF-8 complaints, expected here
    const bool ok = expected.ParseFromString(bytes);
    InstallProtobufLogHandler();
    absl::Status status;
    auto ours = Ours(Split(rng, bytes, max_cuts), &pool_, &budget_, &status);
    EXPECT_EQ(ok, ours.has_value()) << "protobuf " << (ok ? "accepts" : "rejects")
                                    << " what lossd's parse " << (ok ? "rejects: " : "accepts")
                                    << status;
    if (!ok) {
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
      EXPECT_NE(status.message().find("do not parse as lossd.v1.EvaluateRequest"),
                std::string::npos)
          << status;
    }
    if (ok && ours) {
      std::string diff;
      google::protobuf::util::MessageDifferencer d;
      d.ReportDifferencesToString(&diff);
      EXPECT_TRUE(d.Compare(expected, *ours)) << diff;
      EXPECT_EQ(expected.SerializeAsString(), ours->SerializeAsString());
    }
    return ok;
  }

  BufferPool pool_;
  MemoryBudget budget_{0, /*trim_when_idle=*/false};
};

TEST_F(DataPathParseTest, RandomValidMessagesEqualProtobuf) {
  Rng rng(1);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    const std::string bytes = RandomRequest(rng);
    accepted += Compare(rng, bytes, OneIn(rng, 4) ? 0 : 40);
  }
  EXPECT_GT(accepted, 2900) << "the generator writes valid messages";
  EXPECT_EQ(budget_.held(), 0);
}

TEST_F(DataPathParseTest, MutatedAndTruncatedMessagesFailOrMatchProtobuf) {
  Rng rng(2);
  int accepted = 0, rejected = 0;
  for (int i = 0; i < 6000; ++i) {
    std::string bytes = RandomRequest(rng);
    const int edits = 1 + static_cast<int>(Below(rng, 3));
    for (int e = 0; e < edits && !bytes.empty(); ++e) {
      const size_t at = Below(rng, bytes.size());
      switch (Below(rng, 6)) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes[at] = static_cast<char>(bytes[at] ^ (1 << Below(rng, 8)));
          break;
        case 2:
          bytes.insert(at, 1, static_cast<char>(rng()));
          break;
        case 3:
          bytes.erase(at, 1 + Below(rng, 4));
          break;
        case 4:
          bytes.resize(at);  // truncated
          break;
        default: {
          // Bytes that stress the varint, tag and length rules.
          static const char* kTricky[] = {"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                                          "\xff\xff\xff\xff\x0f", "\xff\xff\xff\xff\x07",
                                          "\x80\x80\x80\x80\x08", "\x00", "\x04", "\x0b",
                                          "\x1c", "\x06", "\x07", "\xf8\xff\xff\xff\x0f"};
          const std::string t = kTricky[Below(rng, std::size(kTricky))];
          bytes.insert(at, t.empty() ? std::string(1, '\0') : t);
        }
      }
    }
    (Compare(rng, bytes, 30) ? accepted : rejected) += 1;
  }
  EXPECT_GT(accepted, 300);
  EXPECT_GT(rejected, 300);
  EXPECT_EQ(budget_.held(), 0);
}

TEST_F(DataPathParseTest, InvalidUtf8RequestIdFailsLikeProtobuf) {
  Rng rng(3);
  std::string bytes;
  Wire::Len(1, "\xff\xfe", &bytes);
  Wire::Len(2, TensorBody(rng), &bytes);
  absl::Status status;
  EXPECT_FALSE(Ours(Split(rng, bytes, 3), &pool_, &budget_, &status).has_value());
  EXPECT_NE(status.message().find("UTF-8"), std::string::npos) << status;
}

// The address of message offset `at` in `slices`.
uintptr_t AddressOf(const std::vector<grpc::Slice>& slices, size_t at) {
  for (const grpc::Slice& s : slices) {
    if (at < s.size()) return reinterpret_cast<uintptr_t>(s.begin()) + at;
    at -= s.size();
  }
  return 0;
}

// `bytes` cut every `piece` bytes.
std::vector<grpc::Slice> Cut(const std::string& bytes, size_t piece) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += piece) {
    slices.emplace_back(bytes.data() + at, std::min(piece, bytes.size() - at));
  }
  return slices;
}

// Data inside one slice and aligned for its dtype is read in place (the slice is kept); data
// across slices, or misaligned, is copied once; every other slice is released.
TEST_F(DataPathParseTest, DataInOneSliceIsAViewDataAcrossSlicesIsCopiedOnce) {
  for (size_t piece : {size_t{1} << 30, size_t{65536}}) {
    SCOPED_TRACE(piece);
    // A request_id length that puts the tensors' data at addresses aligned for their dtypes.
    bool tested = false;
    for (int pad = 0; pad < 16 && !tested; ++pad) {
      v1::EvaluateRequest r;
      r.set_request_id(std::string(1 + pad, 'i'));
      r.mutable_logits()->set_dtype(v1::DTYPE_FLOAT32);
      r.mutable_logits()->set_data(std::string(400000, 'x'));
      r.mutable_targets()->set_dtype(v1::DTYPE_FLOAT16);
      r.mutable_targets()->set_data(std::string(16, 'y'));
      const std::string bytes = r.SerializeAsString();
      std::vector<grpc::Slice> slices = Cut(bytes, piece);
      // The logits need float32 alignment only where they can be read in place.
      if ((piece > bytes.size() && AddressOf(slices, bytes.find('x')) % 4 != 0) ||
          AddressOf(slices, bytes.find('y')) % 2 != 0) {
        continue;
      }
      grpc::ByteBuffer buffer(slices.data(), slices.size());
      const size_t first = reinterpret_cast<uintptr_t>(slices[0].begin());
      slices.clear();
      ReceivedRequest parsed;
      Reservation reservation(&budget_);
      ASSERT_TRUE(reservation.Add(static_cast<int64_t>(bytes.size()), "test").ok());
      ASSERT_TRUE(ParseEvaluateRequest(&buffer, &pool_, &reservation, &parsed).ok());
      EXPECT_EQ(parsed.data(kLogitsData), r.logits().data());
      EXPECT_EQ(parsed.data(kTargetsData), r.targets().data());
      EXPECT_EQ(reservation.bytes(), parsed.held_bytes());
      if (piece > bytes.size()) {  // one slice: no copy at all
        EXPECT_EQ(parsed.viewed_tensors(), 2);
        EXPECT_EQ(parsed.copied_tensors(), 0);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(parsed.data(kLogitsData).data()),
                  first + bytes.find('x'));
        EXPECT_EQ(parsed.held_bytes(), static_cast<int64_t>(bytes.size()));
      } else {  // 64 KiB slices, as gRPC delivers a large message: the logits span them
        EXPECT_EQ(parsed.copied_tensors(), 1);
        EXPECT_EQ(parsed.copied_bytes(), 400000);
        EXPECT_EQ(parsed.viewed_tensors(), 1);  // the targets, inside the last slice
        // The copy plus the one slice the targets' view keeps.
        EXPECT_EQ(parsed.held_bytes(), 400000 + static_cast<int64_t>(bytes.size() % piece));
      }
      tested = true;
    }
    EXPECT_TRUE(tested);
  }
  // Misaligned data inside one slice is copied (the kernels load typed elements). The message
  // is larger than kWholeParseBytes, so it is scanned.
  v1::EvaluateRequest r;
  r.mutable_logits()->set_dtype(v1::DTYPE_FLOAT64);
  r.mutable_logits()->set_data(std::string(kWholeParseBytes + 800, 'x'));
  for (int pad = 0; pad < 8; ++pad) {
    r.set_request_id(std::string(1 + pad, 'i'));
    const std::string bytes = r.SerializeAsString();
    std::vector<grpc::Slice> slices = Cut(bytes, 1 << 30);
    const bool aligned = AddressOf(slices, bytes.find('x')) % 8 == 0;
    grpc::ByteBuffer buffer(slices.data(), slices.size());
    ReceivedRequest parsed;
    ASSERT_TRUE(ParseEvaluateRequest(&buffer, &pool_, nullptr, &parsed).ok());
    EXPECT_EQ(parsed.copied_tensors(), aligned ? 0 : 1);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(parsed.data(kLogitsData).data()) % 8, 0u);
    EXPECT_EQ(parsed.data(kLogitsData), r.logits().data());
    EXPECT_FALSE(parsed.parsed_whole());
  }
}

// A small message in one slice is parsed whole by protobuf: every tensor's data is a view of
// the parsed message (copied once), aligned for its dtype whatever its offset in the slice,
// and the reservation holds the message's size. One byte more than kWholeParseBytes, or a
// second slice, and it is scanned instead.
TEST_F(DataPathParseTest, SmallMessageInOneSliceIsParsedWhole) {
  for (int pad = 0; pad < 8; ++pad) {
    SCOPED_TRACE(pad);
    v1::EvaluateRequest r;
    r.set_request_id(std::string(1 + pad, 'i'));
    r.mutable_logits()->set_dtype(v1::DTYPE_FLOAT64);
    r.mutable_logits()->set_data(std::string(800, 'x'));
    r.mutable_targets()->set_dtype(v1::DTYPE_FLOAT16);
    r.mutable_targets()->set_data(std::string(6, 'y'));  // short enough to be stored inline
    r.mutable_bce_with_logits()->mutable_pos_weight()->set_dtype(v1::DTYPE_FLOAT32);
    r.mutable_bce_with_logits()->mutable_pos_weight()->set_data(std::string(12, 'p'));
    const std::string bytes = r.SerializeAsString();
    ASSERT_LE(bytes.size(), kWholeParseBytes);
    for (size_t piece : {size_t{1} << 30, bytes.size() / 2}) {
      std::vector<grpc::Slice> slices = Cut(bytes, piece);
      grpc::ByteBuffer buffer(slices.data(), slices.size());
      slices.clear();
      ReceivedRequest parsed;
      Reservation reservation(&budget_);
      ASSERT_TRUE(reservation.Add(static_cast<int64_t>(bytes.size()), "test").ok());
      ASSERT_TRUE(ParseEvaluateRequest(&buffer, &pool_, &reservation, &parsed).ok());
      const bool whole = piece > bytes.size();
      EXPECT_EQ(parsed.parsed_whole(), whole);
      EXPECT_EQ(parsed.data(kLogitsData), r.logits().data());
      EXPECT_EQ(parsed.data(kTargetsData), r.targets().data());
      EXPECT_EQ(parsed.data(kPosWeightData), r.bce_with_logits().pos_weight().data());
      EXPECT_TRUE(parsed.data(kWeightData).empty());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(parsed.data(kLogitsData).data()) % 8, 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(parsed.data(kTargetsData).data()) % 2, 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(parsed.data(kPosWeightData).data()) % 4, 0u);
      EXPECT_EQ(reservation.bytes(), parsed.held_bytes());
      if (whole) {
        EXPECT_EQ(parsed.copied_tensors(), 3);
        EXPECT_EQ(parsed.copied_bytes(), 818);
        EXPECT_EQ(parsed.viewed_tensors(), 0);
        EXPECT_EQ(parsed.held_bytes(), static_cast<int64_t>(bytes.size()));
        // The message itself keeps no tensor data.
        EXPECT_TRUE(parsed.message().logits().data().empty());
      }
      parsed.Clear();
      EXPECT_FALSE(parsed.parsed_whole());
    }
  }
  // Just over the limit, in one slice: scanned, the logits read in place when aligned.
  v1::EvaluateRequest big;
  big.mutable_logits()->set_dtype(v1::DTYPE_FLOAT32);
  big.mutable_logits()->set_data(std::string(kWholeParseBytes, 'x'));
  const std::string bytes = big.SerializeAsString();
  std::vector<grpc::Slice> slices = Cut(bytes, size_t{1} << 30);
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  ReceivedRequest parsed;
  ASSERT_TRUE(ParseEvaluateRequest(&buffer, &pool_, nullptr, &parsed).ok());
  EXPECT_FALSE(parsed.parsed_whole());
  EXPECT_EQ(parsed.data(kLogitsData), big.logits().data());
  EXPECT_EQ(budget_.held(), 0);
}

}  // namespace
}  // namespace lossd::server
