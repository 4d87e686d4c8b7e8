#include "server/message_io.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/wire.h"

namespace lossd::server {

namespace {

// Wire types (protobuf encoding).
constexpr uint32_t kVarint = 0, kFixed64 = 1, kLen = 2, kStartGroup = 3, kEndGroup = 4,
                   kFixed32 = 5;

// Where a tensor's data field last occurred, as offsets into the whole message.
struct DataLoc {
  uint64_t offset = 0;
  uint64_t size = 0;
};

struct Piece {
  const char* data;
  uint64_t size;
  uint64_t start;  // offset of its first byte in the message
};

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Reads a message spread over pieces with protobuf's parser's rules (parse_context.h of
// protobuf 3.21: tags of at most 5 bytes, varints of at most 10, lengths of at most 5 bytes
// and below 2^31 - 16, field number 0 and stray end-group tags rejected, groups matched by
// their tag) and writes the skeleton: every byte except the data fields of the request's
// tensors, with the lengths of the sub-messages that held them re-encoded.
class Scanner {
 public:
  Scanner(const std::vector<Piece>& pieces, uint64_t total) : pieces_(pieces), total_(total) {}

  bool Request(std::string* out, DataLoc locs[4]) {
    const uint64_t end = total_;
    int oneof = 0;  // the field number of the loss oneof's current member
    while (pos_ < end) {
      uint32_t tag;
      if (!Tag(end, &tag, out)) return false;
      const uint32_t number = tag >> 3, wire = tag & 7;
      if (wire == kLen && number >= 2 && number <= 4) {
        if (!Tensor(end, &locs[number - 2], out)) return false;
        continue;
      }
      if (wire == kLen && (number == 5 || number == 6) && oneof != static_cast<int>(number)) {
        oneof = static_cast<int>(number);  // a new member: the previous one is dropped
        locs[kPosWeightData] = DataLoc();
      }
      if (wire == kLen && number == 5) {
        if (!Bce(end, &locs[kPosWeightData], out)) return false;
        continue;
      }
      if (!Value(end, tag, out)) return false;
    }
    return true;
  }

  uint64_t pos() const { return pos_; }

 private:
  bool Next(uint64_t end, uint8_t* b) {
    if (pos_ >= end) return false;
    while (off_ == pieces_[idx_].size) {
      ++idx_;
      off_ = 0;
    }
    *b = static_cast<uint8_t>(pieces_[idx_].data[off_++]);
    ++pos_;
    return true;
  }

  // Moves over n bytes (n <= end - pos, checked by the caller), appending them to `out`
  // unless it is null.
  void Take(uint64_t n, std::string* out) {
    while (n > 0) {
      if (off_ == pieces_[idx_].size) {
        ++idx_;
        off_ = 0;
        continue;
      }
      const uint64_t k = std::min(n, pieces_[idx_].size - off_);
      if (out != nullptr) out->append(pieces_[idx_].data + off_, k);
      off_ += k;
      pos_ += k;
      n -= k;
    }
  }

  // A varint of at most `max_bytes` bytes (its low 64 bits), raw bytes appended to `out`.
  bool Varint(uint64_t end, int max_bytes, uint64_t* value, std::string* out) {
    uint64_t v = 0;
    for (int i = 0; i < max_bytes; ++i) {
      uint8_t b;
      if (!Next(end, &b)) return false;
      if (out != nullptr) out->push_back(static_cast<char>(b));
      v |= static_cast<uint64_t>(b & 0x7f) << (7 * i);
      if (b < 0x80) {
        *value = v;
        return true;
      }
    }
    return false;
  }

  // A tag: at most 5 bytes, truncated to 32 bits; 0 and field number 0 are invalid.
  bool Tag(uint64_t end, uint32_t* tag, std::string* out) {
    uint64_t v;
    if (!Varint(end, 5, &v, out)) return false;
    *tag = static_cast<uint32_t>(v);
    return (*tag >> 3) != 0 && (*tag & 7) != kEndGroup;
  }

  // A length: at most 5 bytes, the fifth below 8, at most INT_MAX - 16, and within `end`.
  bool Length(uint64_t end, uint64_t* n, std::string* out) {
    const uint64_t at = pos_;
    if (!Varint(end, 5, n, out)) return false;
    if (pos_ - at == 5) {
      if ((*n >> 28) >= 8 || *n > static_cast<uint64_t>(INT_MAX - 16)) return false;
    }
    return *n <= end - pos_;
  }

  // The value of a field whose tag was read (and appended to `out`); appended to `out`.
  bool Value(uint64_t end, uint32_t tag, std::string* out) {
    uint64_t n;
    switch (tag & 7) {
      case kVarint:
        return Varint(end, 10, &n, out);
      case kFixed64:
      case kFixed32:
        n = (tag & 7) == kFixed64 ? 8 : 4;
        if (end - pos_ < n) return false;
        Take(n, out);
        return true;
      case kLen:
        if (!Length(end, &n, out)) return false;
        Take(n, out);
        return true;
      case kStartGroup:
        return Group(end, tag, out);
      default:  // end group outside a group, 6, 7
        return false;
    }
  }

  // A group's fields up to its end tag (the start tag plus one), nested groups included.
  bool Group(uint64_t end, uint32_t start, std::string* out) {
    std::vector<uint32_t> open = {start};
    while (!open.empty()) {
      uint64_t v;
      if (!Varint(end, 5, &v, out)) return false;
      const uint32_t tag = static_cast<uint32_t>(v);
      if ((tag >> 3) == 0) return false;
      if ((tag & 7) == kEndGroup) {
        if (tag != open.back() + 1) return false;
        open.pop_back();
      } else if ((tag & 7) == kStartGroup) {
        open.push_back(tag);
      } else if (!Value(end, tag, out)) {
        return false;
      }
    }
    return true;
  }

  // A sub-message (its tag already written to `out`), copied to `out` with its length
  // re-encoded. field(end, tag, mark, &body) sees each field after its tag was appended to body
  // at offset mark: it returns 1 when it took the field, 0 to have it copied, -1 when the field
  // is malformed.
  template <typename F>
  bool SubMessage(uint64_t outer_end, std::string* out, F field) {
    uint64_t n;
    if (!Length(outer_end, &n, nullptr)) return false;
    const uint64_t end = pos_ + n;
    std::string body;
    while (pos_ < end) {
      const size_t mark = body.size();
      uint32_t tag;
      if (!Tag(end, &tag, &body)) return false;
      const int took = field(end, tag, mark, &body);
      if (took < 0 || (took == 0 && !Value(end, tag, &body))) return false;
    }
    AppendVarint(body.size(), out);
    out->append(body);
    return true;
  }

  // A Tensor sub-message: written with its data field (3) left out; the data's place goes to
  // `loc`.
  bool Tensor(uint64_t outer_end, DataLoc* loc, std::string* out) {
    const auto data = [&](uint64_t end, uint32_t tag, size_t mark, std::string* body) {
      if (tag != ((3 << 3) | kLen)) return 0;
      body->resize(mark);
      uint64_t size;
      if (!Length(end, &size, nullptr)) return -1;
      *loc = DataLoc{pos_, size};
      Take(size, nullptr);
      return 1;
    };
    return SubMessage(outer_end, out, data);
  }

  // A BceWithLogits sub-message: its pos_weight (field 1) is a Tensor.
  bool Bce(uint64_t outer_end, DataLoc* pos_weight, std::string* out) {
    return SubMessage(outer_end, out, [&](uint64_t end, uint32_t tag, size_t, std::string* body) {
      if (tag != ((1 << 3) | kLen)) return 0;
      return Tensor(end, pos_weight, body) ? 1 : -1;
    });
  }

  const std::vector<Piece>& pieces_;
  const uint64_t total_;
  uint64_t pos_ = 0;
  size_t idx_ = 0;
  uint64_t off_ = 0;
};

// The alignment the kernels need for a tensor of `dtype` (its item size; 8 when unknown).
uintptr_t Alignment(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return 4;
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16:
      return 2;
    default:
      return 8;
  }
}

// The piece holding the message offset `at` (at < total).
size_t PieceAt(const std::vector<Piece>& pieces, uint64_t at) {
  auto it = std::upper_bound(pieces.begin(), pieces.end(), at,
                             [](uint64_t x, const Piece& p) { return x < p.start; });
  size_t k = static_cast<size_t>(it - pieces.begin()) - 1;
  while (pieces[k].size == 0 || at >= pieces[k].start + pieces[k].size) ++k;
  return k;
}

}  // namespace

int64_t ReceivedRequest::payload_bytes() const {
  int64_t n = 0;
  for (const std::string_view& d : data_) n += static_cast<int64_t>(d.size());
  return n;
}

void ReceivedRequest::Clear() {
  message_.Clear();
  for (std::string_view& d : data_) d = {};
  kept_.clear();
  copies_.clear();
  held_bytes_ = 0;
  viewed_ = copied_ = 0;
  copied_bytes_ = 0;
  parsed_whole_ = false;
  for (std::string& d : owned_) std::string().swap(d);
}

absl::Status ParseEvaluateRequest(grpc::ByteBuffer* buffer, BufferPool* pool,
                                  Reservation* reservation, ReceivedRequest* out) {
  out->Clear();
  const int64_t received = MessageBytes(*buffer);
  std::vector<grpc::Slice> slices;
  if (buffer->Valid()) {
    (void)buffer->Dump(&slices);
    buffer->Clear();  // the slices are now held by `slices` alone
  }
  int64_t charged = received;  // what `reservation` holds for this request
  auto settle = [&](int64_t now_held) {
    if (reservation != nullptr && charged > now_held) reservation->Release(charged - now_held);
    charged = now_held;
  };
  // A small message in one slice: protobuf parses it whole, as gRPC would, and the tensors'
  // data strings move out of the message. Copying a few KiB costs less than the scan, the
  // skeleton and their allocations (docs/data-path.md section 2).
  if (slices.size() == 1 && received <= static_cast<int64_t>(kWholeParseBytes)) {
    const grpc::Slice& s = slices[0];
    if (absl::Status st = ParseMessageBytes(
            std::string_view(reinterpret_cast<const char*>(s.begin()), s.size()), received,
            &out->message_);
        !st.ok()) {
      settle(0);
      return st;
    }
    // The message keeps no tensor data here either: the strings move out of it (heap strings
    // keep their 16-byte aligned buffers; short ones land inline in `owned_`, 8-byte aligned).
    v1::Tensor* tensors[4] = {
        out->message_.has_logits() ? out->message_.mutable_logits() : nullptr,
        out->message_.has_targets() ? out->message_.mutable_targets() : nullptr,
        out->message_.has_weight() ? out->message_.mutable_weight() : nullptr,
        out->message_.has_bce_with_logits() && out->message_.bce_with_logits().has_pos_weight()
            ? out->message_.mutable_bce_with_logits()->mutable_pos_weight()
            : nullptr};
    bool aligned = true;
    for (int t = 0; t < 4; ++t) {
      if (tensors[t] == nullptr) continue;
      out->owned_[t].swap(*tensors[t]->mutable_data());
      const std::string& d = out->owned_[t];
      aligned = aligned && (d.empty() || reinterpret_cast<uintptr_t>(d.data()) %
                                                 Alignment(tensors[t]->dtype()) ==
                                             0);
    }
    if (aligned) {
      slices.clear();
      for (int t = 0; t < 4; ++t) {
        out->data_[t] = out->owned_[t];
        if (!out->data_[t].empty()) ++out->copied_;
        out->copied_bytes_ += static_cast<int64_t>(out->data_[t].size());
      }
      out->parsed_whole_ = true;
      out->held_bytes_ = received;  // the message and its data, about as large as their bytes
      settle(received);
      return absl::OkStatus();
    }
    // Not expected with glibc's allocator; the scan below reads the slice instead.
    out->Clear();
  }
  std::vector<Piece> pieces;
  pieces.reserve(slices.size());
  uint64_t total = 0;
  for (const grpc::Slice& s : slices) {
    pieces.push_back(Piece{reinterpret_cast<const char*>(s.begin()), s.size(), total});
    total += s.size();
  }

  std::string skeleton;
  DataLoc locs[4];
  {
    Scanner scanner(pieces, total);
    if (!scanner.Request(&skeleton, locs)) {
      settle(0);
      return MalformedMessage(received, out->message_);
    }
  }
  // The skeleton, charged while it exists.
  const int64_t skeleton_bytes = static_cast<int64_t>(skeleton.size());
  if (reservation != nullptr) {
    if (absl::Status s = reservation->Add(skeleton_bytes, "the request"); !s.ok()) {
      settle(0);
      return s;
    }
    charged += skeleton_bytes;
  }
  if (absl::Status s = ParseMessageBytes(skeleton, received, &out->message_); !s.ok()) {
    settle(0);
    return s;
  }
  std::string().swap(skeleton);
  settle(charged - skeleton_bytes);
  // Data inside one slice and aligned for its dtype (the kernels load typed elements) is read
  // in place; the rest is copied once, into blocks that are aligned.
  const v1::Tensor* tensors[4] = {&out->message_.logits(), &out->message_.targets(),
                                  &out->message_.weight(),
                                  &out->message_.bce_with_logits().pos_weight()};
  bool in_place[4] = {false, false, false, false};
  int64_t copy_bytes = 0;
  for (int t = 0; t < 4; ++t) {
    if (locs[t].size == 0) continue;
    const size_t k = PieceAt(pieces, locs[t].offset);
    const uintptr_t at =
        reinterpret_cast<uintptr_t>(pieces[k].data) + (locs[t].offset - pieces[k].start);
    in_place[t] = locs[t].offset + locs[t].size <= pieces[k].start + pieces[k].size &&
                  at % Alignment(tensors[t]->dtype()) == 0;
    if (!in_place[t]) copy_bytes += static_cast<int64_t>(locs[t].size);
  }
  if (reservation != nullptr) {
    if (absl::Status s = reservation->Add(copy_bytes, "the request's tensors"); !s.ok()) {
      settle(0);
      out->Clear();
      return s;
    }
    charged += copy_bytes;
  }

  // Slices that data read in place lies in stay; the others are released as soon as the
  // copies are past them (docs/data-path.md section 4).
  std::vector<bool> keep(pieces.size(), false);
  for (int t = 0; t < 4; ++t) {
    if (in_place[t]) keep[PieceAt(pieces, locs[t].offset)] = true;
  }
  // Copies in message order.
  int order[4] = {0, 1, 2, 3};
  std::sort(order, order + 4, [&](int a, int b) { return locs[a].offset < locs[b].offset; });
  size_t released = 0;  // slices before this one are released or kept
  auto release_before = [&](size_t k) {
    for (; released < k; ++released) {
      if (!keep[released]) slices[released] = grpc::Slice();
    }
  };
  for (int t : order) {
    if (locs[t].size == 0 || in_place[t]) continue;
    PoolBlock block = pool->Get(locs[t].size);
    if (block.empty()) {
      settle(0);
      out->Clear();
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot map ", locs[t].size, " bytes for the request's tensor data"));
    }
    size_t k = PieceAt(pieces, locs[t].offset);
    uint64_t at = locs[t].offset;
    uint64_t done = 0;
    while (done < locs[t].size) {
      const Piece& p = pieces[k];
      const uint64_t from = at - p.start;
      const uint64_t n = std::min(p.size - from, locs[t].size - done);
      std::memcpy(block.data() + done, p.data + from, n);
      done += n;
      at += n;
      if (done < locs[t].size) {
        ++k;
        release_before(k);
      }
    }
    out->data_[t] = std::string_view(block.data(), block.size());
    out->copies_.push_back(std::move(block));
    ++out->copied_;
    out->copied_bytes_ += static_cast<int64_t>(locs[t].size);
  }
  release_before(pieces.size());
  // The kept slices move into `out` (a small slice holds its bytes inside the grpc_slice
  // itself, so views are taken from the slice's final place).
  int64_t held = out->copied_bytes_;
  std::vector<size_t> kept_at(pieces.size(), 0);
  out->kept_.reserve(static_cast<size_t>(std::count(keep.begin(), keep.end(), true)));
  for (size_t k = 0; k < pieces.size(); ++k) {
    if (!keep[k]) continue;
    held += static_cast<int64_t>(pieces[k].size);
    kept_at[k] = out->kept_.size();
    out->kept_.push_back(std::move(slices[k]));
  }
  for (int t = 0; t < 4; ++t) {
    if (!in_place[t]) continue;
    const size_t k = PieceAt(pieces, locs[t].offset);
    const char* base = reinterpret_cast<const char*>(out->kept_[kept_at[k]].begin());
    out->data_[t] = std::string_view(base + (locs[t].offset - pieces[k].start), locs[t].size);
    ++out->viewed_;
  }
  out->held_bytes_ = held;
  settle(held);
  return absl::OkStatus();
}

// ---- replies -----------------------------------------------------------------------------

namespace {

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  for (; v >= 0x80; v >>= 7) ++n;
  return n;
}

// A length-delimited field: its tag and length.
void AppendLenField(uint32_t field, size_t length, std::string* out) {
  out->push_back(static_cast<char>((field << 3) | kLen));
  AppendVarint(length, out);
}

struct EncodedTensor {
  std::string header;  // the Tensor's tag, length, dtype, shape and the data's tag and length
  PoolBlock* data = nullptr;
  std::string trailer;  // the ref of a placed output
  size_t bytes() const { return header.size() + (data ? data->size() : 0) + trailer.size(); }
};

// The sizes are computed first so that the header is written in place, without temporaries
// (a small call's reply is encoded in a few hundred instructions).
void EncodeTensor(uint32_t field, OutputTensor* t, EncodedTensor* e) {
  const uint64_t dtype = static_cast<uint64_t>(static_cast<int64_t>(t->dtype));
  const size_t dtype_bytes = t->dtype != v1::DTYPE_UNSPECIFIED ? 1 + VarintSize(dtype) : 0;
  size_t packed = 0;
  for (int64_t d : t->shape) packed += VarintSize(static_cast<uint64_t>(d));
  const size_t shape_bytes = t->shape.empty() ? 0 : 1 + VarintSize(packed) + packed;
  const size_t data_bytes = t->placed ? 0 : t->block.size();
  const size_t data_header = data_bytes > 0 ? 1 + VarintSize(data_bytes) : 0;
  if (t->placed) {
    std::string ref;
    t->ref.SerializeToString(&ref);
    AppendLenField(4, ref.size(), &e->trailer);
    e->trailer.append(ref);
  }
  const size_t length = dtype_bytes + shape_bytes + data_header + data_bytes + e->trailer.size();
  std::string& h = e->header;
  h.reserve(1 + VarintSize(length) + dtype_bytes + shape_bytes + data_header);
  AppendLenField(field, length, &h);
  if (dtype_bytes > 0) {
    h.push_back(static_cast<char>((1 << 3) | kVarint));
    AppendVarint(dtype, &h);
  }
  if (shape_bytes > 0) {
    AppendLenField(2, packed, &h);
    for (int64_t d : t->shape) AppendVarint(static_cast<uint64_t>(d), &h);
  }
  if (data_bytes > 0) {
    AppendLenField(3, data_bytes, &h);
    e->data = &t->block;
  }
}

}  // namespace

int64_t ReplyPayloadBytes(const ComputeResult& r) {
  int64_t n = 0;
  for (const OutputTensor* t : {&r.loss, &r.grad_logits, &r.grad_targets}) {
    if (t->present && !t->placed) n += static_cast<int64_t>(t->block.size());
  }
  return n;
}

absl::Status EncodeEvaluateReply(const std::string& request_id, bool stream,
                                 ComputeResult* result, grpc::ByteBuffer* out) {
  // Canonical field order, as protobuf serializes: request_id (1), the tensors (2-4), device
  // (5), timing (6, always present), num_elements (7); proto3 leaves out empty strings and
  // zero scalars.
  const size_t id_bytes =
      request_id.empty() ? 0 : 1 + VarintSize(request_id.size()) + request_id.size();
  const uint64_t device = static_cast<uint64_t>(static_cast<int64_t>(result->device));
  const size_t device_bytes = device != 0 ? 1 + VarintSize(device) : 0;
  const size_t timing_size = result->timing.ByteSizeLong();
  const size_t timing_bytes = 1 + VarintSize(timing_size) + timing_size;
  const uint64_t numel = static_cast<uint64_t>(result->num_elements);
  const size_t numel_bytes = numel != 0 ? 1 + VarintSize(numel) : 0;
  EncodedTensor tensors[3];
  OutputTensor* outputs[3] = {&result->loss, &result->grad_logits, &result->grad_targets};
  size_t inner = id_bytes + device_bytes + timing_bytes + numel_bytes;
  size_t inline_data = 0;  // tensor bytes copied into the text
  for (int i = 0; i < 3; ++i) {
    if (!outputs[i]->present) continue;
    EncodeTensor(static_cast<uint32_t>(i + 2), outputs[i], &tensors[i]);
    inner += tensors[i].bytes();
    if (tensors[i].data != nullptr && tensors[i].data->size() < kZeroCopyBytes) {
      inline_data += tensors[i].data->size();
    }
  }
  const size_t wrapper_bytes = stream ? id_bytes + 1 + VarintSize(inner) : 0;
  if (wrapper_bytes + inner > static_cast<size_t>(INT_MAX)) {
    return absl::InternalError(
        absl::StrCat("cannot serialize the reply: ", inner, " bytes is over 2 GiB"));
  }
  std::string text;  // bytes not yet in a slice
  text.reserve(wrapper_bytes + id_bytes + device_bytes + timing_bytes + numel_bytes +
               inline_data + 64);
  auto append_id = [&]() {
    if (request_id.empty()) return;
    AppendLenField(1, request_id.size(), &text);
    text.append(request_id);
  };
  if (stream) {
    append_id();
    AppendLenField(2, inner, &text);
  }
  append_id();
  std::vector<grpc::Slice> slices;
  for (EncodedTensor& e : tensors) {
    text.append(e.header);
    if (e.data != nullptr) {
      if (e.data->size() >= kZeroCopyBytes) {
        slices.emplace_back(text);
        text.clear();
        slices.push_back(std::move(*e.data).ToSlice());
      } else {
        text.append(e.data->data(), e.data->size());
        e.data->Reset();
      }
    }
    text.append(e.trailer);
  }
  if (device_bytes > 0) {
    text.push_back(static_cast<char>((5 << 3) | kVarint));
    AppendVarint(device, &text);
  }
  AppendLenField(6, timing_size, &text);
  const size_t at = text.size();
  text.resize(at + timing_size);
  result->timing.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(&text[at]));
  if (numel_bytes > 0) {
    text.push_back(static_cast<char>((7 << 3) | kVarint));
    AppendVarint(numel, &text);
  }
  if (slices.empty()) {
    grpc::Slice slice(text);
    grpc::ByteBuffer buffer(&slice, 1);
    out->Swap(&buffer);
    return absl::OkStatus();
  }
  slices.emplace_back(text);
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  out->Swap(&buffer);
  return absl::OkStatus();
}

int64_t PayloadBytes(const v1::EvaluateRequest& r) {
  return static_cast<int64_t>(r.logits().data().size() + r.targets().data().size() +
                              r.weight().data().size() +
                              r.bce_with_logits().pos_weight().data().size());
}

int64_t PayloadBytes(const v1::EvaluateResponse& r) {
  return static_cast<int64_t>(r.loss().data().size() + r.grad_logits().data().size() +
                              r.grad_targets().data().size());
}

}  // namespace lossd::server
