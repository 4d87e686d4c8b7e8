// TLS, mutual TLS and bearer-token authentication. Certificates are made per run with the
// openssl command-line tool.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(std::filesystem::temp_directory_path() /
                           ("lossd-tls-" + std::to_string(::getpid())));
    std::filesystem::create_directories(*dir_);
    const std::string d = *dir_;
    // Two CAs; a server certificate for localhost/127.0.0.1; a client certificate from each CA.
    const std::string script =
        "set -e; cd " + d + ";"
        "for ca in ca other; do openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=$ca "
        "-keyout $ca.key -out $ca.crt 2>/dev/null; done;"
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext;"
        "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out "
        "server.csr 2>/dev/null;"
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile san.ext -out server.crt 2>/dev/null;"
        "for c in ca other; do openssl req -newkey rsa:2048 -nodes -subj /CN=client-$c -keyout "
        "client-$c.key -out client-$c.csr 2>/dev/null; openssl x509 -req -in client-$c.csr -CA "
        "$c.crt -CAkey $c.key -CAcreateserial -days 2 -out client-$c.crt 2>/dev/null; done";
    std::ofstream(F("make_certs.sh")) << script << "\n";
    ASSERT_EQ(std::system(("bash " + F("make_certs.sh")).c_str()), 0) << "openssl failed";
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }
  static std::string F(const std::string& name) { return *dir_ + "/" + name; }

  static std::shared_ptr<grpc::ChannelCredentials> Tls(const std::string& client = "") {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = Slurp(F("ca.crt"));
    if (!client.empty()) {
      o.pem_private_key = Slurp(F(client + ".key"));
      o.pem_cert_chain = Slurp(F(client + ".crt"));
    }
    return grpc::SslCredentials(o);
  }

  static grpc::StatusCode Call(v1::LossService::Stub* stub, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) ctx.AddMetadata("authorization", token);
    v1::EvaluateResponse resp;
    return stub->Evaluate(&ctx, RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp)
        .error_code();
  }

  static std::string* dir_;
};

std::string* SecurityTest::dir_ = nullptr;

TEST_F(SecurityTest, TlsAcceptsTlsClientsOnly) {
  ServerOptions o = LoopbackOptions();
  o.tls_cert_file = F("server.crt");
  o.tls_key_file = F("server.key");
  auto server = StartServer(o);
  auto tls = Connect(server->port(), Tls(), "localhost");
  EXPECT_EQ(Call(tls.get()), grpc::StatusCode::OK);
  auto plain = Connect(server->port(), grpc::InsecureChannelCredentials(), "localhost");
  EXPECT_EQ(Call(plain.get()), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromTheCa) {
  ServerOptions o = LoopbackOptions();
  o.tls_cert_file = F("server.crt");
  o.tls_key_file = F("server.key");
  o.tls_client_ca_file = F("ca.crt");
  auto server = StartServer(o);
  const int port = server->port();
  EXPECT_EQ(Call(Connect(port, Tls("client-ca"), "localhost").get()), grpc::StatusCode::OK);
  EXPECT_EQ(Call(Connect(port, Tls(), "localhost").get()), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(Connect(port, Tls("client-other"), "localhost").get()),
            grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, BearerTokenGuardsTheServiceButNotHealth) {
  ServerOptions o = LoopbackOptions();
  o.auth_token = "s3cret-token";
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  EXPECT_EQ(Call(stub.get()), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(stub.get(), "Bearer wrong-token"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(stub.get(), "Bearer s3cret-token-longer"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(stub.get(), "s3cret-token"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(stub.get(), "Bearer s3cret-token"), grpc::StatusCode::OK);
  auto health = grpc::health::v1::Health::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckResponse hr;
  ASSERT_TRUE(health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &hr).ok());
  EXPECT_EQ(hr.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(SecurityTest, BadTlsOptionsAreRejectedAtStart) {
  ServerOptions o = LoopbackOptions();
  o.tls_cert_file = F("server.crt");
  EXPECT_EQ(LossdServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.tls_key_file = F("missing.key");
  EXPECT_EQ(LossdServer::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lossd::server
