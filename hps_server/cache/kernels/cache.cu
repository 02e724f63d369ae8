// L1 embedding cache kernels: a set-associative LRU cache (one warp compares a set's ways) and a static
// table (open addressing). gpu.py drives them; reference.py states the algorithm they must reproduce.
//
// One structure holds one or several tables of the same dim; every key comes with its table's index
// (qtables[i]). Cache: table t owns global sets [first_set[t], first_set[t] + num_sets[t]) and uses
// table_ways[t] of each set's `stride` slots; key k of table t lives in set first_set[t] +
// set_of(mix(k), num_sets[t]). Static table: slots are keyed by the (table, key) pair. A table index
// outside [0, num_tables) makes the key a miss that is never written or counted (device callers'
// arrays are not checked on the host).
//
// Layout of the cache: per slot a 16-bit fingerprint (0: empty), a Slot {int64 key, int64 stamp (the
// logical clock of its last use; 0: empty)} and a row of `dim` elements of T (float, or float16 bits).
// Slot index = set * stride + way. A query reads its set's fingerprints (2 bytes a way: a 32-way set is
// one 64-byte line), checks the full key only where a fingerprint matched, and stamps the slot it
// found: the stamp shares the key's 16 bytes, so the write lands in a sector the check just read.

typedef long long i64;
typedef unsigned long long u64;
// float16 storage as raw bits, converted with PTX's cvt (no header needed under NVRTC).
typedef unsigned short f16;

#define FULL 0xffffffffu
// Lookups are counted per table into counts[table][0: hits, 1: keys asked][HIT_COUNTERS] (gpu.py sums
// them), so that one batch's warps do not all queue on a single address.
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

// Hash of a (table, key) pair for open addressing; table 0's is mix(key).
__device__ __forceinline__ u64 pair_hash(i64 key, int table) {
    return mix((u64)key ^ ((u64)(unsigned)table * 0x9e3779b97f4a7c15ull));
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

// The warp copies the rows of its `count` keys into `out` (float or float16 bits: O): key j of the
// group (held by lane j) reads row `src` (-1: write zeros). All lanes share every row, so small dims
// still keep the warp busy.
template <typename T, typename O>
__device__ __forceinline__ void gather_rows(const T* __restrict__ rows, i64 src, int count, int dim,
                                            O* __restrict__ out, int lane) {
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
                store1(out + (i64)j * dim, c, r >= 0 ? load1(rows + r * dim, c) : 0.f);
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

// Where key `key` of table `t` lives: its global set `s` and fingerprint `f`. Returns false (s = 0, f = 0:
// matches nothing) where the lane holds no key or `t` is not a table of this cache.
__device__ __forceinline__ bool locate(i64 key, int t, bool valid, const unsigned* __restrict__ first_set,
                                       const unsigned* __restrict__ num_sets, int num_tables, unsigned& s,
                                       unsigned& f) {
    s = 0;
    f = 0;
    if (!valid || t < 0 || t >= num_tables) return false;
    const u64 h = mix((u64)key);
    s = __ldg(first_set + t) + set_of(h, __ldg(num_sets + t));
    f = fingerprint(h);
    return true;
}

// Each lane holds one key of the warp's group of 32, located in set `s` with fingerprint `f` (0: no
// key); returns, in each lane, the slot of its key (-1: absent). For every key of the group the warp
// reads that key's set, lane = way, and votes; a set holds one table's keys only, so the key compare
// is the (table, key) compare. Ways a table does not use hold fingerprint 0 and never match. The
// three passes are unrolled so that all 32 sets' fingerprint lines, then all key checks, are in flight
// at once: the walk is bound by memory bandwidth, not by one set's latency after another.
__device__ __forceinline__ i64 find_in_sets(i64 key, unsigned s, unsigned f, const fp16* __restrict__ fps,
                                            const Slot* __restrict__ slots, int stride, int lane) {
    const bool real = lane < stride;
    unsigned line[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const unsigned sj = __shfl_sync(FULL, s, j);
        line[j] = real ? (unsigned)__ldg(fps + (i64)sj * stride + lane) : 0u;
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
        if ((candidate >> j & 1u) && slots[(i64)sj * stride + lane].key == kj) confirmed |= 1u << j;
    }
    i64 mine = -1;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const unsigned m = __ballot_sync(FULL, confirmed >> j & 1u);
        if (lane == j && m) mine = (i64)s * stride + (__ffs(m) - 1);
    }
    return mine;
}

// Adds the warp's lookups to `counts` (see HIT_COUNTERS): the lowest lane of each table present in the
// warp adds for its table, so a warp whose keys share a table (the usual request) costs two atomics.
// All 32 lanes must call it.
__device__ __forceinline__ void count_lookups(int t, bool counted, bool found, u64* __restrict__ counts, int lane) {
    const unsigned hits = __ballot_sync(FULL, found);
    const unsigned same = __match_any_sync(FULL, counted ? t : -1);
    if (counted && __ffs(same) - 1 == lane) {
        u64* c = counts + (i64)t * 2 * HIT_COUNTERS + blockIdx.x % HIT_COUNTERS;
        const unsigned h = __popc(same & hits);
        if (h) atomicAdd(c, (u64)h);
        atomicAdd(c + HIT_COUNTERS, (u64)__popc(same));
    }
}

// ---------------------------------------------------------------- cache kernels

// Warp per 32 keys: rows of hits into out (zeros for misses), hit flags, hit slots stamped `clock`,
// lookups counted per table.
template <typename T, typename O>
__device__ void query_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                           const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                           int num_tables, const fp16* __restrict__ fps, Slot* __restrict__ slots,
                           const T* __restrict__ rows, int stride, int dim, i64 clock, O* __restrict__ out,
                           bool* __restrict__ hit, u64* __restrict__ counts) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool valid = i < n;
    const i64 key = valid ? qkeys[i] : 0;
    const int t = valid ? qtables[i] : 0;
    unsigned s, f;
    const bool known = locate(key, t, valid, first_set, num_sets, num_tables, s, f);
    const i64 slot = find_in_sets(key, s, f, fps, slots, stride, lane);
    if (valid) {
        hit[i] = slot >= 0;
        if (slot >= 0) slots[slot].stamp = clock;
    }
    count_lookups(t, known, slot >= 0, counts, lane);
    const int count = (int)min((i64)32, n - base);
    gather_rows(rows, slot, count, dim, out + base * dim, lane);
}

// Replace/update, pass 1. `last[pos[i]] == i` marks the last occurrence of each (table, key) pair in the
// batch; only those act. Present: row overwritten, stamped `clock` when clock > 0. absent_set[i]: the
// global set of a key to insert, NO_SET for the others.
#define NO_SET 0xffffffffu

template <typename T>
__device__ void write_present_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                   const float* __restrict__ in, i64 n, const int* __restrict__ last,
                                   const int* __restrict__ pos, const unsigned* __restrict__ first_set,
                                   const unsigned* __restrict__ num_sets, int num_tables,
                                   const fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows,
                                   int stride, int dim, i64 clock, unsigned* __restrict__ absent_set) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool last_of_pair = i < n && last[pos[i]] == (int)i;
    const i64 key = last_of_pair ? qkeys[i] : 0;
    const int t = last_of_pair ? qtables[i] : 0;
    unsigned s, f;
    const bool known = locate(key, t, last_of_pair, first_set, num_sets, num_tables, s, f);
    const i64 slot = find_in_sets(key, s, f, fps, slots, stride, lane);
    if (i < n) absent_set[i] = known && slot < 0 ? s : NO_SET;
    if (slot >= 0 && clock > 0) slots[slot].stamp = clock;
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, slot, in + base * dim, slot >= 0 ? (i64)lane : 0, count, dim, lane);
}

// Replace, pass 2. `sets` is absent_set sorted, `order` the batch positions in that order, so a set's
// keys to insert are contiguous (and of one table, whose ways the run uses): the warp at the start of
// each run inserts the whole run, holding the set's slots in registers (no locks, no atomics). Each key takes the least recently used slot not
// touched by this batch (stamp < touched), ordered by (stamp, key, way); once none is left it displaces
// the largest key this batch inserted, if smaller. So a set keeps the smallest of the keys competing
// for it, in whatever order they come: the rule reference.py states without any order. Slots are
// chosen first, from registers; then the rows of the keys that stayed are copied all at once.
template <typename T>
__device__ void insert_run(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                           const float* __restrict__ in, i64 n, const unsigned* __restrict__ sets,
                           const i64* __restrict__ order, const int* __restrict__ table_ways, fp16* __restrict__ fps,
                           Slot* __restrict__ slots, T* __restrict__ rows, int stride, int dim, i64 touched,
                           i64 inserted, i64 p, unsigned s, int lane) {
    const bool real = lane < __ldg(table_ways + qtables[order[p]]);
    const i64 slot = (i64)s * stride + lane;
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
__device__ void insert_absent_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                   const float* __restrict__ in, i64 n, const unsigned* __restrict__ sets,
                                   const i64* __restrict__ order, const int* __restrict__ table_ways,
                                   fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows, int stride,
                                   int dim, i64 touched, i64 inserted) {
    const i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * 32;
    const int lane = threadIdx.x & 31;
    if (base >= n) return;
    const i64 q = base + lane;
    const unsigned s = q < n ? sets[q] : NO_SET;
    const bool starts_run = s != NO_SET && (q == 0 || sets[q - 1] != s);
    for (unsigned starts = __ballot_sync(FULL, starts_run); starts; starts &= starts - 1) {
        const int j = __ffs(starts) - 1;
        insert_run(qkeys, qtables, in, n, sets, order, table_ways, fps, slots, rows, stride, dim, touched, inserted,
                   base + j, __shfl_sync(FULL, s, j), lane);
    }
}

// Warp per 32 keys: present keys are emptied.
__device__ void invalidate_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                                int num_tables, fp16* fps, Slot* __restrict__ slots, int stride) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const bool valid = i < n;
    const i64 key = valid ? qkeys[i] : 0;
    unsigned s, f;
    locate(key, valid ? qtables[i] : 0, valid, first_set, num_sets, num_tables, s, f);
    const i64 slot = find_in_sets(key, s, f, fps, slots, stride, lane);
    __syncwarp();
    if (slot >= 0) {
        fps[slot] = 0;
        slots[slot].stamp = 0;
    }
}

// ---------------------------------------------------------------- batch de-duplication

// Thread per key: claims a slot of an open-addressing table (claim/last start at -1) and records the
// last index of each distinct (table, key) pair there; pos[i] is key i's slot. Pairs are compared
// exactly: a false duplicate would skip a write.
extern "C" __global__ void dedupe(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n, int* claim,
                                  int* last, int* pos, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    const int t = qtables[i];
    unsigned p = (unsigned)pair_hash(key, t) & mask;
    while (true) {
        const int c = atomicCAS(claim + p, -1, (int)i);
        if (c == -1 || (qkeys[c] == key && qtables[c] == t)) break;
        p = (p + 1) & mask;
    }
    atomicMax(last + p, (int)i);
    pos[i] = (int)p;
}

// ---------------------------------------------------------------- static table

// Open addressing with linear probing over (table, key) pairs: slot_rows[p] = row of the pair
// (slot_tables[p], slot_keys[p]), -1 empty. Rows are dead (live 0) after invalidate until replaced.
// A table index outside [0, num_tables) finds nothing.
__device__ __forceinline__ i64 probe(i64 key, int t, int num_tables, const i64* __restrict__ slot_keys,
                                     const int* __restrict__ slot_tables, const int* __restrict__ slot_rows,
                                     unsigned mask) {
    if (t < 0 || t >= num_tables) return -1;
    unsigned p = (unsigned)pair_hash(key, t) & mask;
    while (true) {
        const int r = slot_rows[p];
        if (r < 0) return -1;
        if (slot_keys[p] == key && slot_tables[p] == t) return r;
        p = (p + 1) & mask;
    }
}

// Thread per distinct pair (the host removed repeats): row i goes into the first free slot of its probe.
extern "C" __global__ void static_build(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                        i64* slot_keys, int* slot_tables, int* slot_rows, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    const int t = qtables[i];
    unsigned p = (unsigned)pair_hash(key, t) & mask;
    while (atomicCAS(slot_rows + p, -1, -2) != -1) p = (p + 1) & mask;
    slot_keys[p] = key;
    slot_tables[p] = t;
    __threadfence();
    atomicExch(slot_rows + p, (int)i);
}

template <typename T, typename O>
__device__ void static_query_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                  int num_tables, const i64* __restrict__ slot_keys,
                                  const int* __restrict__ slot_tables, const int* __restrict__ slot_rows,
                                  const bool* __restrict__ live, unsigned mask, const T* __restrict__ rows, int dim,
                                  O* __restrict__ out, bool* __restrict__ hit, u64* __restrict__ counts) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const int t = i < n ? qtables[i] : 0;
    i64 row = -1;
    if (i < n) {
        row = probe(qkeys[i], t, num_tables, slot_keys, slot_tables, slot_rows, mask);
        if (row >= 0 && !live[row]) row = -1;
        hit[i] = row >= 0;
    }
    count_lookups(t, i < n && t >= 0 && t < num_tables, row >= 0, counts, lane);
    const int count = (int)min((i64)32, n - base);
    gather_rows(rows, row, count, dim, out + base * dim, lane);
}

// revive = 1: replace (rows of known keys written, made live); 0: update (live rows only).
template <typename T>
__device__ void static_write_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                  const float* __restrict__ in, i64 n, const int* __restrict__ last,
                                  const int* __restrict__ pos, int num_tables, const i64* __restrict__ slot_keys,
                                  const int* __restrict__ slot_tables, const int* __restrict__ slot_rows,
                                  bool* __restrict__ live, unsigned mask, T* __restrict__ rows, int dim, int revive) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    i64 row = -1;
    if (i < n && last[pos[i]] == (int)i) {
        row = probe(qkeys[i], qtables[i], num_tables, slot_keys, slot_tables, slot_rows, mask);
        if (row >= 0 && !revive && !live[row]) row = -1;
    }
    __syncwarp();
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, row, in + base * dim, row >= 0 ? (i64)lane : 0, count, dim, lane);
    if (row >= 0) live[row] = true;
}

extern "C" __global__ void static_invalidate(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                             int num_tables, const i64* __restrict__ slot_keys,
                                             const int* __restrict__ slot_tables, const int* __restrict__ slot_rows,
                                             bool* live, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 row = probe(qkeys[i], qtables[i], num_tables, slot_keys, slot_tables, slot_rows, mask);
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

// ---------------------------------------------------------------- entry points per storage and reply type

// Storage type T (SUFFIX): the writes, which take float32 rows in.
#define WRITE_KERNELS(T, SUFFIX)                                                                                  \
    extern "C" __global__ void write_present_##SUFFIX(                                                            \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const int* last, const int* pos,            \
        const unsigned* first_set, const unsigned* num_sets, int num_tables, const fp16* fps, Slot* slots,        \
        T* rows, int stride, int dim, i64 clock, unsigned* absent_set) {                                          \
        write_present_impl<T>(qkeys, qtables, in, n, last, pos, first_set, num_sets, num_tables, fps, slots,      \
                              rows, stride, dim, clock, absent_set);                                              \
    }                                                                                                             \
    extern "C" __global__ void insert_absent_##SUFFIX(                                                            \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const unsigned* sets, const i64* order,     \
        const int* table_ways, fp16* fps, Slot* slots, T* rows, int stride, int dim, i64 touched,                 \
        i64 inserted) {                                                                                           \
        insert_absent_impl<T>(qkeys, qtables, in, n, sets, order, table_ways, fps, slots, rows, stride, dim,      \
                              touched, inserted);                                                                 \
    }                                                                                                             \
    extern "C" __global__ void static_write_##SUFFIX(                                                             \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const int* last, const int* pos,            \
        int num_tables, const i64* slot_keys, const int* slot_tables, const int* slot_rows, bool* live,           \
        unsigned mask, T* rows, int dim, int revive) {                                                            \
        static_write_impl<T>(qkeys, qtables, in, n, last, pos, num_tables, slot_keys, slot_tables, slot_rows,     \
                             live, mask, rows, dim, revive);                                                      \
    }

// Storage type T (SUFFIX) replied as O (OUT): the lookups.
#define QUERY_KERNELS(T, SUFFIX, O, OUT)                                                                          \
    extern "C" __global__ void query_##SUFFIX##_##OUT(                                                            \
        const i64* qkeys, const int* qtables, i64 n, const unsigned* first_set, const unsigned* num_sets,         \
        int num_tables, const fp16* fps, Slot* slots, const T* rows, int stride, int dim, i64 clock, O* out,      \
        bool* hit, u64* counts) {                                                                                 \
        query_impl<T, O>(qkeys, qtables, n, first_set, num_sets, num_tables, fps, slots, rows, stride, dim,       \
                         clock, out, hit, counts);                                                                \
    }                                                                                                             \
    extern "C" __global__ void static_query_##SUFFIX##_##OUT(                                                     \
        const i64* qkeys, const int* qtables, i64 n, int num_tables, const i64* slot_keys,                        \
        const int* slot_tables, const int* slot_rows, const bool* live, unsigned mask, const T* rows, int dim,    \
        O* out, bool* hit, u64* counts) {                                                                         \
        static_query_impl<T, O>(qkeys, qtables, n, num_tables, slot_keys, slot_tables, slot_rows, live, mask,     \
                                rows, dim, out, hit, counts);                                                     \
    }

WRITE_KERNELS(float, f32)
WRITE_KERNELS(f16, f16)
QUERY_KERNELS(float, f32, float, f32)
QUERY_KERNELS(float, f32, f16, f16)
QUERY_KERNELS(f16, f16, float, f32)
QUERY_KERNELS(f16, f16, f16, f16)

extern "C" __global__ void invalidate(const i64* qkeys, const int* qtables, i64 n, const unsigned* first_set,
                                      const unsigned* num_sets, int num_tables, fp16* fps, Slot* slots, int stride) {
    invalidate_impl(qkeys, qtables, n, first_set, num_sets, num_tables, fps, slots, stride);
}
