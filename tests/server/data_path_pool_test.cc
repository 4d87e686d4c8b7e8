// The buffer pool of the data path (server/buffer_pool.h, docs/data-path.md section 3): size
// classes, reuse, the cap on cached bytes, trimming, and blocks handed to gRPC as slices that
// come back to the pool when the slice is released.
#include <grpc/grpc.h>
#include <grpcpp/support/byte_buffer.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "server/buffer_pool.h"

namespace lossd::server {
namespace {

TEST(DataPathPoolTest, SizeClassesWasteAtMostAnEighth) {
  for (size_t n : {size_t{65536}, size_t{65537}, size_t{100000}, size_t{1} << 20,
                   (size_t{1} << 20) + 1, size_t{3} << 22, (size_t{64} << 20) - 5,
                   size_t{64} << 20, size_t{1000000007}}) {
    const size_t c = BufferPool::ClassSize(n);
    EXPECT_GE(c, n);
    EXPECT_EQ(c % 4096, 0u) << n;
    EXPECT_LE(c - n, n / 8 + 4096) << n;
  }
  EXPECT_EQ(BufferPool::ClassSize(size_t{64} << 20), size_t{64} << 20);
}

TEST(DataPathPoolTest, ReturnedBlocksAreReusedUpToTheCap) {
  BufferPoolOptions o;
  o.max_cached_bytes = 3 << 20;
  BufferPool pool(o);
  {
    PoolBlock a = pool.Get(1 << 20);
    ASSERT_FALSE(a.empty());
    std::memset(a.data(), 1, a.size());
  }
  EXPECT_EQ(pool.cached_bytes(), 1 << 20);
  PoolBlock b = pool.Get(1 << 20);  // the same class: from the cache
  EXPECT_EQ(pool.hits(), 1);
  EXPECT_EQ(pool.maps(), 1);
  EXPECT_EQ(pool.cached_bytes(), 0);
  {
    PoolBlock big = pool.Get(2 << 20);
    PoolBlock c = pool.Get(1 << 20);
  }
  EXPECT_EQ(pool.cached_bytes(), 3 << 20);
  b.Reset();  // past the cap: the largest cached block makes room
  EXPECT_LE(pool.cached_bytes(), 3 << 20);
  EXPECT_EQ(pool.cached_bytes(), 2 << 20);
  { PoolBlock huge = pool.Get(8 << 20); }  // over the cap alone: unmapped
  EXPECT_EQ(pool.cached_bytes(), 2 << 20);
  pool.Trim();
  EXPECT_EQ(pool.cached_bytes(), 0);
  EXPECT_EQ(pool.mapped_bytes(), 0);
}

TEST(DataPathPoolTest, SmallBlocksComeFromMalloc) {
  BufferPool pool;
  PoolBlock a = pool.Get(100);
  PoolBlock z = pool.Get(0);
  EXPECT_FALSE(a.empty());
  EXPECT_FALSE(z.empty());
  EXPECT_EQ(z.size(), 0u);
  EXPECT_EQ(pool.mapped_bytes(), 0);
}

TEST(DataPathPoolTest, ASliceReturnsItsBlockWhenGrpcReleasesIt) {
  grpc_init();
  grpc::Slice outlives_the_pool;
  {
    BufferPool pool;
    PoolBlock block = pool.Get(1 << 20);
    std::memset(block.data(), 7, block.size());
    const char* data = block.data();
    grpc::ByteBuffer buffer;
    {
      grpc::Slice slice = std::move(block).ToSlice();
      EXPECT_TRUE(block.empty());
      EXPECT_EQ(reinterpret_cast<const char*>(slice.begin()), data);  // no copy
      EXPECT_EQ(slice.size(), size_t{1} << 20);
      buffer = grpc::ByteBuffer(&slice, 1);
    }
    EXPECT_EQ(pool.cached_bytes(), 0) << "the buffer still references the block";
    buffer.Clear();
    EXPECT_EQ(pool.cached_bytes(), 1 << 20);
    PoolBlock late = pool.Get(1 << 20);
    std::memset(late.data(), 9, late.size());
    outlives_the_pool = std::move(late).ToSlice();
  }
  // A block may outlive its pool: it stays valid, and is unmapped when released.
  EXPECT_EQ(outlives_the_pool.begin()[12345], 9);
  outlives_the_pool = grpc::Slice();
  grpc_shutdown();
}

}  // namespace
}  // namespace lossd::server
