// The CUDA backend's transfer plans (kernels/cuda/segment_plan.h), checked on the CPU: the
// segmented launch keeps every evaluation's blocks as they are alone, and its layout neither
// overlaps nor misaligns; chunks cover a request in whole reduction blocks.
#include "kernels/cuda/segment_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "lossd/kernels/exact_sum.h"

namespace lossd::kernels::cuda {
namespace {

SegmentSpec Spec(int64_t numel, size_t item, bool grads, bool sums, size_t weight = 0) {
  SegmentSpec s;
  s.numel = numel;
  s.logits_bytes = s.targets_bytes = static_cast<size_t>(numel) * item;
  s.weight_bytes = weight;
  s.loss_bytes = sums ? 0 : static_cast<size_t>(numel) * item;
  if (grads) s.grad_logits_bytes = s.grad_targets_bytes = static_cast<size_t>(numel) * item;
  s.block_sums = sums;
  return s;
}

// Every tensor range of the plan, to check overlap and alignment.
std::vector<std::pair<size_t, size_t>> Ranges(const SegmentPlan& plan,
                                              const std::vector<SegmentSpec>& specs,
                                              size_t params_bytes) {
  std::vector<std::pair<size_t, size_t>> r;
  auto add = [&r](size_t at, size_t bytes) {
    if (bytes > 0) r.emplace_back(at, at + bytes);
  };
  add(plan.params, params_bytes * specs.size());
  add(plan.block_table, sizeof(int32_t) * plan.block_item.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const SegmentPlace& p = plan.items[i];
    add(p.logits, specs[i].logits_bytes);
    add(p.targets, specs[i].targets_bytes);
    add(p.weight, specs[i].weight_bytes);
    add(p.pos_weight, specs[i].pos_weight_bytes);
    add(p.loss, specs[i].loss_bytes);
    add(p.grad_logits, specs[i].grad_logits_bytes);
    add(p.grad_targets, specs[i].grad_targets_bytes);
  }
  bool sums = false;
  for (const SegmentSpec& s : specs) sums = sums || s.block_sums;
  if (sums) add(plan.sums, sizeof(double) * static_cast<size_t>(plan.total_blocks));
  return r;
}

TEST(SegmentPlanTest, HandComputedLayout) {
  // 1 element, 2049 elements (2 blocks) and 4096 elements (2 blocks), float32, SUM.
  const std::vector<SegmentSpec> specs = {Spec(1, 4, false, true), Spec(2049, 4, true, true),
                                          Spec(4096, 4, false, true, 16)};
  const SegmentPlan plan = PlanSegments(specs, 200);
  ASSERT_EQ(plan.items.size(), 3u);
  EXPECT_EQ(plan.total_blocks, 5);
  EXPECT_EQ(plan.block_item, (std::vector<int32_t>{0, 1, 1, 2, 2}));
  EXPECT_EQ(plan.items[0].first_block, 0);
  EXPECT_EQ(plan.items[1].first_block, 1);
  EXPECT_EQ(plan.items[2].first_block, 3);
  EXPECT_EQ(plan.items[1].blocks, 2);
  EXPECT_EQ(plan.params, 0u);
  EXPECT_EQ(plan.block_table, 768u);  // 600 bytes of parameters, aligned to 256
  EXPECT_EQ(plan.items[0].logits, 1024u);
  EXPECT_EQ(plan.items[0].targets, 1280u);
  EXPECT_EQ(plan.items[1].logits, 1536u);
  EXPECT_EQ(plan.items[1].targets, 1536u + 8448u);  // 8196 bytes, aligned to 256
  EXPECT_EQ(plan.items[2].logits, 1536u + 2 * 8448u);
  EXPECT_EQ(plan.items[2].targets, plan.items[2].logits + 16384u);
  EXPECT_EQ(plan.items[2].weight, plan.items[2].targets + 16384u);
  EXPECT_EQ(plan.in_bytes, plan.items[2].weight + 256u);
  // Outputs: only item 1's gradients, then 5 block sums.
  EXPECT_EQ(plan.items[1].grad_logits, plan.in_bytes);
  EXPECT_EQ(plan.items[1].grad_targets, plan.in_bytes + 8448u);
  EXPECT_EQ(plan.sums, plan.in_bytes + 2 * 8448u);
  EXPECT_EQ(plan.total, plan.sums + 256u);
}

TEST(SegmentPlanTest, RandomBatchesKeepEachItemsBlocksAndDoNotOverlap) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int count = 1 + static_cast<int>(rng() % 64);
    const size_t item = size_t{1} << (1 + rng() % 3);  // 2, 4 or 8 bytes
    const bool sums = rng() % 2 == 0;
    std::vector<SegmentSpec> specs;
    for (int i = 0; i < count; ++i) {
      specs.push_back(Spec(1 + static_cast<int64_t>(rng() % 70000), item, rng() % 2 == 0, sums,
                           rng() % 3 == 0 ? 8 * (1 + rng() % 100) : 0));
    }
    const size_t params_bytes = 8 * (1 + rng() % 40);
    const SegmentPlan plan = PlanSegments(specs, params_bytes);
    // Blocks: each item's blocks are consecutive, as many as alone, in the table.
    int64_t next = 0;
    for (int i = 0; i < count; ++i) {
      const SegmentPlace& p = plan.items[i];
      EXPECT_EQ(p.first_block, next);
      EXPECT_EQ(p.blocks, (specs[i].numel + kReduceBlock - 1) / kReduceBlock);
      for (int64_t b = 0; b < p.blocks; ++b) {
        ASSERT_EQ(plan.block_item[p.first_block + b], i);
      }
      next += p.blocks;
    }
    EXPECT_EQ(plan.total_blocks, next);
    EXPECT_EQ(static_cast<int64_t>(plan.block_item.size()), next);
    // Ranges: aligned, disjoint, inputs below in_bytes, outputs above, all below total.
    auto ranges = Ranges(plan, specs, params_bytes);
    std::sort(ranges.begin(), ranges.end());
    for (size_t k = 0; k < ranges.size(); ++k) {
      EXPECT_EQ(ranges[k].first % kStagingAlign, 0u);
      EXPECT_LE(ranges[k].second, plan.total);
      if (k > 0) {
        EXPECT_LE(ranges[k - 1].second, ranges[k].first);
      }
    }
    for (int i = 0; i < count; ++i) {
      EXPECT_LT(plan.items[i].targets, plan.in_bytes);
      if (specs[i].grad_logits_bytes > 0) {
        EXPECT_GE(plan.items[i].grad_logits, plan.in_bytes);
      }
    }
    if (sums) {
      EXPECT_GE(plan.sums, plan.in_bytes);
    }
  }
}

TEST(ChunkPlanTest, ChunksCoverTheRequestInWholeBlocks) {
  EXPECT_TRUE(PlanChunks(0, kReduceBlock).empty());
  EXPECT_TRUE(PlanChunks(100, 1000).empty());  // not a multiple of kReduceBlock
  const std::vector<Chunk> one = PlanChunks(5, 2 * kReduceBlock);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].begin, 0);
  EXPECT_EQ(one[0].count, 5);
  EXPECT_EQ(one[0].first_block, 0);

  const int64_t step = 3 * kReduceBlock;
  for (int64_t n : {step - 1, step, step + 1, 10 * step + 77, int64_t{64} << 20}) {
    const std::vector<Chunk> chunks = PlanChunks(n, step);
    ASSERT_EQ(static_cast<int64_t>(chunks.size()), (n + step - 1) / step) << n;
    int64_t covered = 0;
    for (size_t k = 0; k < chunks.size(); ++k) {
      EXPECT_EQ(chunks[k].begin, covered);
      EXPECT_EQ(chunks[k].begin % kReduceBlock, 0);
      EXPECT_EQ(chunks[k].first_block, chunks[k].begin / kReduceBlock);
      EXPECT_EQ(chunks[k].count, k + 1 < chunks.size() ? step : n - covered);
      covered += chunks[k].count;
    }
    EXPECT_EQ(covered, n);
  }
}

TEST(ChunkPlanTest, ChunkElementsFitTheBuffer) {
  // float32 logits, targets and one gradient: 12 bytes an element in 8 MiB: 341 blocks.
  EXPECT_EQ(ChunkElementsFor(12, size_t{8} << 20), 341 * kReduceBlock);
  EXPECT_LE(ChunkElementsFor(12, size_t{8} << 20) * 12, int64_t{8} << 20);
  // At least one block, whatever the buffer.
  EXPECT_EQ(ChunkElementsFor(40, 100), kReduceBlock);
  EXPECT_EQ(ChunkElementsFor(0, 4 * kReduceBlock), 4 * kReduceBlock);
}

}  // namespace
}  // namespace lossd::kernels::cuda
