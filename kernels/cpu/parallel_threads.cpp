// How many threads at::parallel_for gives the native CPU ops (mplug_fast::parallel_threads).
//
// at::parallel_for is a header template: a library compiled without OpenMP runs it on the calling thread
// alone, whatever torch.set_num_threads says. This op runs one parallel_for of many small tasks and returns
// the number of distinct threads that ran them, so a build that lost its OpenMP flags shows up (in
// `mplug-fast info` and the tests) instead of silently running on one core.
#include "../ops.h"

#include <ATen/Parallel.h>

#include <atomic>

namespace mplug_fast {

int64_t parallel_threads() {
  std::atomic<int64_t> most{1};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t mine = static_cast<int64_t>(at::get_thread_num()) + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

}  // namespace mplug_fast
