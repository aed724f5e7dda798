/* hwport's native rounding kernel: one pass over a float32 or float64 buffer.
 *
 * It computes exactly what hwport.rounding._quantize_xp computes (the array-namespace
 * kernel that serves torch on any device and jax under jit); tests hold the two to the
 * same bits and both to ml_dtypes / torch casts and the scalar definition in formats.py.
 *
 * Semantics (per element, on the magnitude; the sign is reattached):
 *   NaN stays NaN (quiet); inf becomes inf_bits; 0 stays 0.
 *   Normal target range: drop s = CM - m mantissa bits.  Subnormal range: the value is
 *   k * 2**(esub - m) with k the integer number of quanta; the same rule drops bits of the
 *   significand.  With Tesla's "bias" subnormals the band (max_sub, min_normal) has the two
 *   neighbours max_sub and min_normal, handled apart.
 *   nearest: ties to even.  toward_zero: truncate.  stochastic: round up iff
 *   r + floor(frac * 2**R) >= 2**R, r = the R high bits of a counter-based hash of
 *   (element index, key0, key1).
 *   After rounding: magnitude > max -> overflow (inf, max or NaN); flush-to-zero formats
 *   replace nonzero results below min_normal by zero.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <fenv.h>
#include "xla/ffi/api/c_api.h"  /* XLA's FFI C API (OpenXLA, Apache-2.0), vendored */

typedef struct {
    uint64_t overflow, underflow, nonfinite;  /* finite -> beyond max; nonzero -> 0; inf/NaN in */
} counts_t;

typedef struct {
    int m, emin, esub, ftz, gap, overflow, mode, rbits;
    uint64_t max_bits, inf_bits, maxsub_bits, minnorm_bits, nan_bits;
    uint32_t key0, key1;
} params_t;

enum { MODE_NEAREST = 0, MODE_STOCHASTIC = 1, MODE_TOWARD_ZERO = 2 };

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static inline uint64_t random_bits(const params_t *p, uint64_t i) {
    return (uint64_t)(lowbias32(lowbias32((uint32_t)i + p->key0) ^ p->key1) >> (32 - p->rbits));
}

/* 1 if the bits dropped below position s (0..63) round the kept part up.  Branch-free:
 * nearest adds half - 1 plus the parity of the kept part, so only a carry past s is kept. */
static inline __attribute__((always_inline)) uint64_t
round_up(const params_t *p, const int mode, uint64_t v, int s, uint64_t i) {
    if (s <= 0) return 0;
    if (s > 62) {  /* every bit of v (< 2**54) is dropped; only stochastic can round up */
        if (mode != MODE_STOCHASTIC) return 0;
        int shift = s - p->rbits;
        uint64_t frac = shift >= 64 ? 0 : v >> shift;
        return (random_bits(p, i) + frac) >> p->rbits;
    }
    uint64_t dropped = v & ((1ULL << s) - 1);
    if (mode == MODE_NEAREST)
        return (dropped + ((1ULL << (s - 1)) - 1) + ((v >> s) & 1)) >> s;
    if (mode == MODE_STOCHASTIC) {
        int R = p->rbits;
        uint64_t frac = s >= R ? dropped >> (s - R) : dropped << (R - s);
        return (random_bits(p, i) + frac) >> R;
    }
    return 0;
}

/* k * 2**(esub - m) as a bit pattern (exact: k <= 2**m + 1 fits the container mantissa). */
static inline uint32_t from_quanta_k32(uint64_t k, const params_t *p) {
    float v = ldexpf((float)k, p->esub - p->m);
    uint32_t b; memcpy(&b, &v, 4); return b;
}
static inline uint64_t from_quanta_k64(uint64_t k, const params_t *p) {
    double v = ldexp((double)k, p->esub - p->m);
    uint64_t b; memcpy(&b, &v, 8); return b;
}

/* Band (max_sub, min_normal) of "bias" subnormals: choose between the two neighbours.
 * D and W are counted in units of 2**(emin - 2 - CM), where the band's values are integers. */
#define DEFINE_GAP(NAME, UINT, FT, CM, CB, LDEXP, FREXP_BITS)                               \
static inline UINT gap_round_##NAME(const params_t *p, UINT a, uint64_t i) {                \
    FT x; memcpy(&x, &a, sizeof x);                                                         \
    FT lo; memcpy(&lo, &p->maxsub_bits, sizeof lo);                                         \
    uint64_t D = (uint64_t)LDEXP(x - lo, CM + 2 - p->emin);                                 \
    uint64_t W = ((uint64_t)1 << (CM + 2)) - (((uint64_t)1 << p->m) - 1) * ((uint64_t)1 << (CM + 1 - p->m)); \
    uint64_t up;                                                                            \
    if (p->mode == MODE_NEAREST) up = 2 * D >= W;                                           \
    else if (p->mode == MODE_TOWARD_ZERO) up = 0;                                           \
    else {                                                                                  \
        uint64_t frac = 0, d = D;                                                           \
        for (int b = 0; b < p->rbits; b++) { d <<= 1; frac <<= 1; if (d >= W) { d -= W; frac |= 1; } } \
        up = (random_bits(p, i) + frac) >> p->rbits;                                        \
    }                                                                                       \
    return up ? (UINT)p->minnorm_bits : (UINT)p->maxsub_bits;                               \
}

DEFINE_GAP(k32, uint32_t, float, 23, 127, ldexpf, 0)
DEFINE_GAP(k64, uint64_t, double, 52, 1023, ldexp, 0)
/* CM: container mantissa bits, CB: container exponent bias.
 *
 * NAME##_one rounds one element exactly as the header says.  NAME##_block is the fast
 * path: a branch-free, vectorisable pass that is exact for zeros and for inputs in the
 * target's normal range whose result stays finite; a second pass redoes, with _one, only
 * the elements outside that case (subnormal range, overflow, inf, NaN).  Each loop is
 * inlined once per rounding mode so that the mode's test leaves the loop. */
#define DEFINE_KERNEL(NAME, UINT, CM, CB)                                                   \
static inline __attribute__((always_inline)) UINT                                           \
NAME##_one(UINT u, uint64_t i, const params_t *p, const int mode, counts_t *c) {            \
    const UINT signbit = (UINT)1 << (sizeof(UINT) * 8 - 1);                                 \
    const UINT infpat = (UINT)(((UINT)1 << (sizeof(UINT) * 8 - 1 - CM)) - 1) << CM;         \
    const UINT implicit = (UINT)1 << CM;                                                    \
    const UINT emin_pat = (UINT)(p->emin + CB) << CM;                                       \
    const int s_norm = CM - p->m;                                                           \
    UINT sign = u & signbit, a = u & ~signbit, res;                                         \
    if (a >= infpat) {                                                                      \
        c->nonfinite++;                                                                     \
        return a > infpat ? (u | ((UINT)1 << (CM - 1))) : (sign | (UINT)p->inf_bits);      \
    }                                                                                       \
    if (a >= emin_pat) {                                                                    \
        res = (UINT)((a >> s_norm << s_norm) + (round_up(p, mode, a, s_norm, i) << s_norm)); \
    } else if (a == 0) {                                                                    \
        return u;                                                                           \
    } else if (p->gap && a > (UINT)p->maxsub_bits) {                                        \
        res = gap_round_##NAME(p, a, i);                                                    \
    } else {                                                                                \
        int e = (int)(a >> CM) - CB;                                                        \
        int ein = e < 1 - CB ? 1 - CB : e;                                                  \
        uint64_t sig = (uint64_t)((a & (implicit - 1)) | (e < 1 - CB ? 0 : implicit));      \
        int s = CM - p->m + p->esub - ein;                                                  \
        uint64_t k = (s > 62 ? 0 : sig >> s) + round_up(p, mode, sig, s, i);                 \
        res = k == 0 ? 0 : from_quanta_##NAME(k, p);                                        \
    }                                                                                       \
    if (res > (UINT)p->max_bits) {                                                          \
        c->overflow++;                                                                      \
        res = p->overflow == 0 ? infpat                                                     \
            : p->overflow == 1 ? (UINT)p->max_bits : (UINT)p->nan_bits;                     \
    } else if (p->ftz && res < (UINT)p->minnorm_bits) {                                     \
        res = 0;                                                                            \
    }                                                                                       \
    c->underflow += res == 0;                                                               \
    return sign | res;                                                                      \
}                                                                                           \
/* the fast formula: exact for zeros and normal-range results up to max */              \
static inline __attribute__((always_inline)) UINT                                           \
NAME##_fast(UINT a, uint32_t idx, int s, int R, UINT mask, UINT half1, uint32_t k0,         \
            uint32_t k1, const int mode) {                                                  \
    if (mode == MODE_NEAREST) return (UINT)((a + half1 + (s ? (a >> s) & 1 : 0)) & ~mask);  \
    if (mode == MODE_TOWARD_ZERO) return (UINT)(a & ~mask);                                 \
    UINT dropped = a & mask;                                                                \
    UINT frac = s >= R ? dropped >> (s - R) : dropped << (R - s);                           \
    UINT r = (UINT)(lowbias32(lowbias32(idx + k0) ^ k1) >> (32 - R));                       \
    return (UINT)((a & ~mask) + (((r + frac) >> R) << s));                                  \
}                                                                                           \
static inline __attribute__((always_inline)) void                                           \
NAME##_block(const UINT *src, UINT *dst, Py_ssize_t n, uint64_t base,                       \
             const params_t *p, const int mode, counts_t *c) {                              \
    const UINT signbit = (UINT)1 << (sizeof(UINT) * 8 - 1);                                 \
    const UINT emin_pat = (UINT)(p->emin + CB) << CM;                                       \
    const int s = CM - p->m, R = p->rbits;                                                  \
    const UINT mask = s ? (UINT)(((UINT)1 << s) - 1) : 0, maxb = (UINT)p->max_bits;         \
    const UINT half1 = s ? (UINT)(((UINT)1 << (s - 1)) - 1) : 0;                            \
    const uint32_t k0 = p->key0, k1 = p->key1, base32 = (uint32_t)base;                     \
    /* Special elements: nonzero below the normal range, or beyond max (inf and NaN too);  \
     * a magnitude up to max never rounds past it, since max is a value of the format and  \
     * rounding is monotonic. Pass 1 writes them back unchanged, so that dst may be src;   \
     * pass 2 finds them by the same test (a rounded value is never special) and rounds   \
     * them one by one. */                                                                 \
    UINT bad = 0;                                                                           \
    /* src and dst are the same buffer or disjoint: no iteration reads another's write */ \
    _Pragma("GCC ivdep")                                                                    \
    for (Py_ssize_t j = 0; j < n; j++) {                                                    \
        UINT u = src[j], a = u & ~signbit;                                                  \
        UINT res = NAME##_fast(a, base32 + (uint32_t)j, s, R, mask, half1, k0, k1, mode);   \
        UINT sp = ((UINT)(a - 1) < (UINT)(emin_pat - 1)) | (a > maxb);                      \
        bad |= sp;                                                                          \
        dst[j] = sp ? u : ((u & signbit) | res);                                            \
    }                                                                                       \
    if (!bad) return;                                                                       \
    for (Py_ssize_t j = 0; j < n; j++) {                                                    \
        UINT u = dst[j], a = u & ~signbit;                                                  \
        if ((UINT)(a - 1) < (UINT)(emin_pat - 1) || a > maxb)                               \
            dst[j] = NAME##_one(u, base + j, p, mode, c);                                   \
    }                                                                                       \
}                                                                                           \
TARGETS static void NAME(const UINT *src, UINT *dst, Py_ssize_t start, Py_ssize_t end,      \
                         const params_t *p, counts_t *c) {                                  \
    const params_t local = *p;                                                              \
    for (Py_ssize_t b = start; b < end; b += BLOCK) {                                       \
        Py_ssize_t len = end - b < BLOCK ? end - b : BLOCK;                                 \
        if (local.mode == MODE_NEAREST)                                                     \
            NAME##_block(src + b, dst + b, len, (uint64_t)b, &local, MODE_NEAREST, c);         \
        else if (local.mode == MODE_STOCHASTIC)                                             \
            NAME##_block(src + b, dst + b, len, (uint64_t)b, &local, MODE_STOCHASTIC, c);      \
        else                                                                                \
            NAME##_block(src + b, dst + b, len, (uint64_t)b, &local, MODE_TOWARD_ZERO, c);     \
    }                                                                                       \
}

#define BLOCK 4096
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TARGETS
#endif

DEFINE_KERNEL(k32, uint32_t, 23, 127)
DEFINE_KERNEL(k64, uint64_t, 52, 1023)

/* Large buffers are split into contiguous ranges of whole blocks, one per thread: a small
 * pool of persistent workers (created on first use, recreated after fork) takes all ranges
 * but the first, which the calling thread rounds.  Each element's result depends only on
 * its value and index, so the split never changes a bit; counts are summed. */
#define MAX_THREADS 8
#define SPLIT_MIN (16 * BLOCK)

typedef struct {
    const void *src; void *dst; Py_ssize_t start, end; int width; params_t p; counts_t c;
} job_t;

static void run_job(job_t *j) {
    if (j->width == 32) k32((const uint32_t *)j->src, (uint32_t *)j->dst, j->start, j->end, &j->p, &j->c);
    else k64((const uint64_t *)j->src, (uint64_t *)j->dst, j->start, j->end, &j->p, &j->c);
}

static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static job_t pool_jobs[MAX_THREADS];
static unsigned long pool_gen = 0;
static int pool_workers = 0, pool_pending = 0, pool_active = 0;
static unsigned long pool_born[MAX_THREADS];  /* the generation each worker starts after */

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    fesetenv(FE_DFL_ENV);  /* whatever its creator's, no flush of subnormals here */
    pthread_mutex_lock(&pool_mu);
    unsigned long seen = pool_born[id];
    for (;;) {
        while (pool_gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_gen;
        if (id >= pool_active) continue;
        pthread_mutex_unlock(&pool_mu);
        run_job(&pool_jobs[id]);
        pthread_mutex_lock(&pool_mu);
        if (--pool_pending == 0) pthread_cond_signal(&pool_done);
    }
    return NULL;
}

static void after_fork_child(void) {  /* the workers did not survive the fork */
    pthread_mutex_init(&pool_busy, NULL); pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_go, NULL); pthread_cond_init(&pool_done, NULL);
    pool_workers = 0; pool_pending = 0; pool_gen = 0;
}

/* Round [0, n) with up to `threads` threads; falls back to one when the pool is in use.
 * The calling thread runs in the default floating-point environment meanwhile: a caller
 * may flush subnormals (XLA's threads do; torch.set_flush_denormal), which the kernel's
 * subnormal path must not. */
static void split(job_t *whole, Py_ssize_t n, int threads, counts_t *c);

static void run_split(job_t *whole, Py_ssize_t n, int threads, counts_t *c) {
    fenv_t env;
    fegetenv(&env);
    fesetenv(FE_DFL_ENV);
    split(whole, n, threads, c);
    fesetenv(&env);
}

static void split(job_t *whole, Py_ssize_t n, int threads, counts_t *c) {
    Py_ssize_t blocks = (n + BLOCK - 1) / BLOCK;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
    if (threads < 2 || n < SPLIT_MIN || pthread_mutex_trylock(&pool_busy) != 0) {
        whole->start = 0; whole->end = n; run_job(whole); *c = whole->c; return;
    }
    pthread_mutex_lock(&pool_mu);
    while (pool_workers < threads - 1) {
        pthread_t t;
        pool_born[pool_workers + 1] = pool_gen;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(pool_workers + 1)) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    if (pool_workers + 1 < threads) threads = pool_workers + 1;
    for (int i = 0; i < threads; i++) {
        pool_jobs[i] = *whole;
        pool_jobs[i].start = blocks * i / threads * BLOCK;
        pool_jobs[i].end = i + 1 == threads ? n : blocks * (i + 1) / threads * BLOCK;
    }
    pool_active = threads; pool_pending = threads - 1;
    if (threads > 1) { pool_gen++; pthread_cond_broadcast(&pool_go); }
    pthread_mutex_unlock(&pool_mu);
    run_job(&pool_jobs[0]);
    pthread_mutex_lock(&pool_mu);
    while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
    for (int i = 0; i < threads; i++) {
        c->overflow += pool_jobs[i].c.overflow; c->underflow += pool_jobs[i].c.underflow;
        c->nonfinite += pool_jobs[i].c.nonfinite;
    }
    pthread_mutex_unlock(&pool_busy);
}

static PyObject *quantize(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    params_t p;
    unsigned long long max_bits, inf_bits, maxsub_bits, minnorm_bits, nan_bits;
    unsigned int key0, key1;
    int width, threads = 1;
    if (!PyArg_ParseTuple(args, "y*w*iiiiiiiiiKKKKKII|i", &src, &dst, &width, &p.m, &p.emin,
                          &p.esub, &p.ftz, &p.gap, &p.overflow, &p.mode, &p.rbits, &max_bits,
                          &inf_bits, &maxsub_bits, &minnorm_bits, &nan_bits, &key0, &key1,
                          &threads))
        return NULL;
    p.max_bits = max_bits; p.inf_bits = inf_bits; p.maxsub_bits = maxsub_bits;
    p.minnorm_bits = minnorm_bits; p.nan_bits = nan_bits; p.key0 = key0; p.key1 = key1;
    if (src.len != dst.len || (width != 32 && width != 64) || src.len % (width / 8)) {
        PyBuffer_Release(&src); PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "quantize: buffers must match and hold whole floats");
        return NULL;
    }
    Py_ssize_t n = src.len / (width / 8);
    counts_t c = {0, 0, 0};
    job_t whole = {src.buf, dst.buf, 0, n, width, p, {0, 0, 0}};
    Py_BEGIN_ALLOW_THREADS
    run_split(&whole, n, threads, &c);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src); PyBuffer_Release(&dst);
    return Py_BuildValue("(KKK)", (unsigned long long)c.overflow,
                         (unsigned long long)c.underflow, (unsigned long long)c.nonfinite);
}

/* The kernel as an XLA FFI handler (target "hwport_round", CPU), so that a jitted JAX
 * program rounds and counts in this one pass, as the torch engine does, rather than in
 * XLA's own operations plus a reduction per rounding site.
 *   argument: x, float32 or float64, any shape;
 *   results:  x rounded (same type and shape), int32[3] counts (overflow, underflow,
 *             non-finite input), as quantize() returns them;
 *   attribute "params": int64[14], (width, m, emin, esub, ftz, gap, overflow, mode, rbits,
 *             max_bits, inf_bits, maxsub_bits, minnorm_bits, nan_bits).
 * Stochastic rounding is not served here (its keys are traced values). */
#define FFI_NPARAMS 14

static XLA_FFI_Error *ffi_fail(const XLA_FFI_Api *api, const char *msg) {
    XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL, msg,
                                      XLA_FFI_Error_Code_INVALID_ARGUMENT};
    return api->XLA_FFI_Error_Create(&args);
}

static int ffi_width(XLA_FFI_DataType t) {
    return t == XLA_FFI_DataType_F32 ? 32 : t == XLA_FFI_DataType_F64 ? 64 : 0;
}

static XLA_FFI_Error *ffi_round(XLA_FFI_CallFrame *call) {
    XLA_FFI_Extension_Base *ext = call->extension_start;
    if (ext != NULL && ext->type == XLA_FFI_Extension_Metadata) {  /* XLA asks our version */
        XLA_FFI_Metadata *m = ((XLA_FFI_Metadata_Extension *)ext)->metadata;
        if (ext->struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE ||
            m->struct_size < XLA_FFI_Metadata_STRUCT_SIZE)
            return ffi_fail(call->api, "hwport_round: XLA's metadata structs are older "
                                       "than the FFI header hwport was built with");
        m->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
        m->api_version.extension_start = NULL;
        m->api_version.major_version = XLA_FFI_API_MAJOR;
        m->api_version.minor_version = XLA_FFI_API_MINOR;
        m->traits = 0;
        m->state_type_id.type_id = 0;  /* XLA_FFI_UNKNOWN_TYPE_ID: a stateless handler */
        return NULL;
    }
    const XLA_FFI_Api *api = call->api;
    if (call->stage != XLA_FFI_ExecutionStage_EXECUTE)
        return ffi_fail(api, "hwport_round: called outside the execute stage");
    if (call->args.size != 1 || call->args.types[0] != XLA_FFI_ArgType_BUFFER ||
        call->rets.size != 2 || call->rets.types[0] != XLA_FFI_RetType_BUFFER ||
        call->rets.types[1] != XLA_FFI_RetType_BUFFER)
        return ffi_fail(api, "hwport_round: takes one buffer and returns two");
    if (call->attrs.size != 1 || call->attrs.types[0] != XLA_FFI_AttrType_ARRAY ||
        call->attrs.names[0]->len != 6 || memcmp(call->attrs.names[0]->ptr, "params", 6))
        return ffi_fail(api, "hwport_round: takes one attribute, params");
    const XLA_FFI_Array *a = (const XLA_FFI_Array *)call->attrs.attrs[0];
    const XLA_FFI_Buffer *x = (const XLA_FFI_Buffer *)call->args.args[0];
    XLA_FFI_Buffer *y = (XLA_FFI_Buffer *)call->rets.rets[0];
    XLA_FFI_Buffer *cnt = (XLA_FFI_Buffer *)call->rets.rets[1];
    if (a->dtype != XLA_FFI_DataType_S64 || a->size != FFI_NPARAMS)
        return ffi_fail(api, "hwport_round: params must be int64[14]");
    const int64_t *v = (const int64_t *)a->data;
    int width = ffi_width(x->dtype);
    if (width == 0 || width != v[0] || y->dtype != x->dtype || y->rank != x->rank)
        return ffi_fail(api, "hwport_round: x and its result must be float32 or float64, "
                             "the width params name");
    if (cnt->dtype != XLA_FFI_DataType_S32 || cnt->rank != 1 || cnt->dims[0] != 3)
        return ffi_fail(api, "hwport_round: the counts result must be int32[3]");
    if (v[7] == MODE_STOCHASTIC)
        return ffi_fail(api, "hwport_round: stochastic rounding needs keys; not served here");
    Py_ssize_t n = 1;
    for (int64_t d = 0; d < x->rank; d++) {
        if (x->dims[d] != y->dims[d])
            return ffi_fail(api, "hwport_round: x and its result differ in shape");
        n *= (Py_ssize_t)x->dims[d];
    }
    params_t p = {(int)v[1], (int)v[2], (int)v[3], (int)v[4], (int)v[5], (int)v[6],
                  (int)v[7], (int)v[8], (uint64_t)v[9], (uint64_t)v[10], (uint64_t)v[11],
                  (uint64_t)v[12], (uint64_t)v[13], 0, 0};
    job_t job = {x->data, y->data, 0, n, width, p, {0, 0, 0}};
    counts_t k = {0, 0, 0};
    run_split(&job, n, 1, &k);  /* one thread: XLA runs other operations on the others */
    int32_t *c = (int32_t *)cnt->data;
    c[0] = (int32_t)k.overflow; c[1] = (int32_t)k.underflow; c[2] = (int32_t)k.nonfinite;
    return NULL;
}

static PyMethodDef methods[] = {
    {"quantize", quantize, METH_VARARGS,
     "Round a float32/float64 buffer into another (or itself), with up to `threads` "
     "threads; returns (overflow, underflow-to-zero, non-finite input) counts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *handler = PyCapsule_New((void *)ffi_round, NULL, NULL);
    if (handler == NULL || PyModule_AddObject(m, "ffi_round", handler) < 0) {
        Py_XDECREF(handler); Py_DECREF(m); return NULL;
    }
    return m;
}
