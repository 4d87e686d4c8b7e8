// Tensor buffers of the data path (docs/data-path.md section 3): large blocks that stay mapped
// and pre-faulted between calls, so that a request's input copy and its outputs cost neither a
// page fault nor a zero-fill, and that a reply can hand them to gRPC without a copy.
//
// Blocks of at least `min_pooled_bytes` are anonymous mappings, populated once when created,
// rounded up to a size class (8 classes per power of two: at most 12.5 % unused) and cached
// per class when returned, up to `max_cached_bytes`; Trim() unmaps the cached ones (the memory
// budget calls it once the server has been idle, memory.h). Smaller blocks come from malloc.
// lossd never zero-fills a block: every byte a caller reads was written by it first.
// Thread-safe; a block may outlive its pool (it is then unmapped when released).
#ifndef LOSSD_SERVER_BUFFER_POOL_H_
#define LOSSD_SERVER_BUFFER_POOL_H_

#include <grpcpp/support/slice.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace lossd::server {

namespace pool_internal {
struct PoolState;
}  // namespace pool_internal

// One block, returned to its pool when destroyed. Move-only.
class PoolBlock {
 public:
  PoolBlock() = default;
  PoolBlock(PoolBlock&& other) noexcept { *this = std::move(other); }
  PoolBlock& operator=(PoolBlock&& other) noexcept;
  PoolBlock(const PoolBlock&) = delete;
  PoolBlock& operator=(const PoolBlock&) = delete;
  ~PoolBlock() { Reset(); }

  char* data() const { return data_; }
  size_t size() const { return size_; }  // the bytes asked for (capacity() may be more)
  size_t capacity() const { return capacity_; }
  bool empty() const { return data_ == nullptr; }
  // Returns the block to its pool now.
  void Reset();

  // Hands the block's first size() bytes to gRPC without a copy: the slice owns the block and
  // returns it to the pool when gRPC releases the slice's last reference.
  grpc::Slice ToSlice() &&;

 private:
  friend class BufferPool;
  std::shared_ptr<pool_internal::PoolState> pool_;  // null for malloc'd blocks
  char* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

struct BufferPoolOptions {
  size_t min_pooled_bytes = size_t{64} << 10;   // smaller blocks come from malloc
  int64_t max_cached_bytes = int64_t{1} << 30;  // returned blocks kept mapped, at most
};

class BufferPool {
 public:
  explicit BufferPool(const BufferPoolOptions& options = {});
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A block of `bytes` bytes (contents unspecified). Empty when the memory cannot be mapped.
  PoolBlock Get(size_t bytes);

  // Unmaps every cached block (blocks in use are not affected).
  void Trim();

  // Observability and tests.
  int64_t cached_bytes() const;
  int64_t mapped_bytes() const;  // cached + in use
  int64_t hits() const;          // Get served from the cache
  int64_t maps() const;          // Get that had to map a new block

  // The capacity a block of `bytes` bytes gets (its size class).
  static size_t ClassSize(size_t bytes);

 private:
  std::shared_ptr<pool_internal::PoolState> state_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_BUFFER_POOL_H_
