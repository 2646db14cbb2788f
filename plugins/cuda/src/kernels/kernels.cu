// The CUDA plugin's operator kernels, compiled at plugin registration by NVRTC for the
// device's own architecture (src/kernels/module.rs). Plain CUDA C, no headers: NVRTC has no
// system include path.
//
// Conventions: f32 tensors, contiguous, row-major; sizes as 64-bit; grid-stride loops so a
// launch of any grid covers any size; `act` codes match `Act` in src/kernels/mod.rs.

typedef unsigned long long u64;
typedef long long i64;

#define LOOP(i, n)                                                                       \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (u64)(n);               \
         i += (u64)blockDim.x * gridDim.x)

#define MAX_RANK 8

// Unary functions and fused-epilogue activations (codes as `Act` in mod.rs).
__device__ __forceinline__ float act(float v, int kind, float p0, float p1) {
    switch (kind) {
    case 0: return v;
    case 1: return v > 0.f ? v : (v == v ? 0.f : v);                  // Relu (NaN stays)
    case 2: return v != v ? v : fminf(fmaxf(v, p0), p1);               // Clip (max wins)
    case 3: return v < 0.f ? p0 * v : v;                               // LeakyRelu
    case 4: return v / (1.f + expf(-v));                               // SiLU
    case 5: return 0.5f * v * (1.f + erff(v * 0.7071067811865475f));   // Gelu (erf)
    case 6: return 1.f / (1.f + expf(-v));                             // Sigmoid
    case 7: return tanhf(v);                                           // Tanh
    case 8: return expf(v);                                            // Exp
    case 9: return logf(v);                                            // Log
    case 10: return -v;                                                // Neg
    case 11: return fabsf(v);                                          // Abs
    case 12: return sqrtf(v);                                          // Sqrt
    case 13: return erff(v);                                           // Erf
    case 14: return fmaxf(0.f, fminf(1.f, p0 * v + p1));               // HardSigmoid
    case 15: return v * fmaxf(0.f, fminf(1.f, v / 6.f + 0.5f));        // HardSwish
    case 16: return 1.f / v;                                           // Reciprocal
    case 17: return floorf(v);                                         // Floor
    case 18: return ceilf(v);                                          // Ceil
    case 19: return v > 0.f ? v : p0 * (expf(v) - 1.f);                // Elu
    case 20: return v > 20.f ? v : log1pf(expf(v));                    // Softplus
    case 21: return sinf(v);                                           // Sin
    case 22: return cosf(v);                                           // Cos
    default: return v;
    }
}

extern "C" __global__ void unary_f32(const float* x, float* y, u64 n, int kind, float p0,
                                     float p1) {
    LOOP(i, n) { y[i] = act(x[i], kind, p0, p1); }
}

// Binary operators (codes as `BinOp` in elementwise.rs).
__device__ __forceinline__ float binop(float a, float b, int op) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return powf(a, b);
    case 5: return (a != a || b != b) ? a + b : fmaxf(a, b);           // Max (NaN wins)
    case 6: return (a != a || b != b) ? a + b : fminf(a, b);           // Min (NaN wins)
    case 7: return a < 0.f ? a * b : a;                                // PRelu (b = slope)
    default: return a;
    }
}

// Output extents and each input's strides (0 along broadcast dimensions), coalesced by the
// host to the fewest dimensions.
struct Bcast {
    int rank;
    i64 dims[MAX_RANK];
    i64 sa[MAX_RANK];
    i64 sb[MAX_RANK];
};

extern "C" __global__ void binary_f32(const float* a, const float* b, float* y, u64 n, int op,
                                      Bcast s) {
    if (s.rank == 1) {
        i64 sa = s.sa[0], sb = s.sb[0];
        LOOP(i, n) { y[i] = binop(a[i * sa], b[i * sb], op); }
        return;
    }
    LOOP(i, n) {
        u64 r = i;
        i64 oa = 0, ob = 0;
        for (int d = s.rank - 1; d >= 0; --d) {
            i64 c = (i64)(r % (u64)s.dims[d]);
            r /= (u64)s.dims[d];
            oa += c * s.sa[d];
            ob += c * s.sb[d];
        }
        y[i] = binop(a[oa], b[ob], op);
    }
}

// Strided gather of one tensor into a contiguous output: Transpose, Expand, and the
// broadcast of Gemm's C (each output element reads src at the dot of its index and `ss`).
struct Strided {
    int rank;
    i64 dims[MAX_RANK];
    i64 ss[MAX_RANK];
};

extern "C" __global__ void gather_strided_f32(const float* src, float* y, u64 n, float scale,
                                              Strided s) {
    LOOP(i, n) {
        u64 r = i;
        i64 o = 0;
        for (int d = s.rank - 1; d >= 0; --d) {
            i64 c = (i64)(r % (u64)s.dims[d]);
            r /= (u64)s.dims[d];
            o += c * s.ss[d];
        }
        y[i] = scale * src[o];
    }
}

// y[i] = act(y[i] + bias[(i / inner) % channels] + z[i]): the epilogue of FusedMatMul
// (inner = 1, channels = n) and Conv (inner = pixels, channels = M). bias and z may be null.
extern "C" __global__ void bias_act_f32(float* y, const float* bias, const float* z, u64 n,
                                        i64 inner, i64 channels, int kind, float p0,
                                        float p1) {
    LOOP(i, n) {
        float v = y[i];
        if (bias) v += bias[(i64)(i / (u64)inner) % channels];
        if (z) v += z[i];
        y[i] = act(v, kind, p0, p1);
    }
}

// --- reductions over a row: one block per row -------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Every thread of the block gets the sum (max) of `v` over the block. `shared` holds 33
// floats; the block's threads all call it.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) shared[32] = v;
    __syncthreads();
    return shared[32];
}
__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : -__int_as_float(0x7f800000);
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) shared[32] = v;
    __syncthreads();
    return shared[32];
}

// Softmax / LogSoftmax along an axis of extent `d` with `inner` elements after it: row r is
// the elements (r / inner) * d * inner + r % inner + j * inner.
extern "C" __global__ void softmax_f32(const float* x, float* y, u64 rows, i64 d, i64 inner,
                                       int log_out) {
    __shared__ float shared[33];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 base = (i64)(r / (u64)inner) * d * inner + (i64)(r % (u64)inner);
        const float* xr = x + base;
        float* yr = y + base;
        float m = -__int_as_float(0x7f800000);
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) m = fmaxf(m, xr[j * inner]);
        m = block_max(m, shared);
        float s = 0.f;
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) s += expf(xr[j * inner] - m);
        s = block_sum(s, shared);
        if (log_out) {
            float ls = logf(s);
            for (i64 j = threadIdx.x; j < d; j += blockDim.x) yr[j * inner] = xr[j * inner] - m - ls;
        } else {
            float inv = 1.f / s;
            for (i64 j = threadIdx.x; j < d; j += blockDim.x) yr[j * inner] = expf(xr[j * inner] - m) * inv;
        }
    }
}

// LayerNormalization over rows of `cols` (scale and bias of `cols` entries; bias may be
// null); mean and inv_std (one per row) are written when not null. Two passes over the row:
// the mean first, then the centred squares, as the CPU kernel does.
extern "C" __global__ void layernorm_f32(const float* x, const float* scale, const float* bias,
                                         float* y, float* mean_out, float* inv_out, u64 rows,
                                         i64 cols, float eps) {
    __shared__ float shared[33];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * (u64)cols;
        float* yr = y + r * (u64)cols;
        float s = 0.f;
        for (i64 j = threadIdx.x; j < cols; j += blockDim.x) s += xr[j];
        float mean = block_sum(s, shared) / (float)cols;
        float q = 0.f;
        for (i64 j = threadIdx.x; j < cols; j += blockDim.x) {
            float c = xr[j] - mean;
            q += c * c;
        }
        float inv = rsqrtf(block_sum(q, shared) / (float)cols + eps);
        for (i64 j = threadIdx.x; j < cols; j += blockDim.x) {
            float v = (xr[j] - mean) * inv * scale[j];
            yr[j] = bias ? v + bias[j] : v;
        }
        if (threadIdx.x == 0) {
            if (mean_out) mean_out[r] = mean;
            if (inv_out) inv_out[r] = inv;
        }
    }
}

// --- convolution and pooling (2-D; 1-D runs as height 1) ----------------------------------

struct Window {
    i64 c, h, w;          // input channels (per image) and extents
    i64 oh, ow;           // output extents
    i64 kh, kw;           // kernel
    i64 sh, sw;           // strides
    i64 ph, pw;           // leading pads
    i64 dh, dw;           // dilations
};

// One image's columns: col[(c * kh + i) * kw + j][oy * ow + ox] = x[c][oy*sh - ph + i*dh]
// [ox*sw - pw + j*dw], zero outside. Every element is written.
extern "C" __global__ void im2col_f32(const float* x, float* col, Window g) {
    u64 pixels = (u64)(g.oh * g.ow);
    u64 n = (u64)(g.c * g.kh * g.kw) * pixels;
    LOOP(i, n) {
        i64 p = (i64)(i % pixels);
        i64 row = (i64)(i / pixels);
        i64 j = row % g.kw, t = row / g.kw;
        i64 ki = t % g.kh, c = t / g.kh;
        i64 oy = p / g.ow, ox = p % g.ow;
        i64 iy = oy * g.sh - g.ph + ki * g.dh;
        i64 ix = ox * g.sw - g.pw + j * g.dw;
        float v = 0.f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(c * g.h + iy) * g.w + ix];
        col[i] = v;
    }
}

// Direct grouped convolution for few input channels per group (depthwise above all): one
// thread per output element over all images, with bias, residual z and the activation.
extern "C" __global__ void conv_direct_f32(const float* x, const float* w, const float* bias,
                                           const float* z, float* y, i64 images, i64 m,
                                           i64 groups, Window g, int kind, float p0,
                                           float p1) {
    i64 cg = g.c / groups, mg = m / groups;
    u64 n = (u64)(images * m * g.oh * g.ow);
    LOOP(i, n) {
        i64 ox = (i64)(i % (u64)g.ow);
        u64 t = i / (u64)g.ow;
        i64 oy = (i64)(t % (u64)g.oh);
        t /= (u64)g.oh;
        i64 oc = (i64)(t % (u64)m);
        i64 img = (i64)(t / (u64)m);
        i64 grp = oc / mg;
        float acc = bias ? bias[oc] : 0.f;
        for (i64 c = 0; c < cg; ++c) {
            const float* xp = x + ((img * g.c + grp * cg + c) * g.h) * g.w;
            const float* wp = w + ((oc * cg + c) * g.kh) * g.kw;
            for (i64 ki = 0; ki < g.kh; ++ki) {
                i64 iy = oy * g.sh - g.ph + ki * g.dh;
                if (iy < 0 || iy >= g.h) continue;
                for (i64 kj = 0; kj < g.kw; ++kj) {
                    i64 ix = ox * g.sw - g.pw + kj * g.dw;
                    if (ix < 0 || ix >= g.w) continue;
                    acc += xp[iy * g.w + ix] * wp[ki * g.kw + kj];
                }
            }
        }
        if (z) acc += z[i];
        y[i] = act(acc, kind, p0, p1);
    }
}

// MaxPool (mode 0) / AveragePool (1: pads excluded from the count, 2: included) over
// `planes` planes (images x channels). Padding taps never win a max.
extern "C" __global__ void pool_f32(const float* x, float* y, i64 planes, Window g, int mode) {
    u64 n = (u64)(planes * g.oh * g.ow);
    LOOP(i, n) {
        i64 ox = (i64)(i % (u64)g.ow);
        u64 t = i / (u64)g.ow;
        i64 oy = (i64)(t % (u64)g.oh);
        i64 plane = (i64)(t / (u64)g.oh);
        const float* xp = x + plane * g.h * g.w;
        float best = -__int_as_float(0x7f800000), sum = 0.f;
        int count = 0, nan = 0;
        for (i64 ki = 0; ki < g.kh; ++ki) {
            i64 iy = oy * g.sh - g.ph + ki * g.dh;
            for (i64 kj = 0; kj < g.kw; ++kj) {
                i64 ix = ox * g.sw - g.pw + kj * g.dw;
                bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
                if (inside) {
                    float v = xp[iy * g.w + ix];
                    if (v != v) nan = 1;
                    best = fmaxf(best, v);
                    sum += v;
                    count++;
                } else if (mode == 2 && iy < g.h + g.ph && ix < g.w + g.pw) {
                    count++;
                }
            }
        }
        float out;
        if (mode == 0) out = nan ? __int_as_float(0x7fc00000) : best;
        else out = count ? sum / (float)count : 0.f;
        y[i] = out;
    }
}

// Mean of each plane of `size` elements: GlobalAveragePool. One block per plane.
extern "C" __global__ void plane_mean_f32(const float* x, float* y, u64 planes, i64 size) {
    __shared__ float shared[33];
    for (u64 p = blockIdx.x; p < planes; p += gridDim.x) {
        const float* xp = x + p * (u64)size;
        float s = 0.f;
        for (i64 j = threadIdx.x; j < size; j += blockDim.x) s += xp[j];
        s = block_sum(s, shared);
        if (threadIdx.x == 0) y[p] = s / (float)size;
    }
}

// BatchNormalization (inference): y = (x - mean[c]) * scale[c] / sqrt(var[c] + eps) + b[c].
extern "C" __global__ void batchnorm_f32(const float* x, const float* scale, const float* b,
                                         const float* mean, const float* var, float* y, u64 n,
                                         i64 inner, i64 channels, float eps) {
    LOOP(i, n) {
        i64 c = (i64)(i / (u64)inner) % channels;
        y[i] = (x[i] - mean[c]) * (scale[c] * rsqrtf(var[c] + eps)) + b[c];
    }
}

// Concat: each output row of `outer` is the inputs' rows side by side; this copies one input
// (rows of `width` elements) to column `offset` of output rows of `total` elements.
extern "C" __global__ void concat_part_f32(const float* x, float* y, u64 outer, i64 width,
                                           i64 total, i64 offset) {
    u64 n = outer * (u64)width;
    LOOP(i, n) {
        u64 r = i / (u64)width;
        i64 c = (i64)(i % (u64)width);
        y[r * (u64)total + offset + c] = x[i];
    }
}

// Gather along an axis: y[o][j][i] = x[o][idx[j]][i]. The host checked the indices and made
// negative ones positive.
extern "C" __global__ void gather_f32(const float* x, const i64* idx, float* y, u64 outer,
                                      i64 axis, i64 count, i64 inner) {
    u64 n = outer * (u64)(count * inner);
    LOOP(i, n) {
        i64 in = (i64)(i % (u64)inner);
        u64 t = i / (u64)inner;
        i64 j = (i64)(t % (u64)count);
        u64 o = t / (u64)count;
        y[i] = x[(o * (u64)axis + (u64)idx[j]) * (u64)inner + in];
    }
}

// Linear Resize over the last three dimensions (fewer padded with extents of 1 and a zero
// map), with 32-bit indices: the host uses it when every index fits. Eight taps, no loops:
// the general kernel below spends its time in 64-bit index arithmetic.
__device__ __forceinline__ void linear_taps(float c, int in, int* lo, int* hi, float* f) {
    c = fminf(fmaxf(c, 0.f), (float)(in - 1));
    int l = (int)c;
    *lo = l;
    *hi = l + 1 < in ? l + 1 : l;
    *f = c - (float)l;
}

struct Resize3 {
    int in[3], out[3];
    float scale[3], shift[3];
    int clamp_negative;
};

extern "C" __global__ void resize_linear3_f32(const float* x, float* y, unsigned planes,
                                              Resize3 r) {
    unsigned od = r.out[0], oh = r.out[1], ow = r.out[2];
    unsigned n = planes * od * oh * ow;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x) {
        unsigned t = i / ow, xo = i - t * ow;
        unsigned u = t / oh, yo = t - u * oh;
        unsigned p = u / od, zo = u - p * od;
        float c[3] = {(float)zo * r.scale[0] + r.shift[0], (float)yo * r.scale[1] + r.shift[1],
                      (float)xo * r.scale[2] + r.shift[2]};
        if (r.clamp_negative) {
            for (int d = 0; d < 3; ++d)
                if (r.out[d] == 1) c[d] = 0.f;
        }
        int z0, z1, y0, y1, x0, x1;
        float fz, fy, fx;
        linear_taps(c[0], r.in[0], &z0, &z1, &fz);
        linear_taps(c[1], r.in[1], &y0, &y1, &fy);
        linear_taps(c[2], r.in[2], &x0, &x1, &fx);
        const float* xp = x + (size_t)p * r.in[0] * r.in[1] * r.in[2];
        int w = r.in[2], hw = r.in[1] * r.in[2];
        const float* a = xp + z0 * hw;
        const float* b = xp + z1 * hw;
        float top = (1.f - fy) * ((1.f - fx) * a[y0 * w + x0] + fx * a[y0 * w + x1]) +
                    fy * ((1.f - fx) * a[y1 * w + x0] + fx * a[y1 * w + x1]);
        float bot = (1.f - fy) * ((1.f - fx) * b[y0 * w + x0] + fx * b[y0 * w + x1]) +
                    fy * ((1.f - fx) * b[y1 * w + x0] + fx * b[y1 * w + x1]);
        y[i] = (1.f - fz) * top + fz * bot;
    }
}

// --- Resize over the last 1, 2 or 3 dimensions -------------------------------------------

// Per resized dimension (innermost last): input and output extents, and the affine map
// from output to input coordinate the host worked out from the coordinate transformation
// mode: in = out * scale + shift (half_pixel: scale = 1/s, shift = 0.5/s - 0.5; ...).
struct Resize {
    int dims;                 // 1, 2 or 3 resized trailing dimensions
    i64 in[3], out[3];
    float scale[3], shift[3];
    int mode;                 // 0 nearest, 1 linear, 2 cubic
    int nearest;              // 0 round_prefer_floor, 1 round_prefer_ceil, 2 floor, 3 ceil
    float cubic_a;
    int exclude_outside;
    int clamp_negative;       // pytorch_half_pixel with an output extent of 1 maps to 0
};

__device__ __forceinline__ i64 clampi(i64 v, i64 lo, i64 hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

__device__ __forceinline__ i64 nearest_index(float c, int rule, i64 extent) {
    float f;
    switch (rule) {
    case 0: f = (c - floorf(c) == 0.5f) ? floorf(c) : rintf(c); break;   // prefer floor
    case 1: f = (c - floorf(c) == 0.5f) ? ceilf(c) : rintf(c); break;    // prefer ceil
    case 2: f = floorf(c); break;
    default: f = ceilf(c); break;
    }
    return clampi((i64)f, 0, extent - 1);
}

__device__ __forceinline__ float cubic_weight(float t, float a) {
    t = fabsf(t);
    if (t <= 1.f) return ((a + 2.f) * t - (a + 3.f)) * t * t + 1.f;
    if (t < 2.f) return ((a * t - 5.f * a) * t + 8.f * a) * t - 4.f * a;
    return 0.f;
}

extern "C" __global__ void resize_f32(const float* x, float* y, u64 planes, Resize r) {
    i64 out_plane = 1, in_plane = 1;
    for (int d = 0; d < r.dims; ++d) {
        out_plane *= r.out[d];
        in_plane *= r.in[d];
    }
    u64 n = planes * (u64)out_plane;
    LOOP(i, n) {
        u64 plane = i / (u64)out_plane;
        i64 rem = (i64)(i % (u64)out_plane);
        i64 o[3];
        for (int d = r.dims - 1; d >= 0; --d) {
            o[d] = rem % r.out[d];
            rem /= r.out[d];
        }
        const float* xp = x + plane * (u64)in_plane;
        float coord[3];
        for (int d = 0; d < r.dims; ++d) {
            coord[d] = (float)o[d] * r.scale[d] + r.shift[d];
            if (r.clamp_negative && r.out[d] == 1) coord[d] = 0.f;
        }
        if (r.mode == 0) {
            i64 off = 0;
            for (int d = 0; d < r.dims; ++d)
                off = off * r.in[d] + nearest_index(coord[d], r.nearest, r.in[d]);
            y[i] = xp[off];
            continue;
        }
        // Linear (2 taps) or cubic (4 taps) per dimension: the separable product of weights.
        int taps = r.mode == 1 ? 2 : 4;
        i64 idx[3][4];
        float wt[3][4];
        for (int d = 0; d < r.dims; ++d) {
            float c = coord[d];
            if (r.mode == 1) {
                c = fminf(fmaxf(c, 0.f), (float)(r.in[d] - 1));
                i64 lo = (i64)floorf(c);
                i64 hi = lo + 1 < r.in[d] ? lo + 1 : lo;
                float f = c - (float)lo;
                idx[d][0] = lo; idx[d][1] = hi;
                wt[d][0] = 1.f - f; wt[d][1] = f;
            } else {
                i64 base = (i64)floorf(c);
                float f = c - (float)base;
                float total = 0.f;
                for (int t = 0; t < 4; ++t) {
                    i64 k = base - 1 + t;
                    float w = cubic_weight(f - (float)(t - 1), r.cubic_a);
                    if (r.exclude_outside && (k < 0 || k >= r.in[d])) w = 0.f;
                    idx[d][t] = clampi(k, 0, r.in[d] - 1);
                    wt[d][t] = w;
                    total += w;
                }
                if (r.exclude_outside && total != 0.f)
                    for (int t = 0; t < 4; ++t) wt[d][t] /= total;
            }
        }
        float acc = 0.f;
        int combos = 1;
        for (int d = 0; d < r.dims; ++d) combos *= taps;
        for (int k = 0; k < combos; ++k) {
            int rest = k;
            float w = 1.f;
            i64 off = 0;
            for (int d = 0; d < r.dims; ++d) {
                int t = rest % taps;
                rest /= taps;
                w *= wt[d][t];
                off = off * r.in[d] + idx[d][t];
            }
            acc += w * xp[off];
        }
        y[i] = acc;
    }
}
