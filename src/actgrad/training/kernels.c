/* Fused CPU kernels for the batched engine (actgrad/engine/kernel_ops.py), and three for evaluating a whole
 * split (column_var, count_values, bn_eval, at the end), loaded with ctypes.
 *
 * Each kernel does in one pass over a row what the engine otherwise does with 3 to 10
 * PyTorch operations. At the engine's sizes (a few models, 100-200 features, 32 examples)
 * those operations cost more in dispatch and in re-reading memory than in arithmetic.
 *
 * Layout: a "row" is one feature of one model, its B values (the minibatch) contiguous,
 * that is the engine's feature-major (M, F, B) tensors seen as (M * F, B).
 *
 * The arithmetic is the engine's, operation for operation, except that sums over a row
 * are taken in this file's order: results agree with the PyTorch path up to float
 * rounding. It is built without -ffast-math and with -ffp-contract=off, so that no
 * multiply-add is fused behind our back and NaN and Inf propagate (a diverging run must
 * still be seen to diverge).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* BatchNorm, the two flavours of the lecture:
 *   std: (x - mean) / std, the unbiased batch std, no eps, running std;
 *   var: (x - mean) / sqrt(var + eps), the unbiased batch variance, running variance. */
typedef struct {
    float *x;                 /* (rows, B) the layer's input, centred in place (kept for backward) */
    float *out;               /* (rows, B) gamma * x_hat + beta */
    const float *gamma, *beta;
    float *inv;               /* 1 / std or 1 / sqrt(var + eps), kept for backward */
    float *scale;             /* gamma * inv, kept for backward */
    float *mean, *spread;     /* the batch's mean and std or variance (for the statistics) */
    float *run_mean, *run_spread;
    float *ggamma, *gbeta;    /* gradients of gamma and beta */
    int64_t rows, B;
    int64_t std_flavour;
    float eps, keep, take;    /* running = running * keep + batch * take */
} bn_args;

/* In passes over all rows rather than row by row: the per-row steps (sqrt, division) then
 * run as vectors across rows instead of as one long chain of dependent scalar operations
 * per row (docs/engine.md has the measurements). */
#define INLINE static inline __attribute__((always_inline))

INLINE void bn_forward_rows(const bn_args *a, const int64_t B)
{
    const int64_t R = a->rows;
    const float inv_B = 1.0f / (float)B, inv_n1 = 1.0f / (float)(B - 1);
    const float sqrt_n1 = sqrtf((float)(B - 1)), rsqrt_n1 = 1.0f / sqrtf((float)(B - 1));
    float *restrict xs = a->x, *restrict outs = a->out, *restrict mean = a->mean, *restrict spread = a->spread;
    float *restrict inv = a->inv, *restrict scale = a->scale;
    for (int64_t r = 0; r < R; r++) {
        const float *x = xs + r * B;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < B; i++) total += x[i];
        mean[r] = total * inv_B;
    }
    for (int64_t r = 0; r < R; r++) {  /* centre in place; the squared norm goes to spread for now */
        float *x = xs + r * B;
        const float m = mean[r];
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < B; i++) {
            x[i] = x[i] - m;
            ss += x[i] * x[i];
        }
        spread[r] = ss;
    }
    const float *restrict gamma = a->gamma;
    float *restrict run_mean = a->run_mean, *restrict run_spread = a->run_spread;
    const float eps = a->eps, keep = a->keep, take = a->take;
    if (a->std_flavour) {
#pragma omp simd
        for (int64_t r = 0; r < R; r++) {
            const float norm = sqrtf(spread[r]);
            inv[r] = (1.0f / norm) * sqrt_n1;
            spread[r] = norm * rsqrt_n1;
        }
    } else {
#pragma omp simd
        for (int64_t r = 0; r < R; r++) {
            const float norm = sqrtf(spread[r]);
            inv[r] = 1.0f / sqrtf(eps + norm * norm * inv_n1);
            spread[r] = (norm * norm) * inv_n1;
        }
    }
#pragma omp simd
    for (int64_t r = 0; r < R; r++) {
        scale[r] = gamma[r] * inv[r];
        run_mean[r] = run_mean[r] * keep + mean[r] * take;
        run_spread[r] = run_spread[r] * keep + spread[r] * take;
    }
    const float *restrict beta = a->beta;
    for (int64_t r = 0; r < R; r++) {
        const float *x = xs + r * B;
        float *out = outs + r * B;
        const float s = scale[r], b = beta[r];
#pragma omp simd
        for (int64_t i = 0; i < B; i++) out[i] = x[i] * s + b;
    }
}

/* dx = scale * (d - mean(d) - x_c * inv^2 * sum(d * x_c) / (B - 1)), with the gradients of
 * gamma (sum(d * x_hat)) and beta (sum(d)). With tanh_out, d is the gradient of the tanh
 * that follows the BatchNorm and is first taken through it: d * (1 - t^2). */
INLINE void bn_backward_rows(const bn_args *a, const float *d, const float *tanh_out, float *dx, const int64_t B)
{
    const int64_t R = a->rows;
    const float inv_B = 1.0f / (float)B, neg_inv_n1 = -1.0f / (float)(B - 1);
    const float *restrict xs = a->x, *restrict inv = a->inv;
    float *restrict gbeta = a->gbeta, *restrict ggamma = a->ggamma;
    for (int64_t r = 0; r < R; r++) {
        const float *dr = d + r * B, *x = xs + r * B;
        float *dxr = dx + r * B;
        float sd = 0.0f, sxd = 0.0f;
        if (tanh_out) {
            const float *t = tanh_out + r * B;
#pragma omp simd reduction(+ : sd, sxd)
            for (int64_t i = 0; i < B; i++) {
                const float g = dr[i] * (1.0f - t[i] * t[i]);
                dxr[i] = g;
                sd += g;
                sxd += g * x[i];
            }
        } else {
#pragma omp simd reduction(+ : sd, sxd)
            for (int64_t i = 0; i < B; i++) {
                sd += dr[i];
                sxd += dr[i] * x[i];
            }
        }
        gbeta[r] = sd;
        ggamma[r] = sxd * inv[r];
    }
    const float *restrict scale = a->scale;
    const float *src = tanh_out ? dx : d;  /* d taken through the tanh, or d itself */
    for (int64_t r = 0; r < R; r++) {
        const float *dr = src + r * B, *x = xs + r * B;
        float *dxr = dx + r * B;
        const float shift = gbeta[r] * inv_B, kx = (ggamma[r] * inv[r]) * neg_inv_n1, s = scale[r];
#pragma omp simd
        for (int64_t i = 0; i < B; i++) dxr[i] = ((dr[i] - shift) + x[i] * kx) * s;
    }
}

/* The minibatch size is a constant where it is the lecture's 32: the compiler then lays each
 * row out in whole vectors, with no loop bookkeeping. */
void bn_forward(const bn_args *a)
{
    if (a->B == 32) bn_forward_rows(a, 32);
    else bn_forward_rows(a, a->B);
}

void bn_backward(const bn_args *a, const float *d, const float *tanh_out, float *dx)
{
    if (a->B == 32) bn_backward_rows(a, d, tanh_out, dx, 32);
    else bn_backward_rows(a, d, tanh_out, dx, a->B);
}

/* LayerNorm, each example (column) of each model over its F features, the biased variance, as
 * F.layer_norm: x is normalised in place (x_hat, kept for backward) and out = gamma * x_hat + beta;
 * mean and inv (M, B) keep each example's mean and 1 / sqrt(var + eps). The sums over features run
 * down the rows, all B examples at once (PyTorch adds them in another order: the two agree to float
 * rounding). */
INLINE void ln_forward_models(float *xs, float *outs, const float *gamma, const float *beta, float *means,
                              float *invs, int64_t M, int64_t F, const int64_t B, float eps)
{
    const float inv_F = 1.0f / (float)F;
    for (int64_t m = 0; m < M; m++) {
        float *x = xs + m * F * B, *out = outs + m * F * B, *mean = means + m * B, *inv = invs + m * B;
        for (int64_t i = 0; i < B; i++) mean[i] = 0.0f;
        for (int64_t f = 0; f < F; f++) {
#pragma omp simd
            for (int64_t i = 0; i < B; i++) mean[i] += x[f * B + i];
        }
        for (int64_t i = 0; i < B; i++) { mean[i] = mean[i] * inv_F; inv[i] = 0.0f; }
        for (int64_t f = 0; f < F; f++) {
            float *row = x + f * B;
#pragma omp simd
            for (int64_t i = 0; i < B; i++) {
                row[i] = row[i] - mean[i];
                inv[i] += row[i] * row[i];
            }
        }
#pragma omp simd
        for (int64_t i = 0; i < B; i++) inv[i] = 1.0f / sqrtf(inv[i] * inv_F + eps);
        for (int64_t f = 0; f < F; f++) {
            float *row = x + f * B, *o = out + f * B;
            const float g = gamma[m * F + f], b = beta[m * F + f];
#pragma omp simd
            for (int64_t i = 0; i < B; i++) {
                row[i] = row[i] * inv[i];
                o[i] = row[i] * g + b;
            }
        }
    }
}

/* dx = inv * (g - mean_F(g) - x_hat * mean_F(g * x_hat)), g = gamma * d, with the gradients of gamma
 * (sum over the batch of d * x_hat) and beta (sum of d). gm and gxm (M, B) are room for the two means. */
INLINE void ln_backward_models(const float *d, const float *xhats, const float *gamma, const float *invs,
                               float *dxs, float *ggamma, float *gbeta, float *gms, float *gxms, int64_t M,
                               int64_t F, const int64_t B)
{
    const float inv_F = 1.0f / (float)F;
    for (int64_t m = 0; m < M; m++) {
        const float *dm = d + m * F * B, *xhat = xhats + m * F * B, *inv = invs + m * B;
        float *dx = dxs + m * F * B, *gm = gms + m * B, *gxm = gxms + m * B;
        for (int64_t i = 0; i < B; i++) { gm[i] = 0.0f; gxm[i] = 0.0f; }
        for (int64_t f = 0; f < F; f++) {
            const float *dr = dm + f * B, *xr = xhat + f * B;
            float *g = dx + f * B;
            const float gam = gamma[m * F + f];
            float sd = 0.0f, sdx = 0.0f;
#pragma omp simd reduction(+ : sd, sdx)
            for (int64_t i = 0; i < B; i++) {
                sd += dr[i];
                sdx += dr[i] * xr[i];
                g[i] = dr[i] * gam;
                gm[i] += g[i];
                gxm[i] += g[i] * xr[i];
            }
            gbeta[m * F + f] = sd;
            ggamma[m * F + f] = sdx;
        }
        for (int64_t i = 0; i < B; i++) { gm[i] = gm[i] * inv_F; gxm[i] = gxm[i] * inv_F; }
        for (int64_t f = 0; f < F; f++) {
            const float *xr = xhat + f * B;
            float *g = dx + f * B;
#pragma omp simd
            for (int64_t i = 0; i < B; i++) g[i] = ((g[i] - gm[i]) - xr[i] * gxm[i]) * inv[i];
        }
    }
}

void ln_forward(float *x, float *out, const float *gamma, const float *beta, float *mean, float *inv, int64_t M,
                int64_t F, int64_t B, float eps)
{
    if (B == 32) ln_forward_models(x, out, gamma, beta, mean, inv, M, F, 32, eps);
    else ln_forward_models(x, out, gamma, beta, mean, inv, M, F, B, eps);
}

void ln_backward(const float *d, const float *xhat, const float *gamma, const float *inv, float *dx, float *ggamma,
                 float *gbeta, float *gm, float *gxm, int64_t M, int64_t F, int64_t B)
{
    if (B == 32) ln_backward_models(d, xhat, gamma, inv, dx, ggamma, gbeta, gm, gxm, M, F, 32);
    else ln_backward_models(d, xhat, gamma, inv, dx, ggamma, gbeta, gm, gxm, M, F, B);
}

/* Through a tanh backwards, d * (1 - t^2), and the sum of each row: the gradient of the
 * bias of the Linear layer below (none when bias is NULL). */
INLINE void tanh_backward_rows(const float *d, const float *t, float *dx, float *bias_grad, int64_t rows,
                               const int64_t B)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *dr = d + r * B, *tr = t + r * B;
        float *dxr = dx + r * B;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < B; i++) {
            const float g = dr[i] * (1.0f - tr[i] * tr[i]);
            dxr[i] = g;
            total += g;
        }
        if (bias_grad) bias_grad[r] = total;
    }
}

void tanh_backward_bias(const float *d, const float *t, float *dx, float *bias_grad, int64_t rows, int64_t B)
{
    if (B == 32) tanh_backward_rows(d, t, dx, bias_grad, rows, 32);
    else tanh_backward_rows(d, t, dx, bias_grad, rows, B);
}

/* The embedding's lookup, C[X]: each example's T rows of the tables side by side in a row of
 * width `stride` of emb, whose padding beyond T * E is left as it is (zero). */
void embedding_forward(const float *table, int64_t E, const int64_t *idx, int64_t n, float *emb, int64_t T,
                       int64_t stride)
{
    for (int64_t j = 0; j < n; j++)
        memcpy(emb + (j / T) * stride + (j % T) * E, table + idx[j] * E, sizeof(float) * (size_t)E);
}

/* The mean cross-entropy of M minibatches, from logp = log_softmax(logits) (M, V, B) and its
 * exp (passed in grad, which it overwrites): loss_out[m] = the sum of logp at the targets, and
 * the gradient at the logits as PyTorch's log_softmax backward takes it, g - exp(logp) * sum(g)
 * with g = -1/B at the target and 0 elsewhere (so sum(g) = -1/B); with bias_grad, the sum of each
 * row of that gradient: the gradient of the bias of the Linear layer below (the logits'). */
INLINE void cross_entropy_rows(const float *logp, float *grad, const int64_t *targets, int64_t M, int64_t V,
                               const int64_t B, float *loss_out, float *bias_grad)
{
    const float g_target = -1.0f / (float)B;
    for (int64_t m = 0; m < M; m++) {
        const float *lp = logp + m * V * B;
        float *gr = grad + m * V * B;
        const int64_t *t = targets + m * B;
        float total = 0.0f;
        for (int64_t v = 0; v < V; v++) {
            float *row = gr + v * B;
            float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
            for (int64_t i = 0; i < B; i++) {
                row[i] = (t[i] == v ? g_target : 0.0f) - row[i] * g_target;
                row_sum += row[i];
            }
            if (bias_grad) bias_grad[m * V + v] = row_sum;
        }
        for (int64_t i = 0; i < B; i++) total += lp[t[i] * B + i];
        loss_out[m] = total;
    }
}

void cross_entropy(const float *logp, float *grad, const int64_t *targets, int64_t M, int64_t V, int64_t B,
                   float *loss_out, float *bias_grad)
{
    if (B == 32) cross_entropy_rows(logp, grad, targets, M, V, 32, loss_out, bias_grad);
    else cross_entropy_rows(logp, grad, targets, M, V, B, loss_out, bias_grad);
}

/* The embedding's gradient, as autograd computes it for C[X]: zero, then each looked-up row
 * of the tables gets its example's gradient added, in the order of the lookups. demb holds
 * n / T rows of width `stride`, each the T context characters' E values, then padding. */
void embedding_backward(float *grad, int64_t table_rows, int64_t E, const int64_t *idx, int64_t n,
                        const float *demb, int64_t T, int64_t stride)
{
    memset(grad, 0, sizeof(float) * (size_t)(table_rows * E));
    for (int64_t j = 0; j < n; j++) {
        float *g = grad + idx[j] * E;
        const float *src = demb + (j / T) * stride + (j % T) * E;
#pragma omp simd
        for (int64_t e = 0; e < E; e++) g[e] += src[e];
    }
}

/* The variance (or std) of each column of a row-major (rows, cols) matrix, over the rows, with
 * `correction` subtracted from the count (1: unbiased). This is PyTorch's CPU var/std over dim 0
 * on one thread, to the bit: Welford's update in double, one row after another, the result rounded
 * to float once. PyTorch runs that update one column at a time, with no vectorisation; here each
 * row updates every column at once, the same arithmetic in the same order per column, about ten
 * times faster on a whole training split. mean and m2 are the caller's scratch, cols doubles each. */
void column_var(const float *x, int64_t rows, int64_t cols, double correction, int64_t take_sqrt,
                double *mean, double *m2, float *out)
{
    for (int64_t c = 0; c < cols; c++) mean[c] = m2[c] = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        const double n = (double)(r + 1);
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            const double v = (double)xr[c];
            const double delta = v - mean[c];
            const double new_mean = mean[c] + delta / n;
            m2[c] = m2[c] + delta * (v - new_mean);
            mean[c] = new_mean;
        }
    }
    const double divisor = (double)rows > correction ? (double)rows - correction : 0.0;
    for (int64_t c = 0; c < cols; c++) {
        const double var = m2[c] / divisor;
        out[c] = (float)(take_sqrt ? sqrt(var) : var);
    }
}

/* How many of the n values of x pass each of k tests: test j counts |x| > thresholds[j] when
 * on_abs[j] is 1, x <= thresholds[j] when it is 0 (NaN passes neither, as in PyTorch). One read of
 * x per test, vectorised; an evaluation's share counting took a third of its time as PyTorch
 * operations (abs, compare, sum: three passes and a temporary per test). */
void count_values(const float *x, int64_t n, const float *thresholds, const int64_t *on_abs, int64_t k,
                  int64_t *counts)
{
    for (int64_t j = 0; j < k; j++) {
        const float t = thresholds[j];
        int64_t c = 0;
        if (on_abs[j]) {
#pragma omp simd reduction(+ : c)
            for (int64_t i = 0; i < n; i++) c += fabsf(x[i]) > t;
        } else {
#pragma omp simd reduction(+ : c)
            for (int64_t i = 0; i < n; i++) c += x[i] <= t;
        }
        counts[j] = c;
    }
}

/* BatchNorm in evaluation mode on a row-major (rows, cols) matrix, each column by its own statistics:
 * the PyTorch evaluation's four in-place passes (model.BatchNorm1d._normalize_in_place) in one, the same
 * float operations in the same order. div is sqrt(var + eps) (var flavour) or the std (std flavour). */
void bn_eval(const float *x, float *out, int64_t rows, int64_t cols, const float *mean, const float *div,
             const float *gamma, const float *beta, int64_t std_flavour)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *o = out + r * cols;
        if (std_flavour) {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++) {
                float t = xr[c] - mean[c];
                t = t * gamma[c];
                t = t / div[c];
                o[c] = t + beta[c];
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++) {
                float t = xr[c] - mean[c];
                t = t / div[c];
                t = t * gamma[c];
                o[c] = t + beta[c];
            }
        }
    }
}
