// Stress tests of lossd's own concurrency: the work queue, the memory budget, the stream window
// with clients that cancel, and a drain under load. They run in every build, and under
// AddressSanitizer + UBSan in `make asan`; docs/hardening.md says why these stand in for a
// ThreadSanitizer run. Bounded: every loop has a fixed count.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "server/memory.h"
#include "tests/server/test_server_util.h"
#include "server/work_queue.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

// Every accepted task runs exactly once, a full queue refuses instead of blocking, and the
// destructor runs what is still queued.
TEST(StressTest, WorkQueueRunsEveryAcceptedTaskOnce) {
  constexpr int kThreads = 8, kPerThread = 2000, kTasks = kThreads * kPerThread;
  std::vector<std::atomic<int>> runs(kTasks);
  std::atomic<int> accepted{0}, refused{0};
  {
    WorkQueue queue(3, 16);
    std::vector<std::thread> producers;
    for (int t = 0; t < kThreads; ++t) {
      producers.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; ++i) {
          const int id = t * kPerThread + i;
          if (queue.TrySubmit([&runs, id] { runs[id].fetch_add(1); })) {
            ++accepted;
          } else {
            ++refused;
          }
        }
      });
    }
    for (auto& p : producers) p.join();
  }  // joins the workers after the queue is drained
  int ran = 0;
  for (int id = 0; id < kTasks; ++id) {
    ASSERT_LE(runs[id].load(), 1) << "task " << id << " ran twice";
    ran += runs[id].load();
  }
  EXPECT_EQ(ran, accepted.load());
  EXPECT_EQ(accepted + refused, kTasks);
}

// Concurrent reservations never pass the limit together, and everything comes back.
TEST(StressTest, MemoryBudgetHoldsUnderContention) {
  constexpr int64_t kLimit = 1000;
  MemoryBudget budget(kLimit, /*trim_when_idle=*/false);
  std::atomic<int64_t> held{0}, most{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      // Each thread holds up to 3 reservations at once, releasing the oldest first.
      std::deque<std::unique_ptr<Reservation>> mine;
      auto release_oldest = [&] {
        held.fetch_sub(mine.front()->bytes());
        mine.pop_front();  // gives its bytes back
      };
      for (int i = 0; i < 20000; ++i) {
        if (mine.size() == 3) release_oldest();
        auto r = std::make_unique<Reservation>(&budget);
        const int64_t n = 1 + rng() % 300;
        if (!r->Add(n, "stress").ok()) continue;
        const int64_t now = held.fetch_add(n) + n;
        int64_t prev = most.load();
        while (now > prev && !most.compare_exchange_weak(prev, now)) {
        }
        mine.push_back(std::move(r));
      }
      while (!mine.empty()) release_oldest();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_LE(most.load(), kLimit);
  EXPECT_GT(most.load(), kLimit / 2) << "the budget was never contended";
  EXPECT_EQ(budget.held(), 0);
}

// Many streams with a window of 2, mixing good and bad batches, some cancelled halfway: every
// reply that arrives is in order and carries the bits of the one-shot result; afterwards no
// call and no byte is still held.
TEST(StressTest, StreamWindowWithCancellingClients) {
  ServerOptions o = LoopbackOptions();
  o.stream_window = 2;
  o.queue_capacity = 4096;
  auto server = StartServer(o);
  const int port = server->port();
  std::vector<v1::EvaluateRequest> batches;
  std::vector<std::string> want;
  {
    auto stub = Connect(port);
    for (int k = 0; k < 4; ++k) {
      batches.push_back(RandomRequest<float>(50 + 300 * k, 9, 10 + k, v1::REDUCTION_SUM));
      batches.back().set_request_id(absl::StrCat("b", k));
      grpc::ClientContext ctx;
      v1::EvaluateResponse resp;
      ASSERT_TRUE(stub->Evaluate(&ctx, batches.back(), &resp).ok());
      want.push_back(resp.loss().data());
    }
  }
  v1::EvaluateRequest bad = batches[0];
  bad.mutable_targets()->mutable_data()->resize(4);
  bad.set_request_id("bad");
  std::atomic<int> mismatches{0}, failures{0}, streams_done{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 12; ++c) {
    clients.emplace_back([&, c] {
      auto stub = Connect(port);
      std::mt19937 rng(c);
      for (int round = 0; round < 8; ++round) {
        grpc::ClientContext ctx;
        auto stream = stub->EvaluateStream(&ctx);
        const bool cancel = rng() % 4 == 0;
        std::vector<int> sent;
        for (int i = 0; i < 12; ++i) {
          const int k = static_cast<int>(rng() % 5);  // 4: the bad batch
          if (!stream->Write(k < 4 ? batches[k] : bad)) break;
          sent.push_back(k);
          if (cancel && i == 5) ctx.TryCancel();
        }
        stream->WritesDone();
        v1::EvaluateStreamResponse r;
        size_t got = 0;
        while (stream->Read(&r)) {
          if (got >= sent.size()) {
            ++mismatches;
            break;
          }
          const int k = sent[got++];
          if (k < 4) {
            mismatches += !r.has_response() || r.response().loss().data() != want[k] ||
                          r.request_id() != batches[k].request_id();
          } else {
            mismatches += !r.has_error() || r.request_id() != "bad";
          }
        }
        const grpc::Status s = stream->Finish();
        if (cancel) {
          failures += !s.ok() && s.error_code() != grpc::StatusCode::CANCELLED;
        } else {
          failures += !s.ok();
          mismatches += got != sent.size();
        }
        ++streams_done;
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(streams_done.load(), 12 * 8);
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(failures.load(), 0);
  for (int i = 0; i < 1000 && (server->in_flight_calls() > 0 || server->held_bytes() > 0);
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(server->in_flight_calls(), 0);
  EXPECT_EQ(server->held_bytes(), 0);
}

// A drain while clients keep calling: every call ends OK or UNAVAILABLE (none cancelled or
// lost), and Shutdown returns once they are done.
TEST(StressTest, DrainUnderLoad) {
  ServerOptions o = LoopbackOptions();
  o.queue_capacity = 4096;
  auto server = StartServer(o);
  const int port = server->port();
  const v1::EvaluateRequest small = RandomRequest<float>(30, 7, 1, v1::REDUCTION_SUM);
  const v1::EvaluateRequest large = RandomRequest<float>(1 << 13, 64, 2, v1::REDUCTION_MEAN);
  std::mutex mu;
  std::map<grpc::StatusCode, int> codes;
  std::atomic<int> calls{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      auto stub = Connect(port);
      for (int i = 0; i < 400; ++i) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
        v1::EvaluateResponse resp;
        grpc::Status s;
        if ((i + c) % 7 == 0) {
          auto stream = stub->EvaluateStream(&ctx);
          stream->Write(small);
          stream->Write(large);
          stream->WritesDone();
          v1::EvaluateStreamResponse r;
          while (stream->Read(&r)) {
          }
          s = stream->Finish();
        } else {
          s = stub->Evaluate(&ctx, (i % 5 == 0) ? large : small, &resp);
        }
        ++calls;
        {
          std::lock_guard<std::mutex> lock(mu);
          ++codes[s.error_code()];
        }
        // A refused or unreachable server: this client is done.
        if (s.error_code() == grpc::StatusCode::UNAVAILABLE) break;
      }
    });
  }
  while (calls.load() < 200) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  server->Shutdown(absl::Seconds(30));
  for (auto& t : clients) t.join();
  int total = 0;
  for (const auto& [code, n] : codes) {
    total += n;
    EXPECT_TRUE(code == grpc::StatusCode::OK || code == grpc::StatusCode::UNAVAILABLE)
        << "status " << code << " x" << n;
  }
  EXPECT_EQ(total, calls.load());
  EXPECT_GT(codes[grpc::StatusCode::OK], 0);
  EXPECT_EQ(server->in_flight_calls(), 0);
}

}  // namespace
}  // namespace lossd::server
