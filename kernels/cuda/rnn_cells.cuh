// The four cells as the persistent skeleton (rnn_persistent.cu) sees them: what one hidden
// unit j of one batch row does with its gate pre-activations, forward and backward.
//
// Formulas, gate order and workspace fields are gpurnn/cells.py's (tests/test_cells.py parses
// kGates, kFields and the list below to check them against it). Workspace fields (fp32, field f
// of unit j at column f*H + j of a (T, B, kFields*H) tensor) match the torch backend's, so
// either backend's backward can read the other's forward:
//   LstmCell  i, f, g, o (activations), c (cell state after the step)
//   GruCell   r, z, n (activations), hn = W_hn h + b_hn
//   RnnCell   none: y already holds every h_t
#pragma once
#include "rnn_common.cuh"

// Forward inputs of one (batch row, unit): pre[g] = (W_hh h_{t-1})[g*H + j], x[g] = xg[t, b,
// g*H + j], h and c the unit's fp32 state before the step. Outputs: the new h, c and the
// workspace fields.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kFields = 5;
  static constexpr bool kHasCell = true;       // carries c; backward reads c_{t-1}
  static constexpr bool kBackwardReadsH = false;  // backward needs h_{t-1}

  static __device__ __forceinline__ void forward(const float (&pre)[4], const float (&x)[4],
                                                 float /*b_hn*/, float& h, float& c,
                                                 float (&ws)[5]) {
    const float i = sigmoidf_(pre[0] + x[0]);
    const float f = sigmoidf_(pre[1] + x[1]);
    const float g = tanhf_(pre[2] + x[2]);
    const float o = sigmoidf_(pre[3] + x[3]);
    c = f * c + i * g;
    h = o * tanhf_(c);
    ws[0] = i, ws[1] = f, ws[2] = g, ws[3] = o, ws[4] = c;
  }

  // dh: gradient reaching h_t (carry + W_hh term + dy); dc: carried gradient of c_t.
  // Returns dgates for xg (da) and for W_hh's output (dhid; equal here), and the carries
  // to step t-1: dh_carry (the part of dh_{t-1} that is not W_hh^T dhid) and dc.
  static __device__ __forceinline__ void backward(const float (&ws)[5], float /*h_prev*/,
                                                  float c_prev, float /*h_t*/, float dh,
                                                  float& dc, float (&da)[4], float (&dhid)[4],
                                                  float& dh_carry) {
    const float i = ws[0], f = ws[1], g = ws[2], o = ws[3], c = ws[4];
    const float tc = tanhf_(c);
    const float dct = dc + dh * o * (1.0f - tc * tc);
    da[0] = dct * g * i * (1.0f - i);
    da[1] = dct * c_prev * f * (1.0f - f);
    da[2] = dct * i * (1.0f - g * g);
    da[3] = dh * tc * o * (1.0f - o);
#pragma unroll
    for (int k = 0; k < 4; ++k) dhid[k] = da[k];
    dc = dct * f;
    dh_carry = 0.0f;
  }
};

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kFields = 4;
  static constexpr bool kHasCell = false;
  static constexpr bool kBackwardReadsH = true;  // dz = dh * (h_{t-1} - n) * z * (1 - z)

  static __device__ __forceinline__ void forward(const float (&pre)[3], const float (&x)[3],
                                                 float b_hn, float& h, float& /*c*/,
                                                 float (&ws)[4]) {
    const float r = sigmoidf_(pre[0] + x[0]);
    const float z = sigmoidf_(pre[1] + x[1]);
    const float hn = pre[2] + b_hn;
    const float n = tanhf_(x[2] + r * hn);
    h = (1.0f - z) * n + z * h;
    ws[0] = r, ws[1] = z, ws[2] = n, ws[3] = hn;
  }

  static __device__ __forceinline__ void backward(const float (&ws)[4], float h_prev,
                                                  float /*c_prev*/, float /*h_t*/, float dh,
                                                  float& /*dc*/, float (&da)[3],
                                                  float (&dhid)[3], float& dh_carry) {
    const float r = ws[0], z = ws[1], n = ws[2], hn = ws[3];
    const float da_n = dh * (1.0f - z) * (1.0f - n * n);
    da[0] = da_n * hn * r * (1.0f - r);
    da[1] = dh * (h_prev - n) * z * (1.0f - z);
    da[2] = da_n;
    dhid[0] = da[0], dhid[1] = da[1], dhid[2] = da_n * r;  // W_hn h sits inside r * (.)
    dh_carry = dh * z;
  }
};

template <bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kFields = 0;
  static constexpr bool kHasCell = false;
  static constexpr bool kBackwardReadsH = false;  // reads h_t (its own output) instead

  static __device__ __forceinline__ void forward(const float (&pre)[1], const float (&x)[1],
                                                 float /*b_hn*/, float& h, float& /*c*/,
                                                 float (& /*ws*/)[1]) {
    const float a = pre[0] + x[0];
    h = kRelu ? fmaxf(a, 0.0f) : tanhf_(a);
  }

  // h_t is the step's output as stored in y (what forward produced).
  static __device__ __forceinline__ void backward(const float (& /*ws*/)[1], float /*h_prev*/,
                                                  float /*c_prev*/, float h_t, float dh,
                                                  float& /*dc*/, float (&da)[1],
                                                  float (&dhid)[1], float& dh_carry) {
    da[0] = kRelu ? (h_t > 0.0f ? dh : 0.0f) : dh * (1.0f - h_t * h_t);
    dhid[0] = da[0];
    dh_carry = 0.0f;
  }
};

typedef RnnCell<false> RnnTanhCell;
typedef RnnCell<true> RnnReluCell;
