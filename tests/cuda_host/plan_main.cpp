// Prints the multi-tensor launch plan (csrc/cuda/multi_tensor_plan.h) of the sizes given on stdin
// ("cap n size...") as lines "first count chunk_base chunks", then the reduce kinds of a few norm
// types. Built with the host compiler alone by tests/test_cuda_build.py.
#include <cstdio>
#include <limits>
#include <vector>

#include "cuda/multi_tensor_plan.h"

int main() {
  using namespace fusedstab::cuda::mt;
  int cap, n;
  if (std::scanf("%d %d", &cap, &n) != 2) return 1;
  std::vector<long long> sizes(n);
  for (auto& s : sizes) std::scanf("%lld", &s);
  std::vector<int64_t> numel(sizes.begin(), sizes.end());
  for (const Launch& l : plan(numel.data(), n, cap))
    std::printf("%d %d %lld %lld\n", l.first, l.count, (long long)l.chunk_base, (long long)l.chunks);
  std::printf("total %lld\n", (long long)total_chunks(numel.data(), n));
  const double inf = std::numeric_limits<double>::infinity();
  std::printf("kinds %d %d %d %d %d %d\n", reduce_kind(2.0), reduce_kind(1.0), reduce_kind(0.0), reduce_kind(inf),
              reduce_kind(-inf), reduce_kind(3.5));
  return 0;
}
