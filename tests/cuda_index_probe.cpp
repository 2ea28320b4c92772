// The persistent kernels' step and index arithmetic (kernels/cuda/rnn_index.cuh) compiled as
// plain C++ and exported through a C ABI, for tests/test_cuda_index.py (ctypes).
//
// The schedules below walk the steps exactly as forward_body / backward_body in
// rnn_persistent.cu do, calling the same header functions, and record what the kernels would
// read and write; the Python test compares that with the float64 reference's loops.
#include "rnn_index.cuh"

using gpurnn::i64;

namespace {

int length_of(const long long* lengths, int b, int T) { return gpurnn::seq_len(lengths, b, T); }

struct Bounds {
  long long violations = 0;
  void check(i64 offset, i64 size) {
    if (offset < 0 || offset >= size) ++violations;
  }
};

}  // namespace

extern "C" {

// time[s]: the time forward step s handles; valid[s*B + b], row[s*B + b]: whether it is
// inside row b's sequence and the (T*B) row index the kernel reads xg at / writes y at.
void forward_schedule(int T, int B, int reverse, const long long* lengths, int* time, int* valid,
                      long long* row) {
  for (int s = 0; s < T; ++s) {
    const int t = gpurnn::forward_time(s, T, reverse);
    time[s] = t;
    for (int b = 0; b < B; ++b) {
      valid[s * B + b] = gpurnn::step_valid(t, length_of(lengths, b, T));
      row[s * B + b] = gpurnn::forward_row(t, b, B);
    }
  }
}

// For s in [0, T]: time[s] and source[s] (BackwardStep); for s < T and each row b:
// valid, cur and prev (BackwardRow) at [s*B + b].
void backward_schedule(int T, int B, int reverse, const long long* lengths, int* time,
                       int* source, int* valid, long long* cur, long long* prev) {
  for (int s = 0; s <= T; ++s) {
    const gpurnn::BackwardStep st = gpurnn::backward_step(s, T, reverse);
    time[s] = st.t;
    source[s] = st.source;
    if (s == T) break;
    for (int b = 0; b < B; ++b) {
      const gpurnn::BackwardRow r = gpurnn::backward_row(st.t, b, length_of(lengths, b, T), B,
                                                         reverse);
      valid[s * B + b] = r.valid;
      cur[s * B + b] = r.cur;
      prev[s * B + b] = r.prev;
    }
  }
}

// Every global access both kernels make for these sizes (G gates, F workspace fields, the
// first and last column of each field: offsets are affine in the column), checked against
// the size of its buffer. Exchange: rows = B padded to `group` rows, ldx = K padded to 16.
// Returns the number of accesses outside their buffer.
long long count_out_of_bounds(int T, int B, int H, int G, int F, int reverse,
                              const long long* lengths, int group) {
  using gpurnn::at;
  Bounds bounds;
  const i64 TB = static_cast<i64>(T) * B;
  const int cols[2] = {0, H - 1};
  const int rows = (B + group - 1) / group * group;
  // forward: xg (T, B, G*H) read, y (T, B, H) and workspace (T, B, F*H) written, h exchange
  const int ldx_f = (H + 15) / 16 * 16;
  for (int s = 0; s < T; ++s) {
    const int t = gpurnn::forward_time(s, T, reverse);
    for (int r0 = 0; r0 < rows; r0 += group)
      for (int r = 0; r < group; ++r)
        bounds.check(gpurnn::exchange_at(gpurnn::read_plane(s), r0 + r, ldx_f - 1, rows, ldx_f),
                     2LL * rows * ldx_f);
    for (int b = 0; b < B; ++b) {
      const i64 row = gpurnn::forward_row(t, b, B);
      const bool valid = gpurnn::step_valid(t, length_of(lengths, b, T));
      for (int j : cols) {
        if (valid)
          for (int g = 0; g < G; ++g) bounds.check(at(row, g * H + j, TB, G * H), TB * G * H);
        bounds.check(at(row, j, TB, H), TB * H);
        for (int f = 0; f < F; ++f) bounds.check(at(row, f * H + j, TB, F * H), TB * F * H);
        bounds.check(at(b, j, B, H), static_cast<i64>(B) * H);
        bounds.check(gpurnn::exchange_at(gpurnn::write_plane(s), b, j, rows, ldx_f),
                     2LL * rows * ldx_f);
      }
    }
  }
  // backward: workspace, y, dy read; dxg (T, B, G*H), dhn (T, B, H) written; dgates exchange
  const int ldx_b = (G * H + 15) / 16 * 16;
  for (int s = 0; s <= T; ++s) {
    const gpurnn::BackwardStep st = gpurnn::backward_step(s, T, reverse);
    for (int r0 = 0; r0 < rows; r0 += group)
      for (int r = 0; r < group; ++r)
        bounds.check(gpurnn::exchange_at(gpurnn::read_plane(s), r0 + r, ldx_b - 1, rows, ldx_b),
                     2LL * rows * ldx_b);
    if (s == T) break;
    for (int b = 0; b < B; ++b) {
      const gpurnn::BackwardRow r = gpurnn::backward_row(st.t, b, length_of(lengths, b, T), B,
                                                         reverse);
      for (int j : cols) {
        if (r.valid) {
          for (int f = 0; f < F; ++f) bounds.check(at(r.cur, f * H + j, TB, F * H), TB * F * H);
          if (r.prev >= 0) {
            bounds.check(at(r.prev, j, TB, H), TB * H);
            if (F > 0) bounds.check(at(r.prev, (F - 1) * H + j, TB, F * H), TB * F * H);
          }
          bounds.check(at(r.cur, j, TB, H), TB * H);  // y (RNN) and dy
        }
        for (int g = 0; g < G; ++g) {
          bounds.check(at(r.cur, g * H + j, TB, G * H), TB * G * H);
          bounds.check(gpurnn::exchange_at(gpurnn::write_plane(s), b, g * H + j, rows, ldx_b),
                       2LL * rows * ldx_b);
        }
        bounds.check(at(r.cur, j, TB, H), TB * H);  // dhn
      }
    }
  }
  return bounds.violations;
}

// One offset, as the kernels compute it (with GPURNN_DEBUG_BOUNDS: checked, trapping).
long long offset_at(long long row, int col, long long rows, int width) {
  return gpurnn::at(row, col, rows, width);
}

// ----------------------------------------------------------------- K-split layout, one call each
// (tests/test_ksplit_protocol.py runs its model of the K-split kernels on these)

static gpurnn::KSplit ksplit(int C, int U, int Gr, int KW) { return gpurnn::KSplit{C, U, Gr, KW}; }

int ks_rank_units(int C, int U, int Gr, int KW, int r) {
  return gpurnn::ksplit_rank_units(ksplit(C, U, Gr, KW), r);
}
int ks_unit_span(int C, int U, int Gr, int KW) {
  return gpurnn::ksplit_unit_span(ksplit(C, U, Gr, KW));
}
int ks_source(int C, int U, int Gr, int KW, int rank, int kgroup) {
  return gpurnn::ksplit_source(ksplit(C, U, Gr, KW), rank, kgroup);
}
// 1 and (rank, local) for a received row, 0 for a padding row
int ks_owner(int C, int U, int Gr, int KW, int m, int* rank, int* local) {
  return gpurnn::ksplit_owner(ksplit(C, U, Gr, KW), m, *rank, *local) ? 1 : 0;
}
int ks_unit(int C, int U, int Gr, int KW, int r, int lu) {
  return gpurnn::ksplit_unit(ksplit(C, U, Gr, KW), r, lu);
}
int ks_fill(int step, int group, int groups) { return gpurnn::ksplit_fill(step, group, groups); }
int ks_buffer(int fill) { return gpurnn::ksplit_buffer(fill); }
unsigned ks_parity(int fill) { return gpurnn::ksplit_parity(fill); }
long long ks_recv_at(int C, int U, int Gr, int KW, int buffer, int source, int local, int col,
                     int cols) {
  return gpurnn::ksplit_recv_at(ksplit(C, U, Gr, KW), buffer, source, local, col, cols);
}
unsigned ks_fill_bytes(int C, int U, int Gr, int KW, int r, int cols) {
  return gpurnn::ksplit_fill_bytes(ksplit(C, U, Gr, KW), r, cols);
}
long long ks_barrier_target(int step, int forward, int ctas) {
  return gpurnn::ksplit_barrier_target(step, forward, ctas);
}

// the step order and rows every kernel shares, one call each
int fwd_time(int s, int T, int reverse) { return gpurnn::forward_time(s, T, reverse); }
void bwd_step(int s, int T, int reverse, int* t, int* source) {
  const gpurnn::BackwardStep st = gpurnn::backward_step(s, T, reverse);
  *t = st.t, *source = st.source;
}
void bwd_row(int t, int b, int len, int B, int reverse, int* valid, long long* cur,
             long long* prev) {
  const gpurnn::BackwardRow r = gpurnn::backward_row(t, b, len, B, reverse);
  *valid = r.valid, *cur = r.cur, *prev = r.prev;
}
int read_plane(int step) { return gpurnn::read_plane(step); }
int write_plane(int step) { return gpurnn::write_plane(step); }
long long exchange_offset(int plane, int row, int k, int rows, int ldx) {
  return gpurnn::exchange_at(plane, row, k, rows, ldx);
}

}  // extern "C"
