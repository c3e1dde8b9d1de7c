// The host-side logic of the CUDA launchers, run on CPU: reads queries on stdin, prints answers.
// Built with the host compiler alone (no CUDA header) by tests/test_cuda_build.py.
//   plan CAP N size...          -> "first count chunk_base chunks" per launch, "total T"
//   kinds                       -> the reduce kinds of norm types 2, 1, 0, inf, -inf, 3.5
//   ln MAXG MAXTPR MINT N...    -> "N long tpr groups threads" per N  (csrc/cuda/launch_config.h)
//   blr PERSM SMS R L           -> "bx by tiles slices"
//   cn SMS N C S G              -> "KIND bx by rt ct J items grid" for each channel-norm plan, then
//                                  "ws gn_fwd gn_bwd bn_stats bn_bwd" (bytes, fp32 accumulation)
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/channel_norm_plan.h"
#include "cuda/launch_config.h"
#include "cuda/multi_tensor_plan.h"

using namespace fusedstab::cuda;

int main() {
  char cmd[16];
  while (std::scanf("%15s", cmd) == 1) {
    if (!std::strcmp(cmd, "plan")) {
      int cap, n;
      if (std::scanf("%d %d", &cap, &n) != 2) return 1;
      std::vector<int64_t> numel(n);
      for (auto& s : numel) {
        long long v;
        if (std::scanf("%lld", &v) != 1) return 1;
        s = v;
      }
      for (const mt::Launch& l : mt::plan(numel.data(), n, cap))
        std::printf("%d %d %lld %lld\n", l.first, l.count, (long long)l.chunk_base, (long long)l.chunks);
      std::printf("total %lld\n", (long long)mt::total_chunks(numel.data(), n));
    } else if (!std::strcmp(cmd, "kinds")) {
      const double inf = std::numeric_limits<double>::infinity();
      std::printf("kinds %d %d %d %d %d %d\n", mt::reduce_kind(2.0), mt::reduce_kind(1.0), mt::reduce_kind(0.0),
                  mt::reduce_kind(inf), mt::reduce_kind(-inf), mt::reduce_kind(3.5));
    } else if (!std::strcmp(cmd, "ln")) {
      int maxg, maxtpr, mint, n;
      if (std::scanf("%d %d %d %d", &maxg, &maxtpr, &mint, &n) != 4) return 1;
      for (int i = 0; i < n; ++i) {
        long long N;
        if (std::scanf("%lld", &N) != 1) return 1;
        const cfg::RowCfg c = cfg::row_config(N, maxg, maxtpr, mint);
        std::printf("%lld %d %d %d %d\n", N, int(c.long_rows), c.tpr, c.groups, c.threads);
      }
    } else if (!std::strcmp(cmd, "blr")) {
      int per_sm, sms;
      long long R, L;
      if (std::scanf("%d %d %lld %lld", &per_sm, &sms, &R, &L) != 4) return 1;
      const cfg::BlrGrid g = cfg::blr_grid(R, L, per_sm, sms);
      std::printf("%d %d %lld %lld\n", g.bx, g.by, (long long)g.tiles, (long long)g.slices);
    } else if (!std::strcmp(cmd, "cn")) {
      int sms;
      long long N, C, S, G;
      if (std::scanf("%d %lld %lld %lld %lld", &sms, &N, &C, &S, &G) != 5) return 1;
      auto show = [](const char* kind, const cn::Plan& p) {
        std::printf("%s %d %d %lld %lld %lld %lld %lld\n", kind, p.t.bx, p.t.by, (long long)p.rt, (long long)p.ct,
                    (long long)p.J, (long long)p.items, (long long)cn::grid_of(p));
      };
      for (int cl = 0; cl < 2; ++cl) {
        const char* sfx = cl ? "_cl" : "_nchw";
        std::string k;
        show((k = std::string("gn_stats") + sfx).c_str(), cn::gn_stats_plan(N, C, S, G, cl, sms));
        show((k = std::string("gn_bwd") + sfx).c_str(), cn::gn_bwd_plan(N, C, S, cl, sms));
        show((k = std::string("bn") + sfx).c_str(), cn::bn_plan(N, C, S, cl, sms));
        show((k = std::string("elem_gn") + sfx).c_str(), cn::elem_plan(N, C, S, cl, true, sms));
        show((k = std::string("elem_bn") + sfx).c_str(), cn::elem_plan(N, C, S, cl, false, sms));
        std::printf("ws%s %lld %lld %lld %lld\n", sfx, (long long)cn::gn_fwd_workspace(N, C, S, G, cl, sms),
                    (long long)cn::gn_bwd_workspace(N, C, S, G, cl, 4, sms),
                    (long long)cn::bn_stats_workspace(N, C, S, cl, sms), (long long)cn::bn_bwd_workspace(N, C, S, cl, 4, sms));
      }
    } else {
      return 2;
    }
  }
  return 0;
}
