#include "server/buffer_pool.h"

#include <sys/mman.h>

#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace lossd::server {

namespace pool_internal {

struct PoolState {
  explicit PoolState(const BufferPoolOptions& o) : options(o) {}
  ~PoolState() { Trim(); }

  void Trim() {
    std::map<size_t, std::vector<char*>> dropped;
    {
      std::lock_guard<std::mutex> lock(mu);
      dropped.swap(free_blocks);
      mapped -= cached;
      cached = 0;
    }
    for (auto& [capacity, blocks] : dropped) {
      for (char* p : blocks) munmap(p, capacity);
    }
  }

  // Takes back a mapped block: cached, after unmapping other cached blocks (largest first)
  // when it would pass the cap; unmapped when it alone passes the cap. The block just used is
  // the likeliest to be asked for again.
  void Return(char* data, size_t capacity) {
    std::vector<std::pair<char*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto size = static_cast<int64_t>(capacity);
      if (size > options.max_cached_bytes) {
        unmap.emplace_back(data, capacity);
      } else {
        while (cached + size > options.max_cached_bytes) {
          auto it = std::prev(free_blocks.end());
          unmap.emplace_back(it->second.back(), it->first);
          it->second.pop_back();
          cached -= static_cast<int64_t>(it->first);
          if (it->second.empty()) free_blocks.erase(it);
        }
        free_blocks[capacity].push_back(data);
        cached += size;
      }
      for (const auto& [p, n] : unmap) mapped -= static_cast<int64_t>(n);
    }
    for (const auto& [p, n] : unmap) munmap(p, n);
  }

  const BufferPoolOptions options;
  std::mutex mu;
  std::map<size_t, std::vector<char*>> free_blocks;  // by capacity
  int64_t cached = 0;
  int64_t mapped = 0;
  int64_t hits = 0;
  int64_t maps = 0;
};

}  // namespace pool_internal

PoolBlock& PoolBlock::operator=(PoolBlock&& other) noexcept {
  if (this != &other) {
    Reset();
    pool_ = std::move(other.pool_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void PoolBlock::Reset() {
  if (data_ == nullptr) return;
  if (pool_) {
    pool_->Return(data_, capacity_);
    pool_.reset();
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  size_ = capacity_ = 0;
}

namespace {
void DestroyBlock(void* block) { delete static_cast<PoolBlock*>(block); }
}  // namespace

grpc::Slice PoolBlock::ToSlice() && {
  const size_t n = size_;
  auto* owner = new PoolBlock(std::move(*this));
  return grpc::Slice(owner->data(), n, &DestroyBlock, owner);
}

BufferPool::BufferPool(const BufferPoolOptions& options)
    : state_(std::make_shared<pool_internal::PoolState>(options)) {}

BufferPool::~BufferPool() { state_->Trim(); }

size_t BufferPool::ClassSize(size_t bytes) {
  // 8 classes per power of two, in whole pages.
  constexpr size_t kPage = 4096;
  size_t top = 1;
  while (top <= bytes / 2) top <<= 1;  // the highest power of two <= bytes
  size_t step = top / 8;
  if (step < kPage) step = kPage;
  return (bytes + step - 1) / step * step;
}

PoolBlock BufferPool::Get(size_t bytes) {
  PoolBlock block;
  if (bytes < state_->options.min_pooled_bytes) {
    // malloc(0) may return null: ask for one byte so that an empty block is still a block.
    block.data_ = static_cast<char*>(std::malloc(bytes == 0 ? 1 : bytes));
    if (block.data_ == nullptr) return block;
    block.size_ = bytes;
    block.capacity_ = bytes;
    return block;
  }
  const size_t capacity = ClassSize(bytes);
  char* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto it = state_->free_blocks.find(capacity);
    if (it != state_->free_blocks.end()) {
      data = it->second.back();
      it->second.pop_back();
      if (it->second.empty()) state_->free_blocks.erase(it);
      state_->cached -= static_cast<int64_t>(capacity);
      ++state_->hits;
    }
  }
  if (data == nullptr) {
    // Populated now, once: later users of the block take no page fault.
    void* p = mmap(nullptr, capacity, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) return block;
    data = static_cast<char*>(p);
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->mapped += static_cast<int64_t>(capacity);
    ++state_->maps;
  }
  block.pool_ = state_;
  block.data_ = data;
  block.size_ = bytes;
  block.capacity_ = capacity;
  return block;
}

void BufferPool::Trim() { state_->Trim(); }

namespace {
using pool_internal::PoolState;
// One counter of the pool's state, read under its lock.
int64_t ReadCounter(PoolState& state, int64_t PoolState::*counter) {
  std::lock_guard<std::mutex> lock(state.mu);
  return state.*counter;
}
}  // namespace

int64_t BufferPool::cached_bytes() const { return ReadCounter(*state_, &PoolState::cached); }
int64_t BufferPool::mapped_bytes() const { return ReadCounter(*state_, &PoolState::mapped); }
int64_t BufferPool::hits() const { return ReadCounter(*state_, &PoolState::hits); }
int64_t BufferPool::maps() const { return ReadCounter(*state_, &PoolState::maps); }

}  // namespace lossd::server
