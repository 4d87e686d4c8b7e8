# Cross-compilation for 64-bit ARM Linux with Debian's cross toolchain and multiarch packages
# (g++-aarch64-linux-gnu; libhwy-dev:arm64, libabsl-dev:arm64 and libgtest-dev:arm64 install
# their libraries and CMake package files under /usr/lib/aarch64-linux-gnu). Binaries run under
# qemu-aarch64 (CMAKE_CROSSCOMPILING_EMULATOR), which gtest_discover_tests and ctest use.
# Used by `make test-arm` (tools/arm/test_arm.sh, docs/kernels.md section "ARM").
#
#   cmake -S . -B build-arm -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     -DLOSSD_KERNELS_ONLY=ON -DLOSSD_CUDA=OFF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(LOSSD_CROSS_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${LOSSD_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${LOSSD_CROSS_TRIPLE}-g++)
# GCC notes that the aarch64 argument passing of some std::pair types changed in GCC 10.1: an
# ABI remark about old binaries, none of which are linked here.
set(CMAKE_CXX_FLAGS_INIT -Wno-psabi)

# Debian multiarch: find_package looks in /usr/lib/aarch64-linux-gnu/cmake, never in the host's
# /usr/lib/x86_64-linux-gnu. Headers of the multiarch -dev packages are shared in /usr/include,
# which the cross compiler searches last.
set(CMAKE_LIBRARY_ARCHITECTURE ${LOSSD_CROSS_TRIPLE})

# Runs the test binaries (gtest discovery at build time, ctest) on an x86-64 host. No -L: the
# loader and every library come from the multiarch arm64 packages (/lib/ld-linux-aarch64.so.1,
# /usr/lib/aarch64-linux-gnu). With -L /usr/aarch64-linux-gnu the loader would be the cross
# toolchain's (libc6-arm64-cross) while libc.so.6 is found in /lib/aarch64-linux-gnu
# (libc6:arm64): two glibc builds in one process, and threaded programs hang in libc.
# QEMU_CPU in the environment selects the emulated CPU (default: qemu's "max").
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-${CMAKE_SYSTEM_PROCESSOR})
