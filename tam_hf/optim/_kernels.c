/* Fused CPU kernels for TAM / AdaTAM (see tam.py for the update rule).
 *
 * Compiled at first use by fused.py with the system C compiler and loaded through ctypes, so the package
 * needs no build step. One pass reads m and g for the three torque statistics (accumulated in double, so a
 * float32 gradient of 1e18 still gives a finite, exact cosine); one pass updates p, m (and v). That is
 * 2 + 7 tensor passes for AdaTAM against AdamW's 7, the physical floor for an exact per-tensor cosine.
 *
 * `sign` is -1 for maximize; `wd` is the coupled (L2) weight decay folded into the gradient before the
 * cosine; `decay` is the decoupled (AdamW-style) factor 1 - lr * weight_decay applied to p first.
 * Built without -ffast-math on purpose: no reassociation, NaN/Inf behave as in torch.
 */
#include <stdlib.h>
#include <tgmath.h> /* sqrt is sqrtf for float */

#define PARALLEL_MIN 32768L

static double cosine_of(const double *st) {
    double den = sqrt(st[1]) * sqrt(st[2]);
    double c = st[0] / den;
    if (!(den > 0.0) || !isfinite(c)) return 0.0; /* zero norm or overflow: treated as orthogonal */
    return c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
}

/* s <- gamma s + (1 - gamma) c; returns d + damping_eps, the gradient's coefficient in m */
#define DEFINE_DAMPING(S, SUF)                                                                  \
    double tam_advance_##SUF(const double *st, S *s, double gamma, double damping_eps) {       \
        S s_new = (S)(gamma * (double)*s + (1.0 - gamma) * cosine_of(st));                      \
        *s = s_new;                                                                             \
        return (1.0 + (double)s_new) / 2.0 + damping_eps;                                       \
    }

/* The statistics are summed per fixed chunk of CHUNK elements, then the chunk sums in order: the result is the
   same bits whatever the number of threads (an OpenMP reduction combines per-thread sums in arrival order), so
   DDP replicas, reruns and resumes on another machine agree exactly. */
#define CHUNK 65536L
#define MAX_CHUNKS_ON_STACK 64

#define DEFINE_KERNELS(T, S, SUF)                                                               \
    static void chunk_stats_##SUF(long lo, long hi, const T *m, const T *g, const T *p, T sign, T wd, \
                                  double *out) {                                                \
        double mg = 0.0, mm = 0.0, gg = 0.0;                                                    \
        if (wd == (T)0) {                                                                       \
            _Pragma("omp simd reduction(+:mg,mm,gg)")                                           \
            for (long i = lo; i < hi; i++) {                                                    \
                double gi = (double)(sign * g[i]), mi = (double)m[i];                           \
                mg += mi * gi; mm += mi * mi; gg += gi * gi;                                    \
            }                                                                                   \
        } else {                                                                                \
            _Pragma("omp simd reduction(+:mg,mm,gg)")                                           \
            for (long i = lo; i < hi; i++) {                                                    \
                double gi = (double)(sign * g[i] + wd * p[i]), mi = (double)m[i];               \
                mg += mi * gi; mm += mi * mi; gg += gi * gi;                                    \
            }                                                                                   \
        }                                                                                       \
        out[0] = mg; out[1] = mm; out[2] = gg;                                                  \
    }                                                                                           \
    void tam_stats_##SUF(long n, const T *m, const T *g, const T *p, T sign, T wd, double *out) { \
        long chunks = (n + CHUNK - 1) / CHUNK;                                                  \
        double on_stack[3 * MAX_CHUNKS_ON_STACK];                                               \
        double *part = chunks <= MAX_CHUNKS_ON_STACK ? on_stack : malloc(3 * chunks * sizeof(double)); \
        if (part == NULL) { out[0] = out[1] = out[2] = NAN; return; } /* NaN: treated as cosine 0 */ \
        _Pragma("omp parallel for schedule(static) if(n > PARALLEL_MIN)")                       \
        for (long c = 0; c < chunks; c++) {                                                     \
            long hi = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;                                \
            chunk_stats_##SUF(c * CHUNK, hi, m, g, p, sign, wd, part + 3 * c);                  \
        }                                                                                       \
        double mg = 0.0, mm = 0.0, gg = 0.0;                                                    \
        for (long c = 0; c < chunks; c++) {                                                     \
            mg += part[3 * c]; mm += part[3 * c + 1]; gg += part[3 * c + 2];                    \
        }                                                                                       \
        out[0] = mg; out[1] = mm; out[2] = gg;                                                  \
        if (part != on_stack) free(part);                                                       \
    }                                                                                           \
    void tam_update_##SUF(long n, T *p, const T *g, T *m, T sign, T wd, T a, T momentum, T lr) { \
        _Pragma("omp parallel for simd schedule(static) if(n > PARALLEL_MIN)")                  \
        for (long i = 0; i < n; i++) {                                                          \
            T gi = sign * g[i] + wd * p[i];                                                     \
            T mi = momentum * m[i] + a * gi;                                                    \
            m[i] = mi;                                                                          \
            p[i] = p[i] - lr * mi;                                                              \
        }                                                                                       \
    }                                                                                           \
    void adatam_update_##SUF(long n, T *p, const T *g, T *m, T *v, T sign, T wd, T a, T beta1,  \
                             T beta2, T lr, T eps, T decay) {                                   \
        _Pragma("omp parallel for simd schedule(static) if(n > PARALLEL_MIN)")                  \
        for (long i = 0; i < n; i++) {                                                          \
            T gi = sign * g[i] + wd * p[i];                                                     \
            T mi = beta1 * m[i] + a * gi;                                                       \
            T vi = beta2 * v[i] + ((T)1 - beta2) * gi * gi;                                     \
            m[i] = mi;                                                                          \
            v[i] = vi;                                                                          \
            p[i] = p[i] * decay - lr * mi / (sqrt(vi) + eps);                                   \
        }                                                                                       \
    }                                                                                           \
    /* tensor scope, single process: statistics, damping and update back to back, so the update \
       finds m and g of all but the largest tensors still in cache */                          \
    void tam_step_##SUF(long n, T *p, const T *g, T *m, S *s, T sign, T wd, T momentum, T lr,  \
                        double gamma, double damping_eps) {                                     \
        double st[3] = {0.0, 0.0, 0.0};                                                         \
        tam_stats_##SUF(n, m, g, p, sign, wd, st);                                              \
        T a = (T)tam_advance_##SUF(st, s, gamma, damping_eps);                                  \
        tam_update_##SUF(n, p, g, m, sign, wd, a, momentum, lr);                                \
    }                                                                                           \
    void adatam_step_##SUF(long n, T *p, const T *g, T *m, T *v, S *s, T sign, T wd, T beta1,  \
                           T beta2, T lr, T eps, T decay, double gamma, double damping_eps) {   \
        double st[3] = {0.0, 0.0, 0.0};                                                         \
        tam_stats_##SUF(n, m, g, p, sign, wd, st);                                              \
        T a = (T)tam_advance_##SUF(st, s, gamma, damping_eps);                                  \
        adatam_update_##SUF(n, p, g, m, v, sign, wd, a, beta1, beta2, lr, eps, decay);          \
    }

/* Many tensors in one call: a LoRA model has hundreds of small tensors, and a ctypes call per tensor would
   cost more than the arithmetic. The *_stats_batch and *_update_batch pair serves the steps where something
   sits between statistics and update (sharded statistics, the global scope): out holds 3 doubles per tensor,
   a one coefficient per tensor. fused.py checks every pointer's tensor (numel, dtype, contiguity, device)
   before it calls any of these. */
#define DEFINE_BATCH(T, S, SUF)                                                                 \
    void tam_stats_batch_##SUF(long count, const long *n, T **m, T **g, T **p, T sign, T wd,     \
                               double *out) {                                                   \
        for (long k = 0; k < count; k++)                                                        \
            tam_stats_##SUF(n[k], m[k], g[k], p[k], sign, wd, out + 3 * k);                     \
    }                                                                                           \
    void tam_update_batch_##SUF(long count, const long *n, T **p, T **g, T **m, const double *a, \
                                T sign, T wd, T momentum, T lr) {                               \
        for (long k = 0; k < count; k++)                                                        \
            tam_update_##SUF(n[k], p[k], g[k], m[k], sign, wd, (T)a[k], momentum, lr);          \
    }                                                                                           \
    void adatam_update_batch_##SUF(long count, const long *n, T **p, T **g, T **m, T **v,       \
                                   const double *a, T sign, T wd, T beta1, T beta2, T lr, T eps, \
                                   T decay) {                                                   \
        for (long k = 0; k < count; k++)                                                        \
            adatam_update_##SUF(n[k], p[k], g[k], m[k], v[k], sign, wd, (T)a[k], beta1, beta2, lr, \
                                eps, decay);                                                    \
    }                                                                                           \
    void tam_step_batch_##SUF(long count, const long *n, T **p, T **g, T **m, S **s, T sign, T wd, \
                              T momentum, T lr, double gamma, double damping_eps) {             \
        for (long k = 0; k < count; k++)                                                        \
            tam_step_##SUF(n[k], p[k], g[k], m[k], s[k], sign, wd, momentum, lr, gamma, damping_eps); \
    }                                                                                           \
    void adatam_step_batch_##SUF(long count, const long *n, T **p, T **g, T **m, T **v, S **s,  \
                                 T sign, T wd, T beta1, T beta2, T lr, T eps, T decay,          \
                                 double gamma, double damping_eps) {                            \
        for (long k = 0; k < count; k++)                                                        \
            adatam_step_##SUF(n[k], p[k], g[k], m[k], v[k], s[k], sign, wd, beta1, beta2, lr, eps, \
                              decay, gamma, damping_eps);                                       \
    }

DEFINE_DAMPING(float, f32)
DEFINE_DAMPING(double, f64)
DEFINE_KERNELS(float, float, f32)
DEFINE_KERNELS(double, double, f64)
DEFINE_BATCH(float, float, f32)
DEFINE_BATCH(double, double, f64)
