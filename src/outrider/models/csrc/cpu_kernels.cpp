// bf16 kernels for the native backend's CPU decode path (AVX512-BF16), built on first use by
// models/kernels.py. Every output row is computed by the same instruction sequence whatever the
// number of rows, so a verify forward of n tokens gives each token bit for bit what a one-token
// step gives it: bf16 speculative output then equals bf16 autoregressive output.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;


void check_bf16(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == dim && t.is_contiguous(),
              name, " must be a contiguous ", dim, "-d bfloat16 CPU tensor");
}

inline __mmask16 tail16(int64_t left) {  // the lanes of a 16-wide chunk with `left` elements to go
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 load16(const uint16_t* p, __mmask16 m) {  // 16 bf16 -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __mmask32 tail32(int64_t left) {  // the lanes of a 32-wide chunk with `left` elements to go
  return left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
}

inline __m512bh load32bh(const uint16_t* p, __mmask32 m) {  // 32 bf16 as they are
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

inline __m512 round_bf16(__m512 v) {  // v rounded to bf16 (nearest even) and back to float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// out = x + y over n bf16 elements, each sum rounded once to bf16 (torch's bf16 add).
inline void add_span(const uint16_t* x, const uint16_t* y, uint16_t* out, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail16(n - k);
    _mm256_mask_storeu_epi16(out + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(load16(x + k, m), load16(y + k, m))));
  }
}

// One row of transformers' LlamaRMSNorm in bf16: h = bf16(x * rsqrt(mean(x^2) + eps)) in float32,
// then bf16(weight * h).
inline void rms_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t K, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail16(K - k);
    const __m512 v = load16(x + k, m);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(K) + eps));
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail16(K - k);
    const __m512 h = round_bf16(_mm512_mul_ps(load16(x + k, m), r));
    _mm256_mask_storeu_epi16(out + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load16(w + k, m), h)));
  }
}

// Rows in parallel only when there are many (a prefill): a decode step's one row stays inline.
constexpr int64_t kRowGrain = 16;

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  check_bf16(x, "x", 2);
  check_bf16(w, "weight", 1);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.size(0) == K, "x has ", K, " columns but the weight has ", w.size(0));
  Tensor out = at::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rms_row(xp + m * K, wp, op + m * K, K, float(eps));
  });
  return out;
}

// x + y (bf16, rounded once, like torch's add) and its rms_norm: the residual add and the next
// norm in one pass. Returns (sum, normed).
std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& w, double eps) {
  check_bf16(x, "x", 2);
  check_bf16(y, "y", 2);
  check_bf16(w, "weight", 1);
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y differ in shape");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.size(0) == K, "x has ", K, " columns but the weight has ", w.size(0));
  Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* sp = reinterpret_cast<uint16_t*>(sum.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      add_span(xp + m * K, yp + m * K, sp + m * K, K);
      rms_row(sp + m * K, wp, op + m * K, K, float(eps));
    }
  });
  return {sum, out};
}

// exp(x) for float32 lanes: Cephes' range reduction (x = n ln2 + r) and degree-6 polynomial, ~1 ulp.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// gate_up (M, 2F) = [gate | up] -> bf16(bf16(silu(gate)) * up), rounded as F.silu(gate) * up is.
Tensor silu_mul(const Tensor& gu) {
  check_bf16(gu, "gate_up", 2);
  const int64_t M = gu.size(0), F2 = gu.size(1), F = F2 / 2;
  TORCH_CHECK(F2 % 2 == 0, "gate_up needs an even number of columns, got ", F2);
  Tensor out = at::empty({M, F}, gu.options());
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(gu.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* g = gp + m * F2;
      for (int64_t f = 0; f < F; f += 16) {
        const __mmask16 msk = tail16(F - f);
        const __m512 a = load16(g + f, msk);
        const __m512 silu = round_bf16(_mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a)))));
        _mm256_mask_storeu_epi16(op + m * F + f, msk, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, load16(g + F + f, msk))));
      }
    }
  });
  return out;
}

// RoPE on the first `heads` heads of each row of qkv (N, >= heads * hd): out (N, heads, hd) =
// x * cos + roll(x, hd / 2) * sin per head, cos and sin (N, 1, hd) with rotate_half's sign folded
// into sin (llama.py's rope_tables), each product and the sum rounded to bf16 as torch rounds them.
Tensor rope(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t heads) {
  check_bf16(qkv, "qkv", 2);
  check_bf16(cos, "cos", 3);
  check_bf16(sin, "sin", 3);
  const int64_t N = qkv.size(0), hd = cos.size(2), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && qkv.size(1) >= heads * hd && cos.size(0) == N && sin.sizes() == cos.sizes(),
              "rope: qkv (N, >= heads * hd) and cos, sin (N, 1, hd) disagree");
  Tensor out = at::empty({N, heads, hd}, qkv.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(qkv.data_ptr());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sin.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t row = qkv.size(1);
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* c = cp + n * hd;
      const uint16_t* s = sp + n * hd;
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* x = xp + n * row + h * hd;
        uint16_t* o = op + (n * heads + h) * hd;
        for (int64_t i = 0; i < hd; i += 16) {
          const int64_t left = hd - i;
          const __mmask16 msk = tail16(left);
          // roll by hd/2: element i reads x[(i + half) % hd]; a 16-lane chunk never straddles
          // the halves when half is a multiple of 16, else it is read lane by lane.
          __m512 rolled;
          if (half % 16 == 0) {
            rolled = load16(x + (i + half) % hd, msk);
          } else {
            alignas(64) uint16_t tmp[16] = {0};
            for (int64_t j = 0; j < 16 && i + j < hd; ++j) tmp[j] = x[(i + j + half) % hd];
            rolled = load16(tmp, msk);
          }
          const __m512 a = round_bf16(_mm512_mul_ps(load16(x + i, msk), load16(c + i, msk)));
          const __m512 b = round_bf16(_mm512_mul_ps(rolled, load16(s + i, msk)));
          _mm256_mask_storeu_epi16(o + i, msk, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a, b)));
        }
      }
    }
  });
  return out;
}

// Lane m of the result: the sum of the 16 lanes of a[m] (a is overwritten), by a fixed tree: pairs
// of lanes 2 apart, then 1 apart within each 128-bit quarter, then across quarters.
static inline __m512 sum16(__m512* a) {
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    a[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x88), _mm512_shuffle_f32x4(a[0], a[1], 0xDD));
}

// Rows of one head attend in blocks of up to kRows where no mask is given (causal_task below).
constexpr int64_t kRows = 4;

// Rows r < rn of a causal block: out[r] = inv[r] * sum over keys j < vis[r] of p[r][j] * v[j], chunks
// 16-lane chunks per row held in registers.
template <int CH, int ROWS>
static inline void value_sums(const uint16_t* vb, const float* p, int64_t stride, const int64_t* vis, int64_t rn,
                              int64_t hd, __mmask16 last, const __m512* inv, uint16_t* out, int64_t out_stride) {
  // p[r][j] is 0 past row r's keys (and for rows past rn): adding 0 * v leaves a sum's bits as they are.
  __m512 o[ROWS][CH];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < CH; ++c) o[r][c] = _mm512_setzero_ps();
  const int64_t maxend = vis[rn - 1];
  for (int64_t j = 0; j < maxend; ++j) {
    __m512 v[CH];
    for (int c = 0; c < CH; ++c) v[c] = load16(vb + j * hd + c * 16, c == CH - 1 ? last : __mmask16(0xFFFF));
    for (int r = 0; r < ROWS; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * stride + j]);
      for (int c = 0; c < CH; ++c) o[r][c] = _mm512_fmadd_ps(pr, v[c], o[r][c]);
    }
  }
  for (int64_t r = 0; r < rn; ++r)
    for (int c = 0; c < CH; ++c)
      _mm256_mask_storeu_epi16(out + r * out_stride + c * 16, c == CH - 1 ? last : __mmask16(0xFFFF),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], inv[r])));
}

// The dot products of one query (CH 32-wide bf16 chunks) with 16 keys (rows of kb, hd apart), keys
// past `n` left out: per key, vdpbf16ps over the chunks in order, then sum16. Both attention paths
// score with it, so a (row, key) score is the same bits on either path.
template <int CH>
static inline __m512 scores16(const __m512bh* q, const uint16_t* kb, int64_t hd, int64_t n, uint32_t vis,
                              __mmask32 last) {
  __m512 acc[16];
  for (int jj = 0; jj < 16; ++jj) {
    acc[jj] = _mm512_setzero_ps();
    if (jj >= n || !(vis >> jj & 1u)) continue;
    for (int c = 0; c < CH; ++c)
      acc[jj] = _mm512_dpbf16_ps(acc[jj], q[c], load32bh(kb + jj * hd + c * 32, c == CH - 1 ? last : __mmask32(0xFFFFFFFFu)));
  }
  return sum16(acc);
}

static inline __m512 scores16_any(const __m512bh* q, int64_t chunks, const uint16_t* kb, int64_t hd, int64_t n,
                                  uint32_t vis, __mmask32 last) {
  switch (chunks) {
    case 1: return scores16<1>(q, kb, hd, n, vis, last);
    case 2: return scores16<2>(q, kb, hd, n, vis, last);
    case 3: return scores16<3>(q, kb, hd, n, vis, last);
    case 4: return scores16<4>(q, kb, hd, n, vis, last);
    case 5: return scores16<5>(q, kb, hd, n, vis, last);
    case 6: return scores16<6>(q, kb, hd, n, vis, last);
    case 7: return scores16<7>(q, kb, hd, n, vis, last);
    default: return scores16<8>(q, kb, hd, n, vis, last);
  }
}

// value_sums for one 16-lane chunk (head sizes other than 64 and 128).
static inline void value_sums_chunk(const uint16_t* vb, const float* p, int64_t stride, const int64_t* vis, int64_t rn,
                                    int64_t hd, __mmask16 cm, const __m512* inv, uint16_t* out, int64_t out_stride) {
  __m512 o[kRows];
  for (int r = 0; r < kRows; ++r) o[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < vis[rn - 1]; ++j) {
    const __m512 v = load16(vb + j * hd, cm);
    for (int64_t r = 0; r < rn; ++r)
      if (j < vis[r]) o[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * stride + j]), v, o[r]);
  }
  for (int64_t r = 0; r < rn; ++r)
    _mm256_mask_storeu_epi16(out + r * out_stride, cm, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r], inv[r])));
}

// One sequence's part of an attention call: its query rows, its cache, where its output goes.
struct AttendRow {
  const uint16_t* q;  // (n, qheads, hd): the first `heads` heads of each row are the queries
  const uint16_t* k;  // the sequence's caches (kv_heads, C, hd)
  const uint16_t* v;
  uint16_t* out;      // (n, heads * hd)
  const bool* mask;   // (n, start + n) or nullptr: row i sees positions [0, start + i]
  int64_t n, start;
};

// What every row of one attention call shares.
struct AttendShape {
  int64_t heads, qheads, hd, C, group, chunks, chunks32;
  __mmask16 last;
  __mmask32 last32;
  float scale;
};

// Tasks of one row: (block of kRows rows, head) without a mask, (row, head) with one.
inline int64_t attend_tasks(const AttendRow& r, const AttendShape& s) {
  return r.mask ? r.n * s.heads : (r.n + kRows - 1) / kRows * s.heads;
}

// Task t of a row without a mask: rows [i0, i0 + rn) of one head share each key and value row,
// converted to float32 once per block of 16 keys, and their value sums run as independent chains;
// per (row, key) the arithmetic is the masked task's below, in the same order (scores by 16-key
// blocks and sum16, softmax over 16-lane chunks of the visible keys, value sums in increasing
// position), so a token's output is the same bits on either path and at any n. score: room for
// kRows * (start + n + 16) floats.
__attribute__((always_inline)) static inline void causal_task(const AttendRow& row, const AttendShape s, int64_t t, float* score) {
  const int64_t n = row.n, start = row.start, end = start + n, heads = s.heads, hd = s.hd;
  const int64_t blocks = (n + kRows - 1) / kRows;
  // Blocks alternate from both ends (0, last, 1, last - 1, ...): a causal block's work grows
  // with its rows, and each thread's contiguous share of tasks then holds short and long ones.
  const int64_t u = t / heads, h = t % heads, kvh = h / s.group;
  const int64_t b = u % 2 ? blocks - 1 - u / 2 : u / 2;
  const int64_t i0 = b * kRows, rn = std::min(kRows, n - i0);
  const uint16_t* kb = row.k + kvh * s.C * hd;
  const uint16_t* vb = row.v + kvh * s.C * hd;
  const int64_t stride = end + 16;  // a row's scores, padded to whole 16-key blocks
  int64_t vis[kRows];
  __m512bh qb[kRows][8];
  for (int64_t r = 0; r < rn; ++r) {
    vis[r] = start + i0 + r + 1;
    const uint16_t* qv = row.q + ((i0 + r) * s.qheads + h) * hd;
    for (int64_t c = 0; c < s.chunks32; ++c)
      qb[r][c] = load32bh(qv + c * 32, c == s.chunks32 - 1 ? s.last32 : __mmask32(0xFFFFFFFFu));
  }
  const int64_t maxend = vis[rn - 1];
  for (int64_t j0 = 0; j0 < maxend; j0 += 16)
    for (int64_t r = 0; r < rn; ++r) {
      const int64_t lim = std::min<int64_t>(16, vis[r] - j0);  // the row's keys in this block
      if (lim <= 0) continue;
      const __m512 sums = scores16_any(qb[r], s.chunks32, kb + j0 * hd, hd, lim, 0xFFFFu, s.last32);
      _mm512_storeu_ps(score + r * stride + j0, _mm512_mul_ps(sums, _mm512_set1_ps(s.scale)));
    }
  __m512 inv[kRows];
  for (int64_t r = 0; r < rn; ++r) {
    float* sc = score + r * stride;
    float top = -INFINITY;
    for (int64_t j = 0; j < vis[r]; ++j) top = std::max(top, sc[j]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < vis[r]; s0 += 16) {
      const __mmask16 msk = tail16(vis[r] - s0);
      const __m512 e = _mm512_maskz_mov_ps(msk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(msk, sc + s0), _mm512_set1_ps(top))));
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(sc + s0, msk, e);
    }
    inv[r] = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    std::fill(sc + vis[r], sc + maxend, 0.f);
  }
  for (int64_t r = rn; r < kRows; ++r) std::fill(score + r * stride, score + r * stride + maxend, 0.f);
  // Value sums: keys in increasing position, each value row read once for the block's rows.
  uint16_t* ob = row.out + i0 * heads * hd + h * hd;
  // One row (a decode step) sums alone; a block's rows share each value row.
  if (s.chunks == 4 && rn == 1) {
    value_sums<4, 1>(vb, score, stride, vis, rn, hd, s.last, inv, ob, heads * hd);
  } else if (s.chunks == 4) {
    value_sums<4, kRows>(vb, score, stride, vis, rn, hd, s.last, inv, ob, heads * hd);
  } else if (s.chunks == 8 && rn == 1) {
    value_sums<8, 1>(vb, score, stride, vis, rn, hd, s.last, inv, ob, heads * hd);
  } else if (s.chunks == 8) {
    value_sums<8, kRows>(vb, score, stride, vis, rn, hd, s.last, inv, ob, heads * hd);
  } else {
    for (int64_t c = 0; c < s.chunks; ++c)
      value_sums_chunk(vb + c * 16, score, stride, vis, rn, hd, c == s.chunks - 1 ? s.last : __mmask16(0xFFFF),
                       inv, ob + c * 16, heads * hd);
  }
}

// Task t of a row with a mask: one (row, head), its visible keys gathered in increasing position.
// score, pos: room for start + n entries.
__attribute__((always_inline)) static inline void masked_task(const AttendRow& row, const AttendShape s, int64_t t, float* score, int32_t* pos) {
  const int64_t end = row.start + row.n, heads = s.heads, hd = s.hd, chunks = s.chunks;
  const int64_t i = t / heads, h = t % heads, kvh = h / s.group;
  const bool* mp = row.mask;
  const uint16_t* qv = row.q + (i * s.qheads + h) * hd;
  const uint16_t* kb = row.k + kvh * s.C * hd;
  const uint16_t* vb = row.v + kvh * s.C * hd;
  __m512bh qb[8];
  for (int64_t c = 0; c < s.chunks32; ++c)
    qb[c] = load32bh(qv + c * 32, c == s.chunks32 - 1 ? s.last32 : __mmask32(0xFFFFFFFFu));
  int64_t seen = 0;
  float top = -INFINITY;
  // Scores 16 keys at a time (scores16: one transposing sum for the 16 dot products), as
  // causal_task does; keys the mask hides are left out of the block.
  for (int64_t j0 = 0; j0 < end; j0 += 16) {
    const int64_t jn = std::min<int64_t>(16, end - j0);
    uint32_t vis = 0;
    for (int64_t jj = 0; jj < jn; ++jj)
      if (mp[i * end + j0 + jj]) vis |= 1u << jj;
    if (!vis) continue;
    const __m512 sums = scores16_any(qb, s.chunks32, kb + j0 * hd, hd, jn, vis, s.last32);
    alignas(64) float sc[16];
    _mm512_store_ps(sc, _mm512_mul_ps(sums, _mm512_set1_ps(s.scale)));
    for (int64_t jj = 0; jj < jn; ++jj) {
      if (!(vis >> jj & 1u)) continue;
      score[seen] = sc[jj];
      pos[seen++] = int32_t(j0 + jj);
      top = std::max(top, sc[jj]);
    }
  }
  __m512 o[16];
  for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_setzero_ps();
  __m512 total = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < seen; s0 += 16) {
    const __mmask16 msk = tail16(seen - s0);
    const __m512 e = _mm512_maskz_mov_ps(msk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(msk, score + s0),
                                                                 _mm512_set1_ps(top))));
    total = _mm512_add_ps(total, e);
    _mm512_mask_storeu_ps(score + s0, msk, e);
  }
  for (int64_t j = 0; j < seen; ++j) {
    const __m512 p = _mm512_set1_ps(score[j]);
    const uint16_t* vv = vb + int64_t(pos[j]) * hd;
    for (int64_t c = 0; c < chunks; ++c)
      o[c] = _mm512_fmadd_ps(p, load16(vv + c * 16, c == chunks - 1 ? s.last : __mmask16(0xFFFF)), o[c]);
  }
  const __m512 inv = _mm512_set1_ps(seen ? 1.f / _mm512_reduce_add_ps(total) : 0.f);
  uint16_t* ov = row.out + i * heads * hd + h * hd;
  for (int64_t c = 0; c < chunks; ++c)
    _mm256_mask_storeu_epi16(ov + c * 16, c == chunks - 1 ? s.last : __mmask16(0xFFFF),
                             (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[c], inv)));
}

// Every task of every row in one parallel loop (a batch's rows split across the threads together,
// not one parallel region per row). A task's arithmetic does not depend on which thread runs it.
static void attend_rows_run(const std::vector<AttendRow>& rows, const AttendShape& s) {
  std::vector<int64_t> first(rows.size() + 1, 0);
  int64_t max_end = 1, work = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const int64_t tasks = attend_tasks(rows[r], s), end = rows[r].start + rows[r].n;
    first[r + 1] = first[r] + tasks;
    max_end = std::max(max_end, end);
    work += tasks * end * (rows[r].mask ? 1 : std::min(rows[r].n, kRows));
  }
  const int64_t total = first.back();
  if (total == 0) return;
  // A decode step's 9-30 tasks over a short cache are ~1 us each: run them inline; split across
  // threads only when the work (keys x rows) is large.
  const int64_t grain = std::max<int64_t>(1, total * 8192 / std::max<int64_t>(work, 1));
  at::parallel_for(0, total, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(kRows * (max_end + 16));
    std::vector<int32_t> pos(max_end);
    size_t r = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[r + 1]) ++r;
      if (rows[r].mask)
        masked_task(rows[r], s, t - first[r], score.data(), pos.data());
      else
        causal_task(rows[r], s, t - first[r], score.data());
    }
  });
}

static AttendShape attend_shape(int64_t heads, int64_t qheads, int64_t hd, int64_t kv_heads, int64_t C) {
  TORCH_CHECK(hd <= 256, "attend: head_dim must be at most 256; got ", hd);
  AttendShape s;
  s.heads = heads;
  s.qheads = qheads;
  s.hd = hd;
  s.C = C;
  s.group = heads / kv_heads;
  s.chunks = (hd + 15) / 16;
  s.chunks32 = (hd + 31) / 32;
  // The last 16-lane (32-lane) chunk of a head is masked where hd is not a multiple of 16 (32).
  s.last = tail16(hd - (s.chunks - 1) * 16);
  s.last32 = tail32(hd - (s.chunks32 - 1) * 32);
  s.scale = 1.f / std::sqrt(float(hd));
  return s;
}

static const bool* checked_mask(const c10::optional<Tensor>& mask, int64_t n, int64_t end) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 && mask->size(0) == n
              && mask->size(1) == end, "attend: mask must be a contiguous (n, start + n) bool tensor");
  return mask->data_ptr<bool>();
}

// Attention of n new tokens over one sequence's cache, for decode and verify steps: q (n, >= heads,
// hd) (the first `heads` heads of each row are the queries), k and v caches (kv_heads, C, hd),
// query head h reading kv head h / (heads / kv_heads). Row i sees the cache positions mask[i, j]
// allows (mask (n, end) bool), or without a mask j <= start + i. Scores and softmax in float32.
// Each (row, head) visits exactly its visible keys in increasing position, whatever n is: a token
// gets bit for bit the same output in a verify forward as in a one-token step (SDPA's GEMMs do
// not promise that), and a tree node's ancestors are the keys its path has after keep_path.
Tensor attend(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t start, int64_t heads,
              const c10::optional<Tensor>& mask) {
  check_bf16(q, "q", 3);
  check_bf16(k_cache, "k_cache", 3);
  check_bf16(v_cache, "v_cache", 3);
  const int64_t n = q.size(0), qheads = q.size(1), hd = q.size(2);
  const int64_t kv_heads = k_cache.size(0), C = k_cache.size(1), end = start + n;
  TORCH_CHECK(qheads >= heads && heads % kv_heads == 0 && k_cache.size(2) == hd && v_cache.sizes() == k_cache.sizes()
              && end <= C, "attend: q (n, >= heads, hd) and the caches (kv_heads, C, hd) disagree");
  const AttendShape s = attend_shape(heads, qheads, hd, kv_heads, C);
  Tensor out = at::empty({n, heads * hd}, q.options());
  attend_rows_run({AttendRow{reinterpret_cast<const uint16_t*>(q.data_ptr()),
                             reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
                             reinterpret_cast<const uint16_t*>(v_cache.data_ptr()),
                             reinterpret_cast<uint16_t*>(out.data_ptr()), checked_mask(mask, n, end), n, start}},
                  s);
  return out;
}

// ---- linear: y = x W^T (+ b) for the few rows of a decode, verify or tree step --------------------
// W is packed once (kernels.pack_linear) into groups of OUTRIDER_GROUP (G) output columns, laid
// out (N / G, K / 2, G / 16, 16, 2) and zero-padded: for each pair of inputs, a group's G columns
// are G / 16 vectors of 16 (column, pair) products side by side, so a group streams as one
// sequential run of memory (which the hardware prefetchers follow near full speed) and each weight
// vector loaded serves every input row (vdpbf16ps against the row's input pair broadcast). Output
// (m, n) is one float32 lane summing its K / 2 pair products in order, then its bias, rounded once
// to bf16: the same instructions whatever M is, so a row's outputs are bit for bit the same in a
// verify forward of n rows as in a one-row step (oneDNN's packed matmul changes its K blocking from
// 8 rows on).

constexpr int kVecs = OUTRIDER_GROUP / 16;  // vectors of 16 output columns per packed group
constexpr int64_t kGroup = OUTRIDER_GROUP;
constexpr int kRowTile = 8;  // kernels.py's LINEAR_GROUP of 32 gives 2 x 8 = 16 accumulators

template <int MB>
inline void linear_tile(const uint16_t* x, int64_t K, const uint16_t* w, const __m512* bias, uint16_t* y,
                        int64_t N, __mmask16 last_mask, int nvec) {
  __m512 acc[MB][kVecs];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 2; ++p, w += kGroup * 2) {
    __m512bh wv[kVecs];
    for (int j = 0; j < kVecs; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * 32) + OUTRIDER_PF, _MM_HINT_T0);
      wv[j] = (__m512bh)_mm512_loadu_si512(w + j * 32);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + i * K + 2 * p));
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < nvec; ++j) {
      const __m512 v = bias ? _mm512_add_ps(acc[i][j], bias[j]) : acc[i][j];
      _mm256_mask_storeu_epi16(y + i * N + j * 16, j == nvec - 1 ? last_mask : __mmask16(0xFFFF),
                               (__m256i)_mm512_cvtneps_pbh(v));
    }
}

Tensor linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias, int64_t N) {
  check_bf16(x, "x", 2);
  check_bf16(w, "packed weight", 5);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0 && w.size(1) == K / 2 && w.size(0) == (N + kGroup - 1) / kGroup && w.size(2) == kVecs
              && w.size(3) == 16 && w.size(4) == 2,
              "linear: the packed weight (", w.sizes(), ") does not hold ", N, " rows of ", K, " columns");
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    check_bf16(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == N, "linear: the bias has ", bias->size(0), " entries for ", N, " outputs");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  Tensor y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t groups = w.size(0), group_elems = K * kGroup;
  // Each thread streams a contiguous band of groups, at least 64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, 32768 / group_elems);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g * kGroup, cols = std::min<int64_t>(kGroup, N - n);
      const int nvec = int((cols + 15) / 16);
      const int64_t tail = cols - (nvec - 1) * 16;
      const __mmask16 last = tail16(tail);
      __m512 bv[kVecs];
      if (bp)
        for (int j = 0; j < nvec; ++j)
          bv[j] = load16(bp + n + j * 16, j == nvec - 1 ? last : __mmask16(0xFFFF));
      const uint16_t* wg = wp + g * group_elems;
      const __m512* bb = bp ? bv : nullptr;
      int64_t m = 0;
      // Rows in tiles of up to kRowTile: a tile's rows share each weight load (2 x 8 = 16 float32
      // accumulators), each row's sums stay its own.
      for (; m + kRowTile <= M; m += kRowTile) linear_tile<kRowTile>(xp + m * K, K, wg, bb, yp + m * N + n, N, last, nvec);
      const uint16_t* xt = xp + m * K;
      uint16_t* yt = yp + m * N + n;
      switch (M - m) {
        case 7: linear_tile<7>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 6: linear_tile<6>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 5: linear_tile<5>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 4: linear_tile<4>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 3: linear_tile<3>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 2: linear_tile<2>(xt, K, wg, bb, yt, N, last, nvec); break;
        case 1: linear_tile<1>(xt, K, wg, bb, yt, N, last, nvec); break;
        default: break;
      }
    }
  });
  return y;
}


// x + y in bf16, each sum rounded once (torch's bf16 add).
Tensor add_bf16(const Tensor& x, const Tensor& y) {
  check_bf16(x, "x", 2);
  check_bf16(y, "y", 2);
  TORCH_CHECK(x.sizes() == y.sizes(), "add: x and y differ in shape");
  Tensor out = at::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  add_span(xp, yp, op, x.numel());
  return out;
}

// ---- one decoder layer for the rows of one sequence, in one call ---------------------------------
// The native backend's layer (llama.py's _layers) as one op: the same kernels in the same order, so
// its output is bit for bit the Python loop's, without ~15 dispatches and slices per layer (~1 ms of
// a ~10 ms SmolLM2 step). Writes the rows' keys and values at [start, start + n) of the caches.
// The layer's rows after attention: output projection, residual, MLP, residual.
static Tensor layer_tail(const Tensor& x, const Tensor& y, const Tensor& wo, const c10::optional<Tensor>& bo, int64_t n_o,
                         const Tensor& mlp_norm, const Tensor& wgu, const c10::optional<Tensor>& bgu, int64_t n_gu,
                         const Tensor& wdown, const c10::optional<Tensor>& bdown, int64_t n_down, double eps) {
  auto [sum, h] = add_rms_norm(x, linear(y, wo, bo, n_o), mlp_norm, eps);
  const Tensor d = linear(silu_mul(linear(h, wgu, bgu, n_gu)), wdown, bdown, n_down);
  return add_bf16(sum, d);
}

// Rows [row0, row0 + n) of qkv's keys and values written at [start, start + n) of one sequence's
// caches kc, vc (kv_heads, C, hd).
static void store_kv(const Tensor& qk, const Tensor& qkv, int64_t row0, int64_t n, uint16_t* kc, uint16_t* vc,
                     int64_t C, int64_t start, int64_t heads, int64_t kv_heads, int64_t hd) {
  const uint16_t* qkp = reinterpret_cast<const uint16_t*>(qk.data_ptr());
  const uint16_t* qkvp = reinterpret_cast<const uint16_t*>(qkv.data_ptr());
  const int64_t n_qkv = qkv.size(1);
  for (int64_t i = row0; i < row0 + n; ++i)
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(kc + (g * C + start + i - row0) * hd, qkp + (i * (heads + kv_heads) + heads + g) * hd, hd * 2);
      std::memcpy(vc + (g * C + start + i - row0) * hd, qkvp + i * n_qkv + (heads + kv_heads + g) * hd, hd * 2);
    }
}

Tensor decoder_layer(const Tensor& x, const Tensor& attn_norm, const Tensor& wqkv, const c10::optional<Tensor>& bqkv,
                     int64_t n_qkv, const Tensor& wo, const c10::optional<Tensor>& bo, int64_t n_o,
                     const Tensor& mlp_norm, const Tensor& wgu, const c10::optional<Tensor>& bgu, int64_t n_gu,
                     const Tensor& wdown, const c10::optional<Tensor>& bdown, int64_t n_down, const Tensor& k_cache,
                     const Tensor& v_cache, const Tensor& cos, const Tensor& sin, int64_t start, int64_t heads,
                     const c10::optional<Tensor>& mask, double eps) {
  const int64_t n = x.size(0), kv_heads = k_cache.size(0), hd = k_cache.size(2);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && start + n <= k_cache.size(1)
              && n_qkv == (heads + 2 * kv_heads) * hd, "decoder_layer: the caches and q/k/v sizes disagree");
  const Tensor qkv = linear(rms_norm(x, attn_norm, eps), wqkv, bqkv, n_qkv);  // (n, (H + 2 Hkv) hd)
  const Tensor qk = rope(qkv, cos, sin, heads + kv_heads);  // (n, H + Hkv, hd)
  store_kv(qk, qkv, 0, n, reinterpret_cast<uint16_t*>(k_cache.data_ptr()), reinterpret_cast<uint16_t*>(v_cache.data_ptr()),
           k_cache.size(1), start, heads, kv_heads, hd);
  const Tensor y = attend(qk, k_cache, v_cache, start, heads, mask);
  return layer_tail(x, y, wo, bo, n_o, mlp_norm, wgu, bgu, n_gu, wdown, bdown, n_down, eps);
}

// decoder_layer for several sequences' rows in one call (a batch step): x (N, D) holds each
// sequence's n[r] new tokens one after another; sequence r's caches are slot slots[r] of k_all,
// v_all (slots, kv_heads, C, hd), its tokens written at [starts[r], starts[r] + n[r]), its rows
// attending as decoder_layer's would (masks[r] or causal). The matmuls read the weights once for
// all rows and every (row, head) attention task runs in one parallel loop: the same bits as one
// decoder_layer call per sequence, without a Python loop over the sequences in every layer.
Tensor decoder_layer_rows(const Tensor& x, const Tensor& attn_norm, const Tensor& wqkv, const c10::optional<Tensor>& bqkv,
                          int64_t n_qkv, const Tensor& wo, const c10::optional<Tensor>& bo, int64_t n_o,
                          const Tensor& mlp_norm, const Tensor& wgu, const c10::optional<Tensor>& bgu, int64_t n_gu,
                          const Tensor& wdown, const c10::optional<Tensor>& bdown, int64_t n_down, const Tensor& k_all,
                          const Tensor& v_all, const Tensor& cos, const Tensor& sin, at::IntArrayRef slots,
                          at::IntArrayRef starts, at::IntArrayRef ns, const c10::List<c10::optional<Tensor>>& masks,
                          int64_t heads, double eps) {
  check_bf16(k_all, "k_all", 4);
  check_bf16(v_all, "v_all", 4);
  const int64_t R = int64_t(slots.size()), N = x.size(0);
  const int64_t kv_heads = k_all.size(1), C = k_all.size(2), hd = k_all.size(3);
  TORCH_CHECK(int64_t(starts.size()) == R && int64_t(ns.size()) == R && int64_t(masks.size()) == R
              && v_all.sizes() == k_all.sizes() && n_qkv == (heads + 2 * kv_heads) * hd,
              "decoder_layer_rows: the rows, caches and q/k/v sizes disagree");
  const Tensor qkv = linear(rms_norm(x, attn_norm, eps), wqkv, bqkv, n_qkv);
  const Tensor qk = rope(qkv, cos, sin, heads + kv_heads);
  const AttendShape s = attend_shape(heads, heads + kv_heads, hd, kv_heads, C);
  Tensor y = at::empty({N, heads * hd}, x.options());
  const int64_t slot_elems = kv_heads * C * hd;
  uint16_t* kp = reinterpret_cast<uint16_t*>(k_all.data_ptr());
  uint16_t* vp = reinterpret_cast<uint16_t*>(v_all.data_ptr());
  std::vector<AttendRow> rows;  // the masks' data stays held by `masks` for the call
  int64_t row0 = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t slot = slots[r], start = starts[r], n = ns[r];
    TORCH_CHECK(0 <= slot && slot < k_all.size(0) && n >= 1 && start >= 0 && start + n <= C && row0 + n <= N,
                "decoder_layer_rows: row ", r, " (slot ", slot, ", start ", start, ", ", n, " tokens) does not fit");
    uint16_t* kc = kp + slot * slot_elems;
    uint16_t* vc = vp + slot * slot_elems;
    store_kv(qk, qkv, row0, n, kc, vc, C, start, heads, kv_heads, hd);
    rows.push_back(AttendRow{reinterpret_cast<const uint16_t*>(qk.data_ptr()) + row0 * (heads + kv_heads) * hd, kc, vc,
                             reinterpret_cast<uint16_t*>(y.data_ptr()) + row0 * heads * hd,
                             checked_mask(masks.get(r), n, start + n), n, start});
    row0 += n;
  }
  TORCH_CHECK(row0 == N, "decoder_layer_rows: the rows hold ", row0, " tokens, x ", N);
  attend_rows_run(rows, s);
  return layer_tail(x, y, wo, bo, n_o, mlp_norm, wgu, bgu, n_gu, wdown, bdown, n_down, eps);
}

}  // namespace

TORCH_LIBRARY(outrider, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor qkv, Tensor cos, Tensor sin, int heads) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("decoder_layer(Tensor x, Tensor attn_norm, Tensor wqkv, Tensor? bqkv, int n_qkv, Tensor wo, Tensor? bo, "
        "int n_o, Tensor mlp_norm, Tensor wgu, Tensor? bgu, int n_gu, Tensor wdown, Tensor? bdown, int n_down, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, int start, int heads, Tensor? mask, "
        "float eps) -> Tensor");
  m.def("decoder_layer_rows(Tensor x, Tensor attn_norm, Tensor wqkv, Tensor? bqkv, int n_qkv, Tensor wo, Tensor? bo, "
        "int n_o, Tensor mlp_norm, Tensor wgu, Tensor? bgu, int n_gu, Tensor wdown, Tensor? bdown, int n_down, "
        "Tensor(a!) k_all, Tensor(b!) v_all, Tensor cos, Tensor sin, int[] slots, int[] starts, int[] ns, "
        "Tensor?[] masks, int heads, float eps) -> Tensor");
  m.def("attend(Tensor q, Tensor k_cache, Tensor v_cache, int start, int heads, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(outrider, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
  m.impl("attend", &attend);
  m.impl("decoder_layer", &decoder_layer);
  m.impl("decoder_layer_rows", &decoder_layer_rows);
  m.impl("linear", &linear);
}
