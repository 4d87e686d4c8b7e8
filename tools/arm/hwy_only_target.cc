// A small shared library that tools/arm/test_arm.sh preloads (LD_PRELOAD) into the aarch64 test
// binaries under qemu, so that one Highway target runs without any change to the binaries.
//
// LOSSD_HWY_TARGET=NAME (NEON, SVE, SVE2, SVE_256, SVE2_128): before main, every other target
// is disabled with hwy::DisableTargets, so HWY_DYNAMIC_DISPATCH can choose only NAME. The
// emulated CPU (qemu -cpu) must support NAME; when it does not, Highway falls back to its
// baseline (NEON), which the reported name then shows. At exit the library prints the target
// that Highway's dispatch chose in this process ("hwy dispatch target: NAME") to stderr.
// Without LOSSD_HWY_TARGET it does nothing.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "hwy/highway.h"
#include "hwy/targets.h"

namespace {

bool g_active = false;

// The best of `targets` among those this file was compiled for (the same set as the kernels:
// same compiler and flags), as HWY_DYNAMIC_DISPATCH chooses it.
int64_t BestCompiled(int64_t targets) {
  const int64_t usable = targets & HWY_TARGETS;
  if (usable == 0) return HWY_STATIC_TARGET;
  return usable & -usable;  // lowest bit = best target
}

__attribute__((constructor)) void OnlyTarget() {
  const char* want = std::getenv("LOSSD_HWY_TARGET");
  if (want == nullptr || *want == '\0') return;
  int64_t found = 0;
  for (int64_t rest = HWY_TARGETS; rest != 0; rest &= rest - 1) {
    const int64_t bit = rest & -rest;
    if (std::strcmp(hwy::TargetName(bit), want) == 0) found = bit;
  }
  if (found == 0) {
    std::fprintf(stderr, "hwy_only_target: %s is not a target of this build; compiled:", want);
    for (int64_t rest = HWY_TARGETS; rest != 0; rest &= rest - 1) {
      std::fprintf(stderr, " %s", hwy::TargetName(rest & -rest));
    }
    std::fprintf(stderr, "\n");
    std::_Exit(2);
  }
  hwy::DisableTargets(~found);
  g_active = true;
}

__attribute__((destructor)) void ReportTarget() {
  if (!g_active) return;
  std::fprintf(stderr, "hwy dispatch target: %s\n",
               hwy::TargetName(BestCompiled(hwy::SupportedTargets())));
}

}  // namespace
