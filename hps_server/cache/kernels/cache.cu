// L1 embedding cache kernels: a set-associative LRU cache (one warp compares a set's ways) and a static
// table (open addressing). gpu.py drives them; reference.py states the algorithm they must reproduce.
//
// Layout of the cache: per slot a 16-bit fingerprint (0: empty), a Slot {int64 key, int64 stamp (the
// logical clock of its last use; 0: empty)} and a row of `dim` elements of T (float, or float16 bits).
// Slot index = set * ways + way. A query reads its set's fingerprints (2 bytes a way: a 32-way set is
// one 64-byte line), checks the full key only where a fingerprint matched, and stamps the slot it
// found: the stamp shares the key's 16 bytes, so the write lands in a sector the check just read.

typedef long long i64;
typedef unsigned long long u64;
// float16 storage as raw bits, converted with PTX's cvt (no header needed under NVRTC).
typedef unsigned short f16;

#define FULL 0xffffffffu
// Hits are counted into this many counters (gpu.py sums them), so that one batch's warps do not all
// queue on a single address.
#define HIT_COUNTERS 64
#define I64_MAX 0x7fffffffffffffffll
#define I64_MIN (-I64_MAX - 1)

__device__ __forceinline__ f16 to_f16(float v) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
__device__ __forceinline__ float from_f16(f16 h) {
    float v;
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
    return v;
}

// splitmix64's finalizer; layout.mix() in Python is the same function.
__device__ __forceinline__ u64 mix(u64 x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ unsigned set_of(u64 h, unsigned num_sets) {
    return (unsigned)(((h >> 32) * (u64)num_sets) >> 32);
}

typedef unsigned short fp16;

__device__ __forceinline__ fp16 fingerprint(u64 h) {
    const fp16 f = (fp16)h;  // the low bits: set_of() uses the high ones
    return f ? f : (fp16)1;
}

struct __align__(16) Slot {
    i64 key;
    i64 stamp;
};

// ---------------------------------------------------------------- row copies

__device__ __forceinline__ float4 load4(const float* row, int c) {
    return reinterpret_cast<const float4*>(row)[c];
}
__device__ __forceinline__ float4 load4(const f16* row, int c) {
    const uint2 u = reinterpret_cast<const uint2*>(row)[c];
    return make_float4(from_f16((f16)(u.x & 0xffff)), from_f16((f16)(u.x >> 16)), from_f16((f16)(u.y & 0xffff)),
                       from_f16((f16)(u.y >> 16)));
}
__device__ __forceinline__ void store4(float* row, int c, float4 v) {
    reinterpret_cast<float4*>(row)[c] = v;
}
__device__ __forceinline__ void store4(f16* row, int c, float4 v) {
    uint2 u;
    u.x = (unsigned)to_f16(v.x) | ((unsigned)to_f16(v.y) << 16);
    u.y = (unsigned)to_f16(v.z) | ((unsigned)to_f16(v.w) << 16);
    reinterpret_cast<uint2*>(row)[c] = u;
}
__device__ __forceinline__ float load1(const float* row, int c) { return row[c]; }
__device__ __forceinline__ float load1(const f16* row, int c) { return from_f16(row[c]); }
__device__ __forceinline__ void store1(float* row, int c, float v) { row[c] = v; }
__device__ __forceinline__ void store1(f16* row, int c, float v) { row[c] = to_f16(v); }

// The warp copies the rows of its `count` keys into `out`: key j of the group (held by lane j) reads
// row `src` (-1: write zeros). All lanes share every row, so small dims still keep the warp busy.
template <typename T>
__device__ __forceinline__ void gather_rows(const T* __restrict__ rows, i64 src, int count, int dim,
                                            float* __restrict__ out, int lane) {
    if ((dim & 3) == 0) {
        const int d4 = dim >> 2;
        const int total = count * d4;
#pragma unroll 8
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = idx / d4;
            const i64 r = __shfl_sync(FULL, src, j < 32 ? j : 31);
            if (idx < total) {
                const int c = idx - j * d4;
                float4 v = r >= 0 ? load4(rows + r * dim, c) : make_float4(0.f, 0.f, 0.f, 0.f);
                store4(out + (i64)j * dim, c, v);
            }
        }
    } else {
        const int total = count * dim;
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = idx / dim;
            const i64 r = __shfl_sync(FULL, src, j < 32 ? j : 31);
            if (idx < total) {
                const int c = idx - j * dim;
                out[(i64)j * dim + c] = r >= 0 ? load1(rows + r * dim, c) : 0.f;
            }
        }
    }
}

// The warp writes float32 rows `src` (row index into `in`) into slots `dst` of the table (-1: skip).
template <typename T>
__device__ __forceinline__ void scatter_rows(T* __restrict__ rows, i64 dst, const float* __restrict__ in, i64 src,
                                             int count, int dim, int lane) {
    if ((dim & 3) == 0) {
        const int d4 = dim >> 2;
        const int total = count * d4;
#pragma unroll 8
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = idx / d4;
            const i64 d = __shfl_sync(FULL, dst, j < 32 ? j : 31);
            const i64 s = __shfl_sync(FULL, src, j < 32 ? j : 31);
            if (idx < total && d >= 0) {
                const int c = idx - j * d4;
                store4(rows + d * dim, c, load4(in + s * dim, c));
            }
        }
    } else {
        const int total = count * dim;
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = idx / dim;
            const i64 d = __shfl_sync(FULL, dst, j < 32 ? j : 31);
            const i64 s = __shfl_sync(FULL, src, j < 32 ? j : 31);
            if (idx < total && d >= 0) {
                const int c = idx - j * dim;
                store1(rows + d * dim, c, in[s * dim + c]);
            }
        }
    }
}

// ---------------------------------------------------------------- set lookup

// Each lane holds one key of the warp's group of 32; returns, in each lane, the slot of its key (-1:
// absent). For every key of the group the warp reads that key's set, lane = way, and votes. The three
// passes are unrolled so that all 32 sets' fingerprint lines, then all key checks, are in flight at
// once: the walk is bound by memory bandwidth, not by one set's latency after another.
__device__ __forceinline__ i64 find_in_sets(i64 key, bool valid, const fp16* __restrict__ fps,
                                            const Slot* __restrict__ slots, unsigned num_sets, int ways, int lane) {
    const u64 h = mix((u64)key);
    const unsigned s = set_of(h, num_sets);
    const unsigned f = valid ? fingerprint(h) : 0u;  // 0 never matches a held slot's fingerprint
    const bool real = lane < ways;
    unsigned line[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const unsigned sj = __shfl_sync(FULL, s, j);
        line[j] = real ? (unsigned)__ldg(fps + (i64)sj * ways + lane) : 0u;
    }
    unsigned candidate = 0;  // bit j: this lane's way holds key j's fingerprint
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const unsigned fj = __shfl_sync(FULL, f, j);
        if (fj && line[j] == fj) candidate |= 1u << j;
    }
    unsigned confirmed = 0;  // bit j: ... and key j itself
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const i64 kj = __shfl_sync(FULL, key, j);
        const unsigned sj = __shfl_sync(FULL, s, j);
        if ((candidate >> j & 1u) && slots[(i64)sj * ways + lane].key == kj) confirmed |= 1u << j;
    }
    i64 mine = -1;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const unsigned m = __ballot_sync(FULL, confirmed >> j & 1u);
        if (lane == j && m) mine = (i64)s * ways + (__ffs(m) - 1);
    }
    return mine;
}

// ---------------------------------------------------------------- cache kernels

// Warp per 32 keys: rows of hits into out (zeros for misses), hit flags, hit slots stamped `clock`,
// hit count added to hit_counts[blockIdx.x % HIT_COUNTERS].
template <typename T>
__device__ void query_impl(const i64* __restrict__ qkeys, i64 n, const fp16* __restrict__ fps,
                           Slot* __restrict__ slots, const T* __restrict__ rows,
                           unsigned num_sets, int ways, int dim, i64 clock, float* __restrict__ out,
                           bool* __restrict__ hit, u64* __restrict__ hit_count) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool valid = i < n;
    const i64 key = valid ? qkeys[i] : 0;
    const i64 slot = find_in_sets(key, valid, fps, slots, num_sets, ways, lane);
    if (valid) {
        hit[i] = slot >= 0;
        if (slot >= 0) slots[slot].stamp = clock;
    }
    const unsigned hits = __ballot_sync(FULL, slot >= 0);
    if (lane == 0 && hits) atomicAdd(hit_count + blockIdx.x % HIT_COUNTERS, (u64)__popc(hits));
    const int count = (int)min((i64)32, n - base);
    gather_rows(rows, slot, count, dim, out + base * dim, lane);
}

// Replace/update, pass 1. `last[pos[i]] == i` marks the last occurrence of each key in the batch; only
// those act. Present: row overwritten, stamped `clock` when clock > 0. absent_set[i]: the set of a key
// to insert, NO_SET for the others.
#define NO_SET 0xffffffffu

template <typename T>
__device__ void write_present_impl(const i64* __restrict__ qkeys, const float* __restrict__ in, i64 n,
                                   const int* __restrict__ last, const int* __restrict__ pos,
                                   const fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows,
                                   unsigned num_sets, int ways, int dim, i64 clock, unsigned* __restrict__ absent_set) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool valid = i < n && last[pos[i]] == (int)i;
    const i64 key = valid ? qkeys[i] : 0;
    const i64 slot = find_in_sets(key, valid, fps, slots, num_sets, ways, lane);
    if (i < n) absent_set[i] = valid && slot < 0 ? set_of(mix((u64)key), num_sets) : NO_SET;
    if (slot >= 0 && clock > 0) slots[slot].stamp = clock;
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, slot, in + base * dim, slot >= 0 ? (i64)lane : 0, count, dim, lane);
}

// Replace, pass 2. `sets` is absent_set sorted, `order` the batch positions in that order, so a set's
// keys to insert are contiguous: the warp at the start of each run inserts the whole run, holding the
// set's slots in registers (no locks, no atomics). Each key takes the least recently used slot not
// touched by this batch (stamp < touched), ordered by (stamp, key, way); once none is left it displaces
// the largest key this batch inserted, if smaller. So a set keeps the smallest of the keys competing
// for it, in whatever order they come: the rule reference.py states without any order. Slots are
// chosen first, from registers; then the rows of the keys that stayed are copied all at once.
template <typename T>
__device__ void insert_run(const i64* __restrict__ qkeys, const float* __restrict__ in, i64 n,
                           const unsigned* __restrict__ sets, const i64* __restrict__ order, fp16* __restrict__ fps,
                           Slot* __restrict__ slots, T* __restrict__ rows, int ways, int dim, i64 touched,
                           i64 inserted, i64 p, unsigned s, int lane) {
    const bool real = lane < ways;
    const i64 slot = (i64)s * ways + lane;
    const longlong2 held = real ? reinterpret_cast<const longlong2*>(slots)[slot] : make_longlong2(0, 0);
    i64 k = held.x, st = held.y;
    i64 src = -1;  // batch position of the key this lane's slot ends up holding, -1: unchanged
    for (i64 chunk = p; chunk < n; chunk += 32) {
        const i64 q = chunk + lane;
        const bool in_run = q < n && sets[q] == s;
        const i64 my_i = in_run ? order[q] : 0;
        const i64 my_key = in_run ? qkeys[my_i] : 0;
        const int count = __popc(__ballot_sync(FULL, in_run));  // the run is contiguous: lanes 0..count-1
        for (int j = 0; j < count; ++j) {
            const i64 key = __shfl_sync(FULL, my_key, j);
            const i64 i = __shfl_sync(FULL, my_i, j);
            // Best free slot: least (stamp, key, lane) among stamp < touched.
            const bool spare = real && st < touched;
            i64 bs = spare ? st : I64_MAX, bk = spare ? k : I64_MAX;
            int bl = spare ? lane : 32;
            // Largest key inserted by this batch: the one to displace when no slot is free.
            const bool mine = real && st == inserted;
            i64 mk = mine ? k : I64_MIN;
            int ml = mine ? lane : 32;
#pragma unroll
            for (int off = 16; off; off >>= 1) {
                const i64 os = __shfl_xor_sync(FULL, bs, off), ok = __shfl_xor_sync(FULL, bk, off);
                const int ol = __shfl_xor_sync(FULL, bl, off);
                if (os < bs || (os == bs && (ok < bk || (ok == bk && ol < bl)))) {
                    bs = os;
                    bk = ok;
                    bl = ol;
                }
                const i64 omk = __shfl_xor_sync(FULL, mk, off);
                const int oml = __shfl_xor_sync(FULL, ml, off);
                if (omk > mk || (omk == mk && oml < ml)) {
                    mk = omk;
                    ml = oml;
                }
            }
            const int way = bl < 32 ? bl : (ml < 32 && key < mk ? ml : -1);
            if (lane == way) {
                k = key;
                st = inserted;
                src = i;
            }
        }
        if (count < 32) break;
    }
    if (src >= 0) {
        slots[slot].key = k;
        slots[slot].stamp = st;
        fps[slot] = fingerprint(mix((u64)k));
    }
    scatter_rows(rows, src >= 0 ? slot : -1, in, src >= 0 ? src : 0, 32, dim, lane);
}

// Warp per 32 sorted positions: inserts the runs that start among them, one after the other. (A warp
// per position would leave most warps idle and their blocks holding the SM.)
template <typename T>
__device__ void insert_absent_impl(const i64* __restrict__ qkeys, const float* __restrict__ in, i64 n,
                                   const unsigned* __restrict__ sets, const i64* __restrict__ order,
                                   fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows, int ways,
                                   int dim, i64 touched, i64 inserted) {
    const i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * 32;
    const int lane = threadIdx.x & 31;
    if (base >= n) return;
    const i64 q = base + lane;
    const unsigned s = q < n ? sets[q] : NO_SET;
    const bool starts_run = s != NO_SET && (q == 0 || sets[q - 1] != s);
    for (unsigned starts = __ballot_sync(FULL, starts_run); starts; starts &= starts - 1) {
        const int j = __ffs(starts) - 1;
        insert_run(qkeys, in, n, sets, order, fps, slots, rows, ways, dim, touched, inserted, base + j,
                   __shfl_sync(FULL, s, j), lane);
    }
}

// Warp per 32 keys: present keys are emptied.
__device__ void invalidate_impl(const i64* __restrict__ qkeys, i64 n, fp16* fps, Slot* __restrict__ slots,
                                unsigned num_sets, int ways) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool valid = i < n;
    const i64 key = valid ? qkeys[i] : 0;
    const i64 slot = find_in_sets(key, valid, fps, slots, num_sets, ways, lane);
    __syncwarp();
    if (slot >= 0) {
        fps[slot] = 0;
        slots[slot].stamp = 0;
    }
}

// ---------------------------------------------------------------- batch de-duplication

// Thread per key: claims a slot of an open-addressing table (claim/last start at -1) and records the
// last index of each distinct key there; pos[i] is key i's slot.
extern "C" __global__ void dedupe(const i64* __restrict__ qkeys, i64 n, int* claim, int* last, int* pos,
                                  unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    unsigned p = (unsigned)mix((u64)key) & mask;
    while (true) {
        const int c = atomicCAS(claim + p, -1, (int)i);
        if (c == -1 || qkeys[c] == key) break;
        p = (p + 1) & mask;
    }
    atomicMax(last + p, (int)i);
    pos[i] = (int)p;
}

// ---------------------------------------------------------------- static table

// Open addressing with linear probing: slot_rows[p] = row of slot_keys[p], -1 empty. Rows are dead
// (live 0) after invalidate until replaced.
__device__ __forceinline__ i64 probe(i64 key, const i64* __restrict__ slot_keys, const int* __restrict__ slot_rows,
                                     unsigned mask) {
    unsigned p = (unsigned)mix((u64)key) & mask;
    while (true) {
        const int r = slot_rows[p];
        if (r < 0) return -1;
        if (slot_keys[p] == key) return r;
        p = (p + 1) & mask;
    }
}

extern "C" __global__ void static_build(const i64* __restrict__ qkeys, i64 n, i64* slot_keys, int* slot_rows,
                                        unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    unsigned p = (unsigned)mix((u64)key) & mask;
    while (atomicCAS(slot_rows + p, -1, -2) != -1) p = (p + 1) & mask;
    slot_keys[p] = key;
    __threadfence();
    atomicExch(slot_rows + p, (int)i);
}

template <typename T>
__device__ void static_query_impl(const i64* __restrict__ qkeys, i64 n, const i64* __restrict__ slot_keys,
                                  const int* __restrict__ slot_rows, const bool* __restrict__ live, unsigned mask,
                                  const T* __restrict__ rows, int dim, float* __restrict__ out,
                                  bool* __restrict__ hit, u64* __restrict__ hit_count) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    i64 row = -1;
    if (i < n) {
        row = probe(qkeys[i], slot_keys, slot_rows, mask);
        if (row >= 0 && !live[row]) row = -1;
        hit[i] = row >= 0;
    }
    const unsigned hits = __ballot_sync(FULL, row >= 0);
    if (lane == 0 && hits) atomicAdd(hit_count + blockIdx.x % HIT_COUNTERS, (u64)__popc(hits));
    const int count = (int)min((i64)32, n - base);
    gather_rows(rows, row, count, dim, out + base * dim, lane);
}

// revive = 1: replace (rows of known keys written, made live); 0: update (live rows only).
template <typename T>
__device__ void static_write_impl(const i64* __restrict__ qkeys, const float* __restrict__ in, i64 n,
                                  const int* __restrict__ last, const int* __restrict__ pos,
                                  const i64* __restrict__ slot_keys, const int* __restrict__ slot_rows,
                                  bool* __restrict__ live, unsigned mask, T* __restrict__ rows, int dim, int revive) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    i64 row = -1;
    if (i < n && last[pos[i]] == (int)i) {
        row = probe(qkeys[i], slot_keys, slot_rows, mask);
        if (row >= 0 && !revive && !live[row]) row = -1;
    }
    __syncwarp();
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, row, in + base * dim, row >= 0 ? (i64)lane : 0, count, dim, lane);
    if (row >= 0) live[row] = true;
}

extern "C" __global__ void static_invalidate(const i64* __restrict__ qkeys, i64 n, const i64* __restrict__ slot_keys,
                                             const int* __restrict__ slot_rows, bool* live, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 row = probe(qkeys[i], slot_keys, slot_rows, mask);
    if (row >= 0) live[row] = false;
}

// ---------------------------------------------------------------- the raw gather (benchmark ceiling)

extern "C" __global__ void gather_f32(const float* __restrict__ table, const i64* __restrict__ index, i64 n, int dim,
                                      float* __restrict__ out) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const i64 row = i < n ? index[i] : -1;
    gather_rows(table, row, (int)min((i64)32, n - base), dim, out + base * dim, lane);
}

// ---------------------------------------------------------------- entry points per storage type

#define CACHE_KERNELS(T, SUFFIX)                                                                                  \
    extern "C" __global__ void query_##SUFFIX(const i64* qkeys, i64 n, const fp16* fps, Slot* slots,              \
                                              const T* rows, unsigned num_sets, int ways, int dim,                \
                                              i64 clock, float* out, bool* hit, u64* hit_count) {                 \
        query_impl<T>(qkeys, n, fps, slots, rows, num_sets, ways, dim, clock, out, hit, hit_count);               \
    }                                                                                                             \
    extern "C" __global__ void write_present_##SUFFIX(const i64* qkeys, const float* in, i64 n, const int* last,  \
                                                      const int* pos, const fp16* fps, Slot* slots, T* rows,      \
                                                      unsigned num_sets, int ways, int dim,                       \
                                                      i64 clock, unsigned* absent_set) {                          \
        write_present_impl<T>(qkeys, in, n, last, pos, fps, slots, rows, num_sets, ways, dim, clock,              \
                              absent_set);                                                                        \
    }                                                                                                             \
    extern "C" __global__ void insert_absent_##SUFFIX(const i64* qkeys, const float* in, i64 n,                  \
                                                      const unsigned* sets, const i64* order, fp16* fps,          \
                                                      Slot* slots, T* rows, int ways, int dim, i64 touched,       \
                                                      i64 inserted) {                                             \
        insert_absent_impl<T>(qkeys, in, n, sets, order, fps, slots, rows, ways, dim, touched, inserted);         \
    }                                                                                                             \
    extern "C" __global__ void static_query_##SUFFIX(const i64* qkeys, i64 n, const i64* slot_keys,               \
                                                     const int* slot_rows, const bool* live, unsigned mask,       \
                                                     const T* rows, int dim, float* out, bool* hit,               \
                                                     u64* hit_count) {                                            \
        static_query_impl<T>(qkeys, n, slot_keys, slot_rows, live, mask, rows, dim, out, hit, hit_count);         \
    }                                                                                                             \
    extern "C" __global__ void static_write_##SUFFIX(const i64* qkeys, const float* in, i64 n, const int* last,   \
                                                     const int* pos, const i64* slot_keys, const int* slot_rows,  \
                                                     bool* live, unsigned mask, T* rows, int dim, int revive) {   \
        static_write_impl<T>(qkeys, in, n, last, pos, slot_keys, slot_rows, live, mask, rows, dim, revive);       \
    }

CACHE_KERNELS(float, f32)
CACHE_KERNELS(f16, f16)

extern "C" __global__ void invalidate(const i64* qkeys, i64 n, fp16* fps, Slot* slots,
                                      unsigned num_sets, int ways) {
    invalidate_impl(qkeys, n, fps, slots, num_sets, ways);
}
