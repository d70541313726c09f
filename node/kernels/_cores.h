// How many threads the kernels' parallel work uses: PyTorch's count (--threads), less the cores other
// programs keep busy right now. Included by _kernels.cpp inside its anonymous namespace.
//
// Why: a parallel region ends only when every thread of its team has reached its end, and a thread whose
// core another program holds waits for a time slice (milliseconds) before it even starts. The kernels
// hand out work in slices (parallel_slices), so the threads that run do all of it, but the region still
// waits for the one that does not. A volunteer's PC is never idle: on the 2-core Sapphire Rapids-class VM,
// with one core kept busy by another process, the bloom-1b7 shape decoded int8 at 450-530 ms/token on
// 2 threads and 161-168 on one (idle: 95-103 on 2 threads), each of a token's ~100 regions waiting
// ~3 ms; transformers, 4x its idle time. So every 0.5 s the kernels read how much CPU time the process's
// cores gave to other programs (/proc/stat for the CPUs it may run on, less its own time from
// getrusage) and use as many threads as cores stay free, at least one. One thread runs inline, with no
// region at all. A row's numbers do not depend on the thread count (tests/test_kernels.py), so nothing
// but speed changes. SLOWLLM_FREE_CORES=0 turns it off (all of PyTorch's threads, always).
#pragma once
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <string>

class FreeCores {
 public:
  // Threads for a parallel region now: at most `most` (PyTorch's count), at least 1.
  int threads(int most) {
    if (most <= 1 || !enabled_) return most;
    const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
    if (now - last_.load(std::memory_order_relaxed) >= kInterval) {
      std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);  // (one thread reads; the others go on)
      if (lock.owns_lock() && now - last_.load(std::memory_order_relaxed) >= kInterval) sample(now);
    }
    const int free = free_.load(std::memory_order_relaxed);
    return free > 0 ? std::min(most, free) : most;
  }

 private:
  static constexpr int64_t kInterval = 500'000'000;  // ns between readings
  // Others' load a core may carry and still count as free: more than 0.3 of a core costs a thread (0.7 of
  // one busy core: a region would wait for it that often), 0.2 does not.
  static constexpr double kSpare = 0.3;

  bool enabled_ = [] {
    const char* v = std::getenv("SLOWLLM_FREE_CORES");
    return !(v && std::string(v) == "0");
  }();
  std::mutex mutex_;
  std::atomic<int64_t> last_{0};  // steady clock, ns
  std::atomic<int> free_{0};  // 0: not measured yet
  bool have_ = false;
  double busy_ = 0, mine_ = 0, wall_ = 0;  // the last reading: seconds of CPU (all, ours), wall seconds

  void sample(int64_t now) {
    last_.store(now, std::memory_order_relaxed);
    int cores = 0;
    double busy = 0;
    if (!read_busy(busy, cores) || cores < 1) return;
    rusage self{};
    getrusage(RUSAGE_SELF, &self);
    const double mine = self.ru_utime.tv_sec + self.ru_utime.tv_usec * 1e-6 + self.ru_stime.tv_sec +
                        self.ru_stime.tv_usec * 1e-6;
    const double wall = now * 1e-9;
    if (have_ && wall > wall_) {
      const double others = std::max(0.0, ((busy - busy_) - (mine - mine_)) / (wall - wall_));
      free_.store(std::max(1, static_cast<int>(std::floor(cores - others + kSpare))), std::memory_order_relaxed);
    }
    busy_ = busy, mine_ = mine, wall_ = wall, have_ = true;
  }

  // Seconds of CPU time spent on the CPUs this process may run on (user, nice, system, irq, softirq, and
  // steal: time the hypervisor gave elsewhere), and how many of them there are.
  static bool read_busy(double& busy, int& cores) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return false;
    FILE* f = std::fopen("/proc/stat", "r");
    if (!f) return false;
    const double tick = 1.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
    char line[512];
    while (std::fgets(line, sizeof(line), f)) {
      int cpu;
      unsigned long long user, nice, system, idle, iowait, irq, softirq, steal;
      if (std::strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9') continue;
      if (std::sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &user, &nice, &system, &idle,
                      &iowait, &irq, &softirq, &steal) != 9 || cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed))
        continue;
      busy += (user + nice + system + irq + softirq + steal) * tick;
      ++cores;
    }
    std::fclose(f);
    return true;
  }
};

FreeCores g_free_cores;

// The threads a parallel region of the kernels uses now (FreeCores)
int kernel_threads() { return g_free_cores.threads(at::get_num_threads()); }
