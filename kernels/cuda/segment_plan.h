// Host-side plans of the CUDA backend's transfers, in plain C++ (no CUDA types) so that the
// CPU-only tests check them (tests/kernels/segment_plan_test.cc):
//  - PlanSegments: the byte layout and block table of one segmented launch over a batch of
//    evaluations (Backend::BceBatch; docs/kernels.md, "Segmented batch launch"). Every
//    evaluation keeps exactly the reduction blocks it has alone: its block b covers its
//    elements [b kReduceBlock, (b + 1) kReduceBlock) and writes its block sum b, so the batch
//    changes no bit of its results.
//  - PlanChunks: the chunks of a large host request streamed through pinned staging buffers
//    (docs/kernels.md, "Pinned chunk pipeline"): chunk boundaries are multiples of kReduceBlock,
//    so every reduction block lies in one chunk and keeps its global index.
#ifndef LOSSD_KERNELS_CUDA_SEGMENT_PLAN_H_
#define LOSSD_KERNELS_CUDA_SEGMENT_PLAN_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lossd/kernels/exact_sum.h"  // kReduceBlock

namespace lossd::kernels::cuda {

// Alignment of every tensor inside a staging area (the device buffer's allocation alignment,
// so that the kernels' 16-byte vector accesses apply).
inline constexpr size_t kStagingAlign = 256;
inline constexpr size_t AlignStaging(size_t n) {
  return (n + kStagingAlign - 1) / kStagingAlign * kStagingAlign;
}

// ---- Segmented launch ------------------------------------------------------------------------

// One evaluation of a segmented launch as the plan sees it: its element count and the bytes of
// what it uploads and downloads (0: absent).
struct SegmentSpec {
  int64_t numel = 0;         // >= 1
  size_t logits_bytes = 0;   // numel elements of the logits' dtype
  size_t targets_bytes = 0;  // numel elements of the targets' dtype
  size_t weight_bytes = 0;   // the weight as uploaded; 0: absent
  size_t pos_weight_bytes = 0;
  size_t loss_bytes = 0;  // per-element losses (NONE) coming back; 0: none
  size_t grad_logits_bytes = 0;
  size_t grad_targets_bytes = 0;
  bool block_sums = false;  // a reduced loss: its block sums come back
};

// Where one evaluation lies. Input offsets are from the start of the staging area, output
// offsets too (the outputs follow the inputs: PlanSegments).
struct SegmentPlace {
  int64_t first_block = 0;  // its block b is block first_block + b of the launch
  int64_t blocks = 0;       // NumReduceBlocks(numel)
  size_t logits = 0, targets = 0, weight = 0, pos_weight = 0;  // inputs
  size_t loss = 0, grad_logits = 0, grad_targets = 0;          // outputs
};

// The staging area of a segmented launch, one contiguous range of bytes laid out the same on
// the host (pinned) and on the device, so that one copy each way moves everything:
//   [0, in_bytes)         inputs: `params_bytes` bytes of launch parameters per evaluation,
//                         the block table (int32 evaluation index per block), then each
//                         evaluation's logits, targets, weight and pos_weight;
//   [in_bytes, total)     outputs: each evaluation's losses and gradients, then the block
//                         sums (double per block of the launch, at index first_block + b).
// Every tensor starts at a multiple of kStagingAlign.
struct SegmentPlan {
  std::vector<SegmentPlace> items;
  std::vector<int32_t> block_item;  // launch block -> evaluation index
  int64_t total_blocks = 0;
  size_t params = 0;       // offset of the parameter array (params_bytes per evaluation)
  size_t block_table = 0;  // offset of block_item
  size_t in_bytes = 0;     // the inputs: [0, in_bytes)
  size_t sums = 0;         // offset of the block sums (total_blocks doubles), when any is wanted
  size_t total = 0;        // the outputs: [in_bytes, total)
};

inline int64_t NumBlocksOf(int64_t numel) { return (numel + kReduceBlock - 1) / kReduceBlock; }

// Lays out the evaluations in order. `params_bytes`: the size of one evaluation's launch
// parameters (a multiple of 8). Evaluations must have numel >= 1, and the launch fewer than
// 2^31 blocks (the caller bounds the staging size far below that).
inline SegmentPlan PlanSegments(const std::vector<SegmentSpec>& specs, size_t params_bytes) {
  SegmentPlan plan;
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignStaging(bytes);
    return at;
  };
  plan.items.resize(specs.size());
  bool any_sums = false;
  for (size_t i = 0; i < specs.size(); ++i) {
    SegmentPlace& p = plan.items[i];
    p.first_block = plan.total_blocks;
    p.blocks = NumBlocksOf(specs[i].numel);
    plan.total_blocks += p.blocks;
    any_sums = any_sums || specs[i].block_sums;
  }
  plan.params = place(params_bytes * specs.size());
  plan.block_table = place(sizeof(int32_t) * static_cast<size_t>(plan.total_blocks));
  plan.block_item.reserve(static_cast<size_t>(plan.total_blocks));
  for (size_t i = 0; i < specs.size(); ++i) {
    plan.block_item.insert(plan.block_item.end(), static_cast<size_t>(plan.items[i].blocks),
                           static_cast<int32_t>(i));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    SegmentPlace& p = plan.items[i];
    p.logits = place(specs[i].logits_bytes);
    p.targets = place(specs[i].targets_bytes);
    p.weight = place(specs[i].weight_bytes);
    p.pos_weight = place(specs[i].pos_weight_bytes);
  }
  plan.in_bytes = off;
  for (size_t i = 0; i < specs.size(); ++i) {
    SegmentPlace& p = plan.items[i];
    p.loss = place(specs[i].loss_bytes);
    p.grad_logits = place(specs[i].grad_logits_bytes);
    p.grad_targets = place(specs[i].grad_targets_bytes);
  }
  plan.sums = place(any_sums ? sizeof(double) * static_cast<size_t>(plan.total_blocks) : 0);
  plan.total = off;
  return plan;
}

// ---- Pinned chunk pipeline -------------------------------------------------------------------

// One chunk of a request: elements [begin, begin + count), whose reduction blocks are blocks
// first_block .. of the whole request.
struct Chunk {
  int64_t begin = 0;
  int64_t count = 0;
  int64_t first_block = 0;
};

// Elements per chunk when one element moves `bytes_per_element` bytes through a staging buffer
// of `buffer_bytes`: the most whole reduction blocks that fit, at least one block.
inline int64_t ChunkElementsFor(size_t bytes_per_element, size_t buffer_bytes) {
  const size_t per = std::max<size_t>(bytes_per_element, 1);
  const int64_t blocks = static_cast<int64_t>(buffer_bytes / per) / kReduceBlock;
  return std::max<int64_t>(blocks, 1) * kReduceBlock;
}

// Splits numel elements into chunks of chunk_elements (a positive multiple of kReduceBlock;
// the last chunk may be shorter). numel 0 gives no chunk.
inline std::vector<Chunk> PlanChunks(int64_t numel, int64_t chunk_elements) {
  std::vector<Chunk> chunks;
  if (numel <= 0 || chunk_elements <= 0 || chunk_elements % kReduceBlock != 0) return chunks;
  chunks.reserve(static_cast<size_t>((numel + chunk_elements - 1) / chunk_elements));
  for (int64_t begin = 0; begin < numel; begin += chunk_elements) {
    Chunk c;
    c.begin = begin;
    c.count = std::min(chunk_elements, numel - begin);
    c.first_block = begin / kReduceBlock;
    chunks.push_back(c);
  }
  return chunks;
}

}  // namespace lossd::kernels::cuda

#endif  // LOSSD_KERNELS_CUDA_SEGMENT_PLAN_H_
