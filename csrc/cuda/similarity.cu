// CUDA kernels of vocabsem_fast (see kernels.h for the contract of each launcher). Torch-free:
// compiled by nvcc alone. fp32 accumulation throughout; inputs fp32 / bf16 / fp16.
#include "similarity.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace vocabsem {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
  static constexpr float identity = 0.f;
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  static constexpr float identity = -INFINITY;
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Block-wide reduction, every thread gets the result. The leading barrier lets a block call it
// back to back (the shared slot of the previous call has been read by everyone).
template <typename Op>
__device__ float block_reduce(float v, Op op) {
  __shared__ float slots[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < warps ? slots[lane] : Op::identity, op);
    if (lane == 0) slots[0] = v;
  }
  __syncthreads();
  return slots[0];
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, Sum()); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, Max()); }
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, Max()); }

// NaN ranks above every number, as in torch.topk (a row of NaN scores still yields indices).
__device__ __forceinline__ bool ranks_above(float a, float b) { return (a != a && b == b) || a > b; }
__device__ __forceinline__ bool same_rank(float a, float b) { return a == b || (a != a && b != b); }

// (value, index) argmax across the block; ties go to the smaller index.
__device__ void block_argmax(float& value, int64_t& index) {
  __shared__ float values[32];
  __shared__ int64_t indices[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, value, offset);
    const int64_t i = __shfl_xor_sync(kFullMask, index, offset);
    if (ranks_above(v, value) || (same_rank(v, value) && i < index)) value = v, index = i;
  }
  __syncthreads();
  if (lane == 0) values[warp] = value, indices[warp] = index;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? values[lane] : -INFINITY;
    index = lane < warps ? indices[lane] : INT64_MAX;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float v = __shfl_xor_sync(kFullMask, value, offset);
      const int64_t i = __shfl_xor_sync(kFullMask, index, offset);
      if (ranks_above(v, value) || (same_rank(v, value) && i < index)) value = v, index = i;
    }
    if (lane == 0) values[0] = value, indices[0] = index;
  }
  __syncthreads();
  value = values[0];
  index = indices[0];
}

__device__ __forceinline__ float factor(const float* p, int64_t i) { return p ? p[i] : 1.f; }

// A raw score times its scales; a scale of 0 (an inverse norm whose norm overflowed) gives 0, as
// F.normalize does, even where the raw product overflowed (0 x inf would be NaN).
__device__ __forceinline__ float scaled(float raw, float s) { return s == 0.f ? 0.f : raw * s; }

// --- row norms and the normalisation backward ------------------------------------------------

template <typename T>
__global__ void row_inverse_norms_kernel(const T* x, int64_t d, int64_t ld, float eps, float* inv) {
  const int64_t r = blockIdx.x;
  const T* row = x + r * ld;
  float s = 0.f, infinite = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_float(row[j]);
    s += v * v;
    infinite += isinf(v) ? 1.f : 0.f;
  }
  s = block_sum(s);
  infinite = block_sum(infinite);
  // an infinite entry normalises the row to NaN; finite entries whose norm overflows, to 0
  if (threadIdx.x == 0) inv[r] = infinite > 0.f ? NAN : 1.f / fmaxf(sqrtf(s), eps);
}

template <typename T>
__global__ void normalization_backward_kernel(const T* x, const float* inv, const float* grad, int64_t d, int64_t ld,
                                              float eps, bool grad_times_inv, float* out) {
  const int64_t r = blockIdx.x;
  const T* row = x + r * ld;
  const float* g = grad + r * d;
  const float iv = inv[r];
  float dot = 0.f, sq = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_float(row[j]);
    sq += v * v;
    dot += v * iv * g[j];
  }
  dot = block_sum(dot);
  sq = block_sum(sq);
  const bool passes = sqrtf(sq) >= eps;  // where the eps clamp is active only g / eps remains
  const float factor = grad_times_inv ? 1.f : iv;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float y = to_float(row[j]) * iv;
    out[r * d + j] = factor * (g[j] - (passes ? y * dot : 0.f));
  }
}

// --- cross-entropy epilogues on fp32 score tiles -------------------------------------------------

__device__ __forceinline__ void split_range(int64_t cols, int64_t split, int64_t splits, int64_t& begin,
                                            int64_t& end) {
  const int64_t span = (cols + splits - 1) / splits;
  begin = split * span;
  end = begin + span < cols ? begin + span : cols;
}

__global__ void lse_partial_kernel(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                                   const float* row_inv, const float* col_inv, const int64_t* targets,
                                   float smoothing, float* partial) {
  const int64_t r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  int64_t begin, end;
  split_range(cols, split, splits, begin, end);
  const float* row = scores + r * ld;
  const float row_scale = scale * factor(row_inv, r);
  const int64_t target = targets[r];
  float local_max = -INFINITY, picked = 0.f, total = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const float z = scaled(row[j], row_scale * factor(col_inv, j));
    local_max = fmaxf(local_max, z);
    if (j == target) picked += z;
    total += z;
  }
  const float tile_max = block_max(local_max);
  const float shift = tile_max == -INFINITY ? 0.f : tile_max;
  float s = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    s += expf(scaled(row[j], row_scale * factor(col_inv, j)) - shift);
  }
  s = block_sum(s);
  picked = block_sum(picked);
  if (smoothing > 0.f) total = block_sum(total);
  if (threadIdx.x == 0) {
    const int64_t plane = splits * rows, at = split * rows + r;
    partial[at] = tile_max;
    partial[plane + at] = s;
    partial[2 * plane + at] = picked;
    partial[3 * plane + at] = smoothing > 0.f ? total : 0.f;
  }
}

__global__ void lse_finish_kernel(int64_t rows, int64_t splits, const float* partial, const int64_t* targets,
                                  int64_t ignore_index, float smoothing, int64_t vocab, float* lse, float* loss) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int64_t plane = splits * rows;
  float m = -INFINITY, picked = 0.f, total = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    m = fmaxf(m, partial[s * rows + r]);
    picked += partial[2 * plane + s * rows + r];
    total += partial[3 * plane + s * rows + r];
  }
  const float shift = m == -INFINITY ? 0.f : m;
  float sum = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const float part_max = partial[s * rows + r];
    if (part_max != -INFINITY) sum += partial[plane + s * rows + r] * expf(part_max - shift);
  }
  const float value = shift + logf(sum);
  lse[r] = value;
  float l = value - (1.f - smoothing) * picked;
  if (smoothing > 0.f) l -= smoothing * total / (float)vocab;
  loss[r] = targets[r] == ignore_index ? 0.f : l;
}

__global__ void softmax_grad_tile_kernel(float* scores, int64_t cols, int64_t ld, int64_t col0, float scale,
                                         const float* row_inv, const float* col_inv, const float* lse,
                                         const int64_t* targets, const float* weight, float smoothing, int64_t vocab,
                                         const float* col_mul) {
  const int64_t r = blockIdx.x;
  float* row = scores + r * ld;
  const float w = weight[r];
  const float row_scale = scale * factor(row_inv, r);
  const float l = lse[r];
  const int64_t target = targets[r];
  const float uniform = smoothing / (float)vocab;
  for (int64_t j = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; j < cols; j += (int64_t)gridDim.y * blockDim.x) {
    if (w == 0.f) {
      row[j] = 0.f;
      continue;
    }
    const float z = scaled(row[j], row_scale * factor(col_inv, j));
    float g = expf(z - l) - uniform - (col0 + j == target ? 1.f - smoothing : 0.f);
    row[j] = g * w * scale * factor(col_mul, j);
  }
}

// --- running top-k --------------------------------------------------------------------------------

__global__ void topk_partial_kernel(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                                    const float* row_inv, const float* col_inv, int k, float* values,
                                    int64_t* indices) {
  __shared__ float best[kMaxTopK];
  __shared__ int64_t best_index[kMaxTopK];
  const int64_t r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  int64_t begin, end;
  split_range(cols, split, splits, begin, end);
  const float* row = scores + r * ld;
  const float row_scale = scale * factor(row_inv, r);
  for (int i = threadIdx.x; i < k; i += blockDim.x) best[i] = -INFINITY, best_index[i] = -1;
  __syncthreads();
  // The range's best entries one round at a time, in the total order (value descending, NaN
  // first, ties by ascending index): each round takes the best entry that ranks after the
  // previous round's pick. Nothing is marked in the scores, so a taken entry cannot come back
  // (marking one -inf in the raw score came back as 0 where a scale factor was 0), and -inf
  // entries are taken like any other value.
  float last = NAN;
  int64_t last_index = -1;  // ranks before every entry: round 0 may take anything
  for (int round = 0; round < k; ++round) {
    float value = -INFINITY;
    int64_t index = INT64_MAX;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const float z = scaled(row[j], row_scale * factor(col_inv, j));
      const bool after_last = ranks_above(last, z) || (same_rank(last, z) && j > last_index);
      if (after_last && (ranks_above(z, value) || (same_rank(z, value) && j < index))) value = z, index = j;
    }
    block_argmax(value, index);
    if (index == INT64_MAX) break;  // the range is exhausted (the same in every thread)
    if (threadIdx.x == 0) best[round] = value, best_index[round] = index;
    last = value, last_index = index;
  }
  __syncthreads();
  const int64_t out = (split * rows + r) * k;
  for (int i = threadIdx.x; i < k; i += blockDim.x) values[out + i] = best[i], indices[out + i] = best_index[i];
}

// --- batched soft assignment (one warp per point) --------------------------------------------

constexpr int kWarpsPerBlock = 4;
constexpr int kSlots = kMaxSoftAssignK / 32;  // centroid scores held per lane

template <typename T>
__device__ void point_scores(const T* x, const T* centroids, int64_t k, int64_t d, float point_scale,
                             const float* inv_c, int lane, float (&mine)[kSlots]) {
  for (int s = 0; s < kSlots; ++s) mine[s] = -INFINITY;
  for (int64_t c = 0; c < k; ++c) {
    const T* centroid = centroids + c * d;
    float dot = 0.f;
    for (int64_t j = lane; j < d; j += 32) dot += to_float(x[j]) * to_float(centroid[j]);
    dot = scaled(warp_sum(dot), point_scale * factor(inv_c, c));
    if (c % 32 == lane) mine[c / 32] = dot;
  }
}

template <typename T>
__global__ void soft_assign_forward_kernel(const T* points, const T* centroids, int64_t n, int64_t k, int64_t d,
                                           int64_t total, const float* inv_p, const float* inv_c, float scale,
                                           float* probs) {
  const int lane = threadIdx.x & 31;
  const int64_t p = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5);
  if (p >= total) return;  // whole warps exit together: only warp-level collectives below
  const int64_t b = p / n;
  float mine[kSlots];
  point_scores(points + p * d, centroids + b * k * d, k, d, scale * factor(inv_p, p),
               inv_c ? inv_c + b * k : nullptr, lane, mine);
  float m = -INFINITY;
  for (int s = 0; s < kSlots; ++s) m = fmaxf(m, mine[s]);
  m = warp_max(m);
  float e[kSlots], sum = 0.f;
  for (int s = 0; s < kSlots; ++s) sum += (e[s] = expf(mine[s] - m));
  sum = warp_sum(sum);
  for (int s = 0; s < kSlots; ++s) {
    const int64_t c = s * 32 + lane;
    if (c < k) probs[p * k + c] = e[s] / sum;
  }
}

template <typename T>
__global__ void soft_assign_backward_kernel(const T* points, const T* centroids, int64_t n, int64_t k, int64_t d,
                                            int64_t total, const float* inv_p, const float* inv_c, float scale,
                                            const float* probs, const float* grad, float* grad_points,
                                            float* grad_centroids) {
  const int lane = threadIdx.x & 31;
  const int64_t p = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5);
  if (p >= total) return;
  const int64_t b = p / n;
  // d(scores) = probs * (grad - sum(grad * probs)) * scale, per centroid slot of this lane
  float gs[kSlots], inner = 0.f;
  for (int s = 0; s < kSlots; ++s) {
    const int64_t c = s * 32 + lane;
    gs[s] = c < k ? probs[p * k + c] : 0.f;
    inner += c < k ? gs[s] * grad[p * k + c] : 0.f;
  }
  inner = warp_sum(inner);
  for (int s = 0; s < kSlots; ++s) {
    const int64_t c = s * 32 + lane;
    gs[s] = c < k ? gs[s] * (grad[p * k + c] - inner) * scale : 0.f;
  }
  const T* x = points + p * d;
  const float ip = factor(inv_p, p);
  const T* cb = centroids + b * k * d;
  const float* inv_cb = inv_c ? inv_c + b * k : nullptr;
  float* gp = grad_points + p * d;
  for (int64_t j = lane; j < d; j += 32) gp[j] = 0.f;
  // one centroid at a time (a uniform loop, so every lane joins each shuffle): each lane owns
  // its columns of the point's gradient, the centroids' gradient needs atomics across points
  for (int64_t c = 0; c < k; ++c) {
    const float g = __shfl_sync(kFullMask, gs[c / 32], (int)(c % 32));
    if (g == 0.f) continue;
    const float gc = g * factor(inv_cb, c);
    const float gx = g * ip;
    for (int64_t j = lane; j < d; j += 32) {
      gp[j] += gc * to_float(cb[c * d + j]);
      atomicAdd(grad_centroids + (b * k + c) * d + j, gx * to_float(x[j]));
    }
  }
}

template <typename T>
__global__ void centroid_sums_kernel(const T* points, int64_t d, const int64_t* labels, float* sums,
                                     float* counts) {
  const int64_t i = blockIdx.x;
  const int64_t label = labels[i];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) atomicAdd(sums + label * d + j, to_float(points[i * d + j]));
  if (threadIdx.x == 0) atomicAdd(counts + label, 1.f);
}

// --- dispatch ------------------------------------------------------------------------------------

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: Launch<float>::run(args...); break;
    case DType::kBFloat16: Launch<__nv_bfloat16>::run(args...); break;
    case DType::kFloat16: Launch<__half>::run(args...); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

unsigned column_blocks(int64_t cols) {
  const int64_t blocks = (cols + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks));
}

template <typename T>
struct LaunchRowInverseNorms {
  static void run(const void* x, int64_t rows, int64_t d, int64_t ld, float eps, float* inv, cudaStream_t stream) {
    row_inverse_norms_kernel<T><<<(unsigned)rows, kThreads, 0, stream>>>(static_cast<const T*>(x), d, ld, eps, inv);
  }
};

template <typename T>
struct LaunchNormalizationBackward {
  static void run(const void* x, const float* inv, const float* grad, int64_t rows, int64_t d, int64_t ld, float eps,
                  bool grad_times_inv, float* out, cudaStream_t stream) {
    normalization_backward_kernel<T><<<(unsigned)rows, kThreads, 0, stream>>>(static_cast<const T*>(x), inv, grad, d,
                                                                             ld, eps, grad_times_inv, out);
  }
};

template <typename T>
struct LaunchSoftAssignForward {
  static void run(const void* points, const void* centroids, int64_t batch, int64_t n, int64_t k, int64_t d,
                  const float* inv_p, const float* inv_c, float scale, float* probs, cudaStream_t stream) {
    const int64_t total = batch * n;
    const unsigned blocks = (unsigned)((total + kWarpsPerBlock - 1) / kWarpsPerBlock);
    soft_assign_forward_kernel<T><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(points), static_cast<const T*>(centroids), n, k, d, total, inv_p, inv_c, scale, probs);
  }
};

template <typename T>
struct LaunchSoftAssignBackward {
  static void run(const void* points, const void* centroids, int64_t batch, int64_t n, int64_t k, int64_t d,
                  const float* inv_p, const float* inv_c, float scale, const float* probs, const float* grad,
                  float* grad_points, float* grad_centroids, cudaStream_t stream) {
    const int64_t total = batch * n;
    const unsigned blocks = (unsigned)((total + kWarpsPerBlock - 1) / kWarpsPerBlock);
    soft_assign_backward_kernel<T><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(points), static_cast<const T*>(centroids), n, k, d, total, inv_p, inv_c, scale, probs,
        grad, grad_points, grad_centroids);
  }
};

template <typename T>
struct LaunchCentroidSums {
  static void run(const void* points, int64_t n, int64_t d, const int64_t* labels, float* sums, float* counts,
                  cudaStream_t stream) {
    centroid_sums_kernel<T><<<(unsigned)n, kThreads, 0, stream>>>(static_cast<const T*>(points), d, labels, sums,
                                                                  counts);
  }
};

}  // namespace

cudaError_t row_inverse_norms(const void* x, DType dtype, int64_t rows, int64_t d, int64_t ld, float eps, float* inv,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch<LaunchRowInverseNorms>(dtype, x, rows, d, ld, eps, inv, stream);
}

cudaError_t normalization_backward(const void* x, DType dtype, const float* inv, const float* grad, int64_t rows,
                                   int64_t d, int64_t ld, float eps, bool grad_times_inv, float* out,
                                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch<LaunchNormalizationBackward>(dtype, x, inv, grad, rows, d, ld, eps, grad_times_inv, out, stream);
}

cudaError_t lse_partial(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                        const float* row_inv, const float* col_inv, const int64_t* targets, float smoothing,
                        int64_t splits, float* partial, cudaStream_t stream) {
  if (splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const dim3 grid((unsigned)rows, (unsigned)splits);
  lse_partial_kernel<<<grid, kThreads, 0, stream>>>(scores, rows, cols, ld, scale, row_inv, col_inv, targets,
                                                    smoothing, partial);
  return cudaGetLastError();
}

cudaError_t lse_finish(int64_t rows, int64_t splits, const float* partial, const int64_t* targets,
                       int64_t ignore_index, float smoothing, int64_t vocab, float* lse, float* loss,
                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = (unsigned)((rows + kThreads - 1) / kThreads);
  lse_finish_kernel<<<blocks, kThreads, 0, stream>>>(rows, splits, partial, targets, ignore_index, smoothing, vocab,
                                                     lse, loss);
  return cudaGetLastError();
}

cudaError_t softmax_grad_tile(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t col0, float scale,
                              const float* row_inv, const float* col_inv, const float* lse, const int64_t* targets,
                              const float* weight, float smoothing, int64_t vocab, const float* col_mul,
                              cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 grid((unsigned)rows, column_blocks(cols));
  softmax_grad_tile_kernel<<<grid, kThreads, 0, stream>>>(scores, cols, ld, col0, scale, row_inv, col_inv, lse,
                                                          targets, weight, smoothing, vocab, col_mul);
  return cudaGetLastError();
}

cudaError_t topk_partial(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                         const float* row_inv, const float* col_inv, int64_t k, int64_t splits, float* values,
                         int64_t* indices, cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const dim3 grid((unsigned)rows, (unsigned)splits);
  topk_partial_kernel<<<grid, 128, 0, stream>>>(scores, rows, cols, ld, scale, row_inv, col_inv, (int)k, values,
                                                indices);
  return cudaGetLastError();
}

cudaError_t soft_assign_forward(const void* points, const void* centroids, DType dtype, int64_t batch, int64_t n,
                                int64_t k, int64_t d, const float* inv_points, const float* inv_centroids,
                                float scale, float* probs, cudaStream_t stream) {
  if (k < 1 || k > kMaxSoftAssignK) return cudaErrorInvalidValue;
  if (batch * n == 0) return cudaSuccess;
  return dispatch<LaunchSoftAssignForward>(dtype, points, centroids, batch, n, k, d, inv_points, inv_centroids,
                                           scale, probs, stream);
}

cudaError_t soft_assign_backward(const void* points, const void* centroids, DType dtype, int64_t batch, int64_t n,
                                 int64_t k, int64_t d, const float* inv_points, const float* inv_centroids,
                                 float scale, const float* probs, const float* grad, float* grad_points,
                                 float* grad_centroids, cudaStream_t stream) {
  if (k < 1 || k > kMaxSoftAssignK) return cudaErrorInvalidValue;
  if (batch * n == 0) return cudaSuccess;
  return dispatch<LaunchSoftAssignBackward>(dtype, points, centroids, batch, n, k, d, inv_points, inv_centroids,
                                            scale, probs, grad, grad_points, grad_centroids, stream);
}

cudaError_t centroid_sums(const void* points, DType dtype, int64_t n, int64_t d, const int64_t* labels,
                          int64_t clusters, float* sums, float* counts, cudaStream_t stream) {
  (void)clusters;  // labels are trusted to lie in [0, clusters): the caller checks them
  if (n == 0) return cudaSuccess;
  return dispatch<LaunchCentroidSums>(dtype, points, n, d, labels, sums, counts, stream);
}

}  // namespace cuda
}  // namespace vocabsem
