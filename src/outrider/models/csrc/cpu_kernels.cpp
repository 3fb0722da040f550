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

// An attention task is up to kMaxQ queries, (row, head) pairs that read the same kv head: each key
// and value row it loads serves all of them, and their value sums run as independent chains (one
// query alone waits on its own fmadd latency). Per query the arithmetic is fixed (see group_task),
// so how queries are grouped into tasks never changes a bit.
constexpr int kMaxQ = 6;

// The dot products of one query (CH 32-wide bf16 chunks) with 16 keys (rows of kb, hd apart), keys
// past `n` or outside `vis` left out: per key, vdpbf16ps over the chunks in order, then sum16.
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

// Value sums of Q queries over the keys [0, common) they all see, in increasing position: o[q] +=
// p[q][j] * v[j], each value row converted to float32 once for all Q; the sums are left in obuf
// (Q x CH 16-lane vectors) for each query's own remaining keys.
template <int CH, int Q>
static inline void value_common(const uint16_t* vb, int64_t hd, const float* const* p, int64_t common,
                                __mmask16 last, float* obuf) {
  __m512 o[Q][CH];
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < CH; ++c) o[q][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < common; ++j) {
    __m512 v[CH];
    for (int c = 0; c < CH; ++c) v[c] = load16(vb + j * hd + c * 16, c == CH - 1 ? last : __mmask16(0xFFFF));
    for (int q = 0; q < Q; ++q) {
      const __m512 pq = _mm512_set1_ps(p[q][j]);
      for (int c = 0; c < CH; ++c) o[q][c] = _mm512_fmadd_ps(pq, v[c], o[q][c]);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(obuf + (q * CH + c) * 16, o[q][c]);
}

// value_common one 16-lane chunk at a time (head sizes other than 64 and 128): chunk c of query q
// at obuf[(q * chunks + c) * 16].
template <int Q>
static inline void value_common_chunks(const uint16_t* vb, int64_t hd, int64_t chunks, const float* const* p,
                                       int64_t common, __mmask16 last, float* obuf) {
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask16 cm = c == chunks - 1 ? last : __mmask16(0xFFFF);
    __m512 o[Q];
    for (int q = 0; q < Q; ++q) o[q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < common; ++j) {
      const __m512 v = load16(vb + j * hd + c * 16, cm);
      for (int q = 0; q < Q; ++q) o[q] = _mm512_fmadd_ps(_mm512_set1_ps(p[q][j]), v, o[q]);
    }
    for (int q = 0; q < Q; ++q) _mm512_storeu_ps(obuf + (q * chunks + c) * 16, o[q]);
  }
}

template <int Q>
static inline void value_common_any(const uint16_t* vb, int64_t hd, int64_t chunks, const float* const* p,
                                    int64_t common, __mmask16 last, float* obuf) {
  if (chunks == 4) return value_common<4, Q>(vb, hd, p, common, last, obuf);
  if constexpr (Q <= 3) {  // 8 chunks: 3 queries' accumulators fill the registers (attend_shape)
    if (chunks == 8) return value_common<8, Q>(vb, hd, p, common, last, obuf);
  }
  value_common_chunks<Q>(vb, hd, chunks, p, common, last, obuf);
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

// What every row of one attention call shares. A task holds rb rows x hc heads of one kv head's
// group (hparts tasks cover a group).
struct AttendShape {
  int64_t heads, qheads, hd, C, group, kv_heads, chunks, chunks32, hc, hparts, rb;
  __mmask16 last;
  __mmask32 last32;
  float scale;
};

inline int64_t attend_tasks(const AttendRow& r, const AttendShape& s) {
  return (r.n + s.rb - 1) / s.rb * s.kv_heads * s.hparts;
}

// Room one thread needs for a task's queries.
struct TaskBuffers {
  std::vector<float> score;  // kMaxQ x stride: a query's visible keys' scores, in increasing position
  std::vector<int32_t> pos;  // kMaxQ x stride: those keys' positions
  std::vector<float> obuf;   // kMaxQ x chunks x 16: value sums
  int64_t stride;
  TaskBuffers(int64_t max_end, int64_t chunks)
      : score(kMaxQ * (max_end + 16)), pos(kMaxQ * (max_end + 16)), obuf(kMaxQ * chunks * 16), stride(max_end + 16) {}
};

// Task t of a row. Per query (row i, head h) the arithmetic is fixed, whatever the task holds and
// whether the row has a mask: its visible keys (positions <= start + i, or where mask[i] is set)
// are scored 16 positions at a time by scores16 and kept in increasing position; softmax over
// them in 16-lane chunks of that order; value sums fmadd them in that order, then one multiply by
// 1 / total. A token's output is therefore the same bits in a one-token step, a causal verify, a
// tree verify (where its ancestors, after keep_path, are the keys its path has) and a prefill.
__attribute__((always_inline)) static inline void group_task(const AttendRow& row, const AttendShape& s, int64_t t,
                                                             TaskBuffers& b) {
  const int64_t n = row.n, start = row.start, end = start + n, hd = s.hd, stride = b.stride;
  const int64_t per = s.kv_heads * s.hparts, blocks = (n + s.rb - 1) / s.rb;
  // Row blocks alternate from both ends (0, last, 1, last - 1, ...): a causal block's work grows
  // with its rows, and each thread's contiguous share of tasks then holds short and long ones.
  const int64_t u = t / per, rem = t % per;
  const int64_t blk = u % 2 ? blocks - 1 - u / 2 : u / 2;
  const int64_t kvh = rem / s.hparts, h0 = kvh * s.group + rem % s.hparts * s.hc;
  const int64_t h1 = std::min(h0 + s.hc, (kvh + 1) * s.group);
  const int64_t i0 = blk * s.rb, i1 = std::min(i0 + s.rb, n);
  const uint16_t* kb = row.k + kvh * s.C * hd;
  const uint16_t* vb = row.v + kvh * s.C * hd;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int nq = 0;
  int64_t common = end, seen[kMaxQ];
  const float* p[kMaxQ];
  uint16_t* out[kMaxQ];
  __m512 inv[kMaxQ];
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t h = h0; h < h1; ++h, ++nq) {
      const bool* mrow = row.mask ? row.mask + i * end : nullptr;
      const int64_t kend = row.mask ? end : start + i + 1;  // keys that may be visible: [0, kend)
      float* sc = b.score.data() + nq * stride;
      int32_t* ps = b.pos.data() + nq * stride;
      out[nq] = row.out + i * s.heads * hd + h * hd;
      p[nq] = sc;
      __m512bh qb[8];
      const uint16_t* qv = row.q + (i * s.qheads + h) * hd;
      for (int64_t c = 0; c < s.chunks32; ++c)
        qb[c] = load32bh(qv + c * 32, c == s.chunks32 - 1 ? s.last32 : __mmask32(0xFFFFFFFFu));
      int64_t m = 0, lead = -1;  // lead: the first key this query does not see
      for (int64_t j0 = 0; j0 < kend; j0 += 16) {
        const int64_t jn = std::min<int64_t>(16, kend - j0);
        const __mmask16 all = tail16(jn);
        __mmask16 vis = all;
        if (mrow) vis = _mm_mask_cmpneq_epi8_mask(all, _mm_maskz_loadu_epi8(all, mrow + j0), _mm_setzero_si128());
        if (vis != all && lead < 0) lead = j0 + __builtin_ctz(~uint32_t(vis));
        if (!vis) continue;
        const __m512 sums = _mm512_mul_ps(scores16_any(qb, s.chunks32, kb + j0 * hd, hd, jn, vis, s.last32),
                                          _mm512_set1_ps(s.scale));
        const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j0)), iota);
        if (vis == all) {  // every key of the block: stored as it is (lanes past jn are overwritten later)
          _mm512_storeu_ps(sc + m, sums);
          _mm512_storeu_si512(ps + m, at);
        } else {
          _mm512_storeu_ps(sc + m, _mm512_maskz_compress_ps(vis, sums));
          _mm512_storeu_si512(ps + m, _mm512_maskz_compress_epi32(vis, at));
        }
        m += __builtin_popcount(vis);
      }
      common = std::min(common, lead < 0 ? kend : lead);  // keys below `lead` sit at their own index
      seen[nq] = m;
      // Softmax over the visible keys: the largest score, then exp and the total in 16-lane chunks.
      __m512 top16 = _mm512_set1_ps(-INFINITY);
      for (int64_t s0 = 0; s0 < m; s0 += 16)
        top16 = _mm512_max_ps(top16, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail16(m - s0), sc + s0));
      const float top = _mm512_reduce_max_ps(top16);
      __m512 total = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < m; s0 += 16) {
        const __mmask16 msk = tail16(m - s0);
        const __m512 e = _mm512_maskz_mov_ps(msk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(msk, sc + s0), _mm512_set1_ps(top))));
        total = _mm512_add_ps(total, e);
        _mm512_mask_storeu_ps(sc + s0, msk, e);
      }
      inv[nq] = _mm512_set1_ps(m ? 1.f / _mm512_reduce_add_ps(total) : 0.f);
    }
  // Value sums: the keys every query sees together, then each query's own remaining ones.
  float* obuf = b.obuf.data();
  switch (nq) {
    case 1: value_common_any<1>(vb, hd, s.chunks, p, common, s.last, obuf); break;
    case 2: value_common_any<2>(vb, hd, s.chunks, p, common, s.last, obuf); break;
    case 3: value_common_any<3>(vb, hd, s.chunks, p, common, s.last, obuf); break;
    case 4: value_common_any<4>(vb, hd, s.chunks, p, common, s.last, obuf); break;
    case 5: value_common_any<5>(vb, hd, s.chunks, p, common, s.last, obuf); break;
    default: value_common_any<6>(vb, hd, s.chunks, p, common, s.last, obuf); break;
  }
  for (int q = 0; q < nq; ++q) {
    __m512 o[16];
    for (int64_t c = 0; c < s.chunks; ++c) o[c] = _mm512_loadu_ps(obuf + (q * s.chunks + c) * 16);
    const float* sc = p[q];
    const int32_t* ps = b.pos.data() + q * stride;
    for (int64_t k = common; k < seen[q]; ++k) {
      const __m512 pk = _mm512_set1_ps(sc[k]);
      const uint16_t* vv = vb + int64_t(ps[k]) * hd;
      for (int64_t c = 0; c < s.chunks; ++c)
        o[c] = _mm512_fmadd_ps(pk, load16(vv + c * 16, c == s.chunks - 1 ? s.last : __mmask16(0xFFFF)), o[c]);
    }
    for (int64_t c = 0; c < s.chunks; ++c)
      _mm256_mask_storeu_epi16(out[q] + c * 16, c == s.chunks - 1 ? s.last : __mmask16(0xFFFF),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[c], inv[q])));
  }
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
    work += tasks * end * std::min(rows[r].n, s.rb) * s.hc;
  }
  const int64_t total = first.back();
  if (total == 0) return;
  // A decode step's few tasks over a short cache are ~1 us each: run them inline; split across
  // threads only when the work (keys x queries) is large.
  const int64_t grain = std::max<int64_t>(1, total * 8192 / std::max<int64_t>(work, 1));
  at::parallel_for(0, total, grain, [&](int64_t t0, int64_t t1) {
    TaskBuffers b(max_end, s.chunks);
    size_t r = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[r + 1]) ++r;
      group_task(rows[r], s, t - first[r], b);
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
  s.kv_heads = kv_heads;
  s.group = heads / kv_heads;
  s.chunks = (hd + 15) / 16;
  s.chunks32 = (hd + 31) / 32;
  // Queries per task: as many as the value sums' accumulators fit in registers (32 zmm).
  const int64_t qmax = s.chunks == 8 ? 3 : kMaxQ;
  s.hc = std::min(s.group, qmax);
  s.hparts = (s.group + s.hc - 1) / s.hc;
  s.rb = std::max<int64_t>(1, qmax / s.hc);
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
