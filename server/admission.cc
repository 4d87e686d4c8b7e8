#include "server/admission.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lossd::server {

namespace {

// Compares in time that depends only on the lengths, not on where the strings differ.
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char ca = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char cb = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= ca ^ cb;
  }
  return diff == 0;
}

}  // namespace

Admission::Admission(std::string auth_token, Metrics* metrics)
    : auth_token_(std::move(auth_token)), metrics_(metrics) {}

absl::Status Admission::Admit(const grpc::CallbackServerContext& context) const {
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  return Admit(it == md.end()
                   ? std::nullopt
                   : std::optional<std::string_view>(std::in_place, it->second.data(),
                                                     it->second.size()),
               "\"authorization: Bearer <token>\" metadata");
}

absl::Status Admission::Admit(std::optional<std::string_view> authorization,
                              std::string_view carrier) const {
  if (draining_.load()) {
    return absl::UnavailableError("the server is draining for shutdown; retry on another server");
  }
  if (auth_token_.empty()) return absl::OkStatus();
  if (!authorization.has_value()) {
    return absl::UnauthenticatedError(
        absl::StrCat("missing ", absl::string_view(carrier.data(), carrier.size()),
                     " (this server requires a token)"));
  }
  const std::string_view value = *authorization;
  constexpr std::string_view kPrefix = "Bearer ";
  const bool ok = value.size() > kPrefix.size() && value.substr(0, kPrefix.size()) == kPrefix &&
                  ConstantTimeEquals(value.substr(kPrefix.size()), auth_token_);
  if (!ok) return absl::UnauthenticatedError("invalid bearer token");
  return absl::OkStatus();
}

void Admission::CallStarted() {
  in_flight_.fetch_add(1);
  metrics_->InFlight(+1);
}

void Admission::CallEnded() {
  in_flight_.fetch_sub(1);
  metrics_->InFlight(-1);
}

void Admission::set_draining(bool draining) {
  draining_.store(draining);
  metrics_->SetDraining(draining);
}

}  // namespace lossd::server
