// L1 embedding cache kernels: a set-associative LRU cache and a static table (open addressing). gpu.py
// drives them; reference.py states the algorithm they must reproduce.
//
// One structure holds one or several tables of the same dim; every key comes with its table's index
// (qtables[i]). Cache: table t owns global sets [first_set[t], first_set[t] + num_sets[t]) and uses
// table_ways[t] of each set's `stride` slots; key k of table t lives in set first_set[t] +
// set_of(mix(k), num_sets[t]). Static table: slots are keyed by the (table, key) pair. A table index
// outside [0, num_tables) makes the key a miss that is never written or counted (device callers'
// arrays are not checked on the host).
//
// Layout of the cache, kept apart so that a lookup reads only what it needs: per set a line of FP_LINE
// 16-bit fingerprints (0: empty; 64 bytes whatever the set's ways, so one thread reads it in four
// 16-byte loads), per slot a Slot {int64 key, int64 stamp (the logical clock of its last use; 0: empty)}
// and a row of `dim` elements of T (float, or float16 bits). Slot index = set * stride + way. A lookup
// finds its slots (a thread per key: the fingerprint line, then the matching slot's key) and copies their
// rows (a warp per 32 rows), in one kernel or, for a large batch, two. The stamp shares the key's 16 bytes,
// so stamping a hit writes a sector the check just read.

typedef long long i64;
typedef unsigned long long u64;
// float16 storage as raw bits, converted with PTX's cvt (no header needed under NVRTC).
typedef unsigned short f16;

#define FULL 0xffffffffu
// Lookups are counted per table into counts[table][0: hits, 1: keys asked][HIT_COUNTERS] (gpu.py sums
// them), so that one batch's warps do not all queue on a single address.
#define HIT_COUNTERS 64
// Fingerprints per set line (FP_LINE in gpu.py); ways past a table's own hold 0 and never match.
#define FP_LINE 32
#define NO_SET 0xffffffffu
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

// Row of element `idx` when every row has `width` elements: a shift where width is a power of two.
__device__ __forceinline__ int row_of(int idx, int width, int shift) { return shift >= 0 ? idx >> shift : idx / width; }
__device__ __forceinline__ int shift_of(int width) { return (width & (width - 1)) == 0 ? __ffs(width) - 1 : -1; }

// 16-byte pieces each lane has in flight per round of a row copy: all loads of a round are issued
// before its first store, so a warp keeps ROUND * 512 bytes moving instead of one load's worth. Writes
// into the cache keep fewer (WRITE_ROUND): their kernels hold a set's slots or a search besides, and
// the registers 8 pieces take would leave room for fewer warps (H200: 48 registers a thread for the
// insertion instead of 80, new keys 1.07-1.12 -> 1.35-1.38 B keys/s at 1M, dim 128).
#define ROUND 8
#define WRITE_ROUND 4

// The warp copies the rows of its `count` keys into `out` (float or float16 bits: O): key j of the
// group (held by lane j) reads row `src` (-1: write zeros). All lanes share every row, so small dims
// still keep the warp busy.
template <typename T, typename O>
__device__ __forceinline__ void gather_rows(const T* __restrict__ rows, i64 src, int count, int dim,
                                            O* __restrict__ out, int lane) {
    if ((dim & 3) == 0) {
        const int d4 = dim >> 2;
        const int shift = shift_of(d4);
        const int total = count * d4;
        for (int base = 0; base < total; base += 32 * ROUND) {
            float4 v[ROUND];
#pragma unroll
            for (int u = 0; u < ROUND; ++u) {
                const int idx = base + u * 32 + lane;
                const int j = min(row_of(idx, d4, shift), 31);
                const i64 r = __shfl_sync(FULL, src, j);
                v[u] = idx < total && r >= 0 ? load4(rows + r * dim, idx - j * d4) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < ROUND; ++u) {
                const int idx = base + u * 32 + lane;
                const int j = min(row_of(idx, d4, shift), 31);
                if (idx < total) store4(out + (i64)j * dim, idx - j * d4, v[u]);
            }
        }
    } else {
        const int total = count * dim;
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = min(idx / dim, 31);
            const i64 r = __shfl_sync(FULL, src, j);
            if (idx < total) {
                const int c = idx - j * dim;
                store1(out + (i64)j * dim, c, r >= 0 ? load1(rows + r * dim, c) : 0.f);
            }
        }
    }
}

// The warp writes float32 rows `src` (row index into `in`) into slots `dst` of the table (-1: skip),
// for keys j < count of the group (held by lane j).
template <typename T>
__device__ __forceinline__ void scatter_rows(T* __restrict__ rows, i64 dst, const float* __restrict__ in, i64 src,
                                             int count, int dim, int lane) {
    if ((dim & 3) == 0) {
        const int d4 = dim >> 2;
        const int shift = shift_of(d4);
        const int total = count * d4;
        for (int base = 0; base < total; base += 32 * WRITE_ROUND) {
            float4 v[WRITE_ROUND];
#pragma unroll
            for (int u = 0; u < WRITE_ROUND; ++u) {
                const int idx = base + u * 32 + lane;
                const int j = min(row_of(idx, d4, shift), 31);
                const i64 d = __shfl_sync(FULL, dst, j);
                const i64 s = __shfl_sync(FULL, src, j);
                v[u] = idx < total && d >= 0 ? load4(in + s * dim, idx - j * d4) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < WRITE_ROUND; ++u) {
                const int idx = base + u * 32 + lane;
                const int j = min(row_of(idx, d4, shift), 31);
                const i64 d = __shfl_sync(FULL, dst, j);
                if (idx < total && d >= 0) store4(rows + d * dim, idx - j * d4, v[u]);
            }
        }
    } else {
        const int total = count * dim;
        for (int base = 0; base < total; base += 32) {
            const int idx = base + lane;
            const int j = min(idx / dim, 31);
            const i64 d = __shfl_sync(FULL, dst, j);
            const i64 s = __shfl_sync(FULL, src, j);
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

__device__ __forceinline__ unsigned halves_equal(unsigned word, unsigned pair) {
    const unsigned e = __vcmpeq2(word, pair);  // 0xffff in each 16-bit half that matched
    return (e & 1u) | (e >> 15 & 2u);
}

// Bit w: way w of set s holds fingerprint f (never for f == 0, a lane without a key, which reads nothing).
__device__ __forceinline__ unsigned fp_matches(const fp16* __restrict__ fps, unsigned s, unsigned f) {
    if (!f) return 0;
    const uint4* line = reinterpret_cast<const uint4*>(fps + (i64)s * FP_LINE);
    const unsigned pair = f | (f << 16);
    unsigned m = 0;
#pragma unroll
    for (int q = 0; q < FP_LINE / 8; ++q) {
        const uint4 v = line[q];
        m |= halves_equal(v.x, pair) << (8 * q) | halves_equal(v.y, pair) << (8 * q + 2) |
             halves_equal(v.z, pair) << (8 * q + 4) | halves_equal(v.w, pair) << (8 * q + 6);
    }
    return m;
}

// The way among the candidates `m` of set s that holds `key`, -1 if none (a set holds one table's keys
// only, so the key compare is the (table, key) compare).
__device__ __forceinline__ int confirm(i64 key, unsigned s, unsigned m, const Slot* slots, int stride) {
    for (; m; m &= m - 1) {
        const int w = __ffs(m) - 1;
        if (slots[(i64)s * stride + w].key == key) return w;
    }
    return -1;
}

// Slot of a located key, -1 where absent.
__device__ __forceinline__ i64 find_slot(i64 key, unsigned s, unsigned f, const fp16* __restrict__ fps,
                                         const Slot* slots, int stride) {
    const int w = confirm(key, s, fp_matches(fps, s, f), slots, stride);
    return w >= 0 ? (i64)s * stride + w : -1;
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

// The slot holding key i of the batch (-1: a miss, or i >= n), thread per key: the thread compares its key's
// fingerprint with the set's whole line, then reads the key of each matching way (one, but where another key
// of the set has the same fingerprint: about 1 lookup in 2,000). A hit's slot is stamped `clock`; hit[i] is
// written and the lookups counted. All 32 lanes of the warp must call it (count_lookups).
__device__ __forceinline__ i64 find_key(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 i, i64 n,
                                        const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                                        int num_tables, const fp16* __restrict__ fps, Slot* __restrict__ slots,
                                        int stride, i64 clock, bool* __restrict__ hit, u64* __restrict__ counts,
                                        int lane) {
    const bool valid = i < n;
    const i64 key = valid ? qkeys[i] : 0;
    const int t = valid ? qtables[i] : 0;
    unsigned s, f;
    const bool known = locate(key, t, valid, first_set, num_sets, num_tables, s, f);
    const i64 slot = find_slot(key, s, f, fps, slots, stride);
    if (valid) {
        hit[i] = slot >= 0;
        if (slot >= 0) slots[slot].stamp = clock;
    }
    count_lookups(t, known, slot >= 0, counts, lane);
    return slot;
}

// A lookup in one pass, warp per 32 keys: each thread finds its key's slot, then the warp copies the rows
// found (zeros for misses). Below about 2**25 elements (keys x dim) this beats the two passes below: one
// launch, and the copy starts as soon as the warp's own keys are found (H200, 1,024 to 256K keys at dim 128:
// 22-109 us against 31-112 us); above it, the two passes win (1M keys, dim 128: 375 us against 384 us).
template <typename T, typename O>
__device__ void query_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                           const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                           int num_tables, const fp16* __restrict__ fps, Slot* __restrict__ slots, int stride,
                           i64 clock, const T* __restrict__ rows, int dim, O* __restrict__ out,
                           bool* __restrict__ hit, u64* __restrict__ counts) {
    const int lane = threadIdx.x & 31;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 base = i - lane;
    if (base >= n) return;
    const i64 slot =
        find_key(qkeys, qtables, i, n, first_set, num_sets, num_tables, fps, slots, stride, clock, hit, counts, lane);
    gather_rows(rows, slot, (int)min((i64)32, n - base), dim, out + base * dim, lane);
}

// A large lookup's pass 1, thread per key: found[i] = the slot of key i (-1: a miss). Pass 2 (copy_rows)
// copies the rows found. Apart, each pass keeps its multiprocessors full: the one-pass kernel holds its
// search state and its copy's loads in registers, which leaves room for fewer warps.
extern "C" __global__ void find(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                                int num_tables, const fp16* __restrict__ fps, Slot* __restrict__ slots, int stride,
                                i64 clock, i64* __restrict__ found, bool* __restrict__ hit, u64* __restrict__ counts) {
    const int lane = threadIdx.x & 31;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i - lane >= n) return;  // whole warps only: count_lookups needs every lane
    const i64 slot =
        find_key(qkeys, qtables, i, n, first_set, num_sets, num_tables, fps, slots, stride, clock, hit, counts, lane);
    if (i < n) found[i] = slot;
}

// Batch positions a group keeps in its own slots (GROUP_MEMBERS in gpu.py); further keys of the set go on
// a list through link[]. Pass 2 then reads a group's first members all at once instead of walking them.
#define GROUP_MEMBERS 8

// A key to insert joins the group of its set s: an entry of an open-addressing table over this batch's
// sets (group_sets NO_SET, group_sizes and group_heads -1 at start). The entry's size counts its keys;
// the first GROUP_MEMBERS are held in members[entry * GROUP_MEMBERS + rank], the others are listed from
// group_heads[entry] through link[] (`next`). `lead` is the entry where this key opened the group (the
// group's leader), else -1.
__device__ __forceinline__ void join_group(unsigned s, i64 i, unsigned* group_sets, int* group_sizes,
                                           int* group_heads, int* members, unsigned mask, int& lead, int& next) {
    unsigned p = (unsigned)mix(s) & mask;
    while (true) {
        const unsigned c = atomicCAS(group_sets + p, NO_SET, s);
        if (c == NO_SET) lead = (int)p;
        if (c == NO_SET || c == s) break;
        p = (p + 1) & mask;
    }
    const int rank = atomicAdd(group_sizes + p, 1) + 1;
    if (rank < GROUP_MEMBERS)
        members[(i64)p * GROUP_MEMBERS + rank] = (int)i;
    else
        next = atomicExch(group_heads + p, (int)i);
}

// Replace/update, pass 1. `last[pos[i]] == i` marks the last occurrence of each (table, key) pair in the
// batch; only those act. Present: row overwritten. clock > 0 (replace): present keys stamped `clock`,
// absent ones joined to their set's group for pass 2; clock == 0 (update): nothing else. Every key
// writes leader[i] and link[i].
template <typename T>
__device__ void write_present_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                   const float* __restrict__ in, i64 n, const int* __restrict__ last,
                                   const int* __restrict__ pos, const unsigned* __restrict__ first_set,
                                   const unsigned* __restrict__ num_sets, int num_tables,
                                   const fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows,
                                   int stride, int dim, i64 clock, unsigned* group_sets, int* group_sizes,
                                   int* group_heads, int* members, unsigned group_mask, int* __restrict__ leader,
                                   int* __restrict__ link) {
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
    const i64 slot = find_slot(key, s, f, fps, slots, stride);
    if (slot >= 0 && clock > 0) slots[slot].stamp = clock;
    if (i < n) {
        int lead = -1, next = -1;
        if (clock > 0 && known && slot < 0)
            join_group(s, i, group_sets, group_sizes, group_heads, members, group_mask, lead, next);
        leader[i] = lead;
        link[i] = next;
    }
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, slot, in + base * dim, slot >= 0 ? (i64)lane : 0, count, dim, lane);
}

// What pass 2 reads of a group before inserting it, per lane: its slot of the set (key, stamp), and, for
// lane r < the group's size (at most GROUP_MEMBERS), the batch position and key of member r.
struct GroupView {
    i64 k, st, key;
    int pos;
};

__device__ __forceinline__ GroupView view_group(const i64* __restrict__ qkeys, const int* __restrict__ members,
                                                const Slot* __restrict__ slots, int stride, unsigned s, int entry,
                                                int size, int ways, int lane) {
    GroupView v;
    const longlong2 held =
        lane < ways ? reinterpret_cast<const longlong2*>(slots)[(i64)s * stride + lane] : make_longlong2(0, 0);
    v.k = held.x;
    v.st = held.y;
    const bool member = lane < min(size, GROUP_MEMBERS);
    v.pos = member ? members[(i64)entry * GROUP_MEMBERS + lane] : 0;
    v.key = member ? qkeys[v.pos] : 0;
    return v;
}

// Replace, pass 2: the warp inserts the keys of set s (one table's, whose ways it uses): the group's
// members (`v`), then those on its list from `head`, holding the set's slots in registers (no locks, no
// atomics). Each key takes the least recently used slot not touched by this batch (stamp < touched),
// ordered by (stamp, key, way); once none is left it displaces the largest key this batch inserted, if
// smaller. So a set keeps the smallest of the keys competing for it, in whatever order they come (the
// order depends on the atomics): the rule reference.py states without any order. Slots are chosen
// first, from registers; then the rows of the keys that stayed are copied, those rows only.
template <typename T>
__device__ void insert_group(const i64* __restrict__ qkeys, const float* __restrict__ in,
                             const int* __restrict__ link, fp16* __restrict__ fps, Slot* __restrict__ slots,
                             T* __restrict__ rows, int stride, int dim, i64 touched, i64 inserted, unsigned s,
                             const GroupView& v, int size, int head, int ways, int lane) {
    const bool real = lane < ways;
    const i64 slot = (i64)s * stride + lane;
    i64 k = v.k, st = v.st;
    i64 src = -1;  // batch position of the key this lane's slot ends up holding, -1: unchanged
    const int direct = min(size, GROUP_MEMBERS);
    for (int r = 0, cur = head; r < direct || cur >= 0; ++r) {
        i64 key, i;
        if (r < direct) {
            key = __shfl_sync(FULL, v.key, r);
            i = __shfl_sync(FULL, v.pos, r);
        } else {
            key = qkeys[cur];
            i = cur;
            cur = link[cur];
        }
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
    if (src >= 0) {
        slots[slot].key = k;
        slots[slot].stamp = st;
        fps[(i64)s * FP_LINE + lane] = fingerprint(mix((u64)k));
    }
    // Lane j < moved copies the j-th changed slot's row.
    const unsigned changed = __ballot_sync(FULL, src >= 0);
    const int moved = __popc(changed);
    const int from = lane < moved ? (int)__fns(changed, 0, lane + 1) : 0;
    const i64 dst = __shfl_sync(FULL, slot, from);
    const i64 row = __shfl_sync(FULL, src, from);
    scatter_rows(rows, lane < moved ? dst : -1, in, row >= 0 ? row : 0, moved, dim, lane);
}

// Batch positions per warp in pass 2 (_GROUP_SPAN in gpu.py): the groups whose leaders a warp holds are
// inserted one after the other, so a warp takes few positions and the groups spread over many warps.
#define GROUP_SPAN 8

// Warp per GROUP_SPAN batch positions: inserts the groups whose leaders are among them. Each leader's
// lane first reads its group's set, size, list head and ways, all lanes at once; the warp reads the
// next group's slots and members while it inserts this one.
template <typename T>
__device__ void insert_groups_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                   const float* __restrict__ in, i64 n, const int* __restrict__ leader,
                                   const unsigned* __restrict__ group_sets, const int* __restrict__ group_sizes,
                                   const int* __restrict__ group_heads, const int* __restrict__ members,
                                   const int* __restrict__ link, const int* __restrict__ table_ways,
                                   fp16* __restrict__ fps, Slot* __restrict__ slots, T* __restrict__ rows, int stride,
                                   int dim, i64 touched, i64 inserted) {
    const i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * GROUP_SPAN;
    const int lane = threadIdx.x & 31;
    if (base >= n) return;
    const i64 q = base + lane;
    const int entry = lane < GROUP_SPAN && q < n ? leader[q] : -1;
    unsigned set = 0;
    int size = 0, head = -1, ways = 0;
    if (entry >= 0) {
        set = group_sets[entry];
        size = group_sizes[entry] + 1;
        head = group_heads[entry];
        ways = __ldg(table_ways + qtables[q]);
    }
    unsigned leads = __ballot_sync(FULL, entry >= 0);
    if (!leads) return;
    int j = __ffs(leads) - 1;
    GroupView v = view_group(qkeys, members, slots, stride, __shfl_sync(FULL, set, j), __shfl_sync(FULL, entry, j),
                             __shfl_sync(FULL, size, j), __shfl_sync(FULL, ways, j), lane);
    while (true) {
        const int now = j;
        leads &= leads - 1;
        GroupView after;
        if (leads) {
            j = __ffs(leads) - 1;
            after = view_group(qkeys, members, slots, stride, __shfl_sync(FULL, set, j), __shfl_sync(FULL, entry, j),
                               __shfl_sync(FULL, size, j), __shfl_sync(FULL, ways, j), lane);
        }
        insert_group(qkeys, in, link, fps, slots, rows, stride, dim, touched, inserted, __shfl_sync(FULL, set, now),
                     v, __shfl_sync(FULL, size, now), __shfl_sync(FULL, head, now), __shfl_sync(FULL, ways, now),
                     lane);
        if (!leads) break;
        v = after;
    }
}

// Warp per 32 keys: present keys are emptied.
__device__ void invalidate_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                const unsigned* __restrict__ first_set, const unsigned* __restrict__ num_sets,
                                int num_tables, fp16* fps, Slot* __restrict__ slots, int stride) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    unsigned s, f;
    locate(key, qtables[i], true, first_set, num_sets, num_tables, s, f);
    const int w = confirm(key, s, fp_matches(fps, s, f), slots, stride);
    if (w >= 0) {
        fps[(i64)s * FP_LINE + w] = 0;
        slots[(i64)s * stride + w].stamp = 0;
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

// Open addressing with linear probing over (table, key) pairs, one 16-byte Entry a slot (one load per
// probe): the pair, the row it names (-1: empty slot) and, in the table word's top bit (DEAD), whether
// it was invalidated (its row is hidden until replaced). A table index outside [0, num_tables) finds
// nothing.
#define DEAD 0x80000000u

struct __align__(16) Entry {
    i64 key;
    unsigned table;
    int row;
};

// The slot of the pair (p, with its entry in `e`), -1 where not held.
__device__ __forceinline__ i64 probe(i64 key, int t, int num_tables, const Entry* entries, unsigned mask, Entry& e) {
    if (t < 0 || t >= num_tables) return -1;
    unsigned p = (unsigned)pair_hash(key, t) & mask;
    while (true) {
        const longlong2 v = reinterpret_cast<const longlong2*>(entries)[p];
        e.key = v.x;
        e.table = (unsigned)v.y;
        e.row = (int)(v.y >> 32);
        if (e.row < 0) return -1;
        if (e.key == key && (e.table & ~DEAD) == (unsigned)t) return p;
        p = (p + 1) & mask;
    }
}

// Thread per distinct pair (the host removed repeats): row i goes into the first free slot of its probe.
extern "C" __global__ void static_build(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                        Entry* entries, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 key = qkeys[i];
    const int t = qtables[i];
    unsigned p = (unsigned)pair_hash(key, t) & mask;
    while (atomicCAS(&entries[p].row, -1, -2) != -1) p = (p + 1) & mask;
    entries[p].key = key;
    entries[p].table = (unsigned)t;
    __threadfence();
    atomicExch(&entries[p].row, (int)i);
}

// Static lookup, a warp per 32 keys: each thread probes for its key, then the warp copies the rows found.
// One kernel, as its probe is a single load: split in two passes like the cache's lookup it measured
// 0.03-0.05 of the gather slower (H200, two runs).
template <typename T, typename O>
__device__ void static_query_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                  int num_tables, const Entry* __restrict__ entries, unsigned mask,
                                  const T* __restrict__ rows, int dim, O* __restrict__ out, bool* __restrict__ hit,
                                  u64* __restrict__ counts) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    const int t = i < n ? qtables[i] : 0;
    i64 row = -1;
    if (i < n) {
        Entry e;
        if (probe(qkeys[i], t, num_tables, entries, mask, e) >= 0 && !(e.table & DEAD)) row = e.row;
        hit[i] = row >= 0;
    }
    count_lookups(t, i < n && t >= 0 && t < num_tables, row >= 0, counts, lane);
    const int count = (int)min((i64)32, n - base);
    gather_rows(rows, row, count, dim, out + base * dim, lane);
}

// revive = 1: replace (rows of known pairs written, made live); 0: update (live rows only).
template <typename T>
__device__ void static_write_impl(const i64* __restrict__ qkeys, const int* __restrict__ qtables,
                                  const float* __restrict__ in, i64 n, const int* __restrict__ last,
                                  const int* __restrict__ pos, int num_tables, Entry* __restrict__ entries,
                                  unsigned mask, T* __restrict__ rows, int dim, int revive) {
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 base = warp * 32;
    if (base >= n) return;
    const i64 i = base + lane;
    i64 row = -1, p = -1;
    if (i < n && last[pos[i]] == (int)i) {
        Entry e;
        p = probe(qkeys[i], qtables[i], num_tables, entries, mask, e);
        if (p >= 0 && (revive || !(e.table & DEAD))) row = e.row;
    }
    __syncwarp();
    const int count = (int)min((i64)32, n - base);
    scatter_rows(rows, row, in + base * dim, row >= 0 ? (i64)lane : 0, count, dim, lane);
    if (row >= 0 && revive) entries[p].table = (unsigned)qtables[i];
}

extern "C" __global__ void static_invalidate(const i64* __restrict__ qkeys, const int* __restrict__ qtables, i64 n,
                                             int num_tables, Entry* entries, unsigned mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    Entry e;
    const i64 p = probe(qkeys[i], qtables[i], num_tables, entries, mask, e);
    if (p >= 0) entries[p].table = e.table | DEAD;
}

// ---------------------------------------------------------------- rows held, per table

// Adds each lane's `count` to held[t] of its table t (t < 0: nothing): one atomic for a warp whose lanes
// with a table share it (the usual case: neighbouring sets or slots), else one per lane. All 32 lanes must
// call it.
__device__ __forceinline__ void add_held(int t, unsigned count, u64* __restrict__ held) {
    const unsigned owners = __ballot_sync(FULL, t >= 0);
    if (!owners) return;
    const int first = __shfl_sync(FULL, t, __ffs(owners) - 1);
    if (__all_sync(FULL, t < 0 || t == first)) {
#pragma unroll
        for (int o = 16; o; o >>= 1) count += __shfl_xor_sync(FULL, count, o);
        if ((threadIdx.x & 31) == 0 && count) atomicAdd(held + first, (u64)count);
    } else if (t >= 0 && count) {
        atomicAdd(held + t, (u64)count);
    }
}

// Thread per set: held[t] += the slots of table t's sets that hold a key (a nonzero fingerprint). Counted
// in place, so a stats call leaves no whole-cache temporaries in the memory pool.
extern "C" __global__ void cache_rows_held(const fp16* __restrict__ fps, i64 total_sets,
                                           const unsigned* __restrict__ first_set, int num_tables,
                                           u64* __restrict__ held) {
    const i64 s = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (s - (threadIdx.x & 31) >= total_sets) return;  // whole warps only: add_held needs every lane
    int t = -1;
    unsigned count = 0;  // the lanes past the last set count nothing
    if (s < total_sets) {
        int lo = 0, hi = num_tables - 1;  // the last table whose first set is at or before s
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (__ldg(first_set + mid) <= (unsigned)s) lo = mid; else hi = mid - 1;
        }
        t = lo;
        const uint4* line = reinterpret_cast<const uint4*>(fps + s * FP_LINE);
#pragma unroll
        for (int q = 0; q < FP_LINE / 8; ++q) {
            const uint4 v = line[q];
            count += 8 - __popc(halves_equal(v.x, 0) | halves_equal(v.y, 0) << 2 | halves_equal(v.z, 0) << 4 |
                                halves_equal(v.w, 0) << 6);
        }
    }
    add_held(t, count, held);
}

// Thread per slot: held[t] += the live rows (held, not invalidated) of table t.
extern "C" __global__ void static_rows_live(const Entry* __restrict__ entries, i64 slots, u64* __restrict__ held) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p - (threadIdx.x & 31) >= slots) return;
    int t = -1;
    if (p < slots) {
        const longlong2 v = reinterpret_cast<const longlong2*>(entries)[p];
        const unsigned table = (unsigned)v.y;
        if ((int)(v.y >> 32) >= 0 && !(table & DEAD)) t = (int)table;
    }
    add_held(t, t >= 0, held);
}

// ---------------------------------------------------------------- row copies by index

// Lookup pass 2, and the raw gather the benchmarks hold lookups against: warp per 32 rows, out[i] =
// rows[index[i]] (zeros where index[i] is -1).
template <typename T, typename O>
__device__ void copy_rows_impl(const T* __restrict__ rows, const i64* __restrict__ index, i64 n, int dim,
                               O* __restrict__ out) {
    const i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * 32;
    if (base >= n) return;
    const int lane = threadIdx.x & 31;
    const i64 i = base + lane;
    gather_rows(rows, i < n ? index[i] : -1, (int)min((i64)32, n - base), dim, out + base * dim, lane);
}

// ---------------------------------------------------------------- entry points per storage and reply type

// Storage type T (SUFFIX): the writes, which take float32 rows in.
#define WRITE_KERNELS(T, SUFFIX)                                                                                  \
    extern "C" __global__ void write_present_##SUFFIX(                                                            \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const int* last, const int* pos,            \
        const unsigned* first_set, const unsigned* num_sets, int num_tables, const fp16* fps, Slot* slots,        \
        T* rows, int stride, int dim, i64 clock, unsigned* group_sets, int* group_sizes, int* group_heads,        \
        int* members, unsigned group_mask, int* leader, int* link) {                                              \
        write_present_impl<T>(qkeys, qtables, in, n, last, pos, first_set, num_sets, num_tables, fps, slots,      \
                              rows, stride, dim, clock, group_sets, group_sizes, group_heads, members,            \
                              group_mask, leader, link);                                                          \
    }                                                                                                             \
    extern "C" __global__ void insert_groups_##SUFFIX(                                                            \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const int* leader,                          \
        const unsigned* group_sets, const int* group_sizes, const int* group_heads, const int* members,           \
        const int* link, const int* table_ways, fp16* fps, Slot* slots, T* rows, int stride, int dim,             \
        i64 touched, i64 inserted) {                                                                              \
        insert_groups_impl<T>(qkeys, qtables, in, n, leader, group_sets, group_sizes, group_heads, members,       \
                              link, table_ways, fps, slots, rows, stride, dim, touched, inserted);                \
    }                                                                                                             \
    extern "C" __global__ void static_write_##SUFFIX(                                                             \
        const i64* qkeys, const int* qtables, const float* in, i64 n, const int* last, const int* pos,            \
        int num_tables, Entry* entries, unsigned mask, T* rows, int dim, int revive) {                            \
        static_write_impl<T>(qkeys, qtables, in, n, last, pos, num_tables, entries, mask, rows, dim, revive);     \
    }

// Rows of storage type T (SUFFIX) copied out as O (OUT): a cache lookup (one pass, or the second of two), a
// static lookup.
#define QUERY_KERNELS(T, SUFFIX, O, OUT)                                                                          \
    extern "C" __global__ void copy_rows_##SUFFIX##_##OUT(const T* rows, const i64* index, i64 n, int dim,        \
                                                          O* out) {                                               \
        copy_rows_impl<T, O>(rows, index, n, dim, out);                                                           \
    }                                                                                                             \
    extern "C" __global__ void query_##SUFFIX##_##OUT(                                                            \
        const i64* qkeys, const int* qtables, i64 n, const unsigned* first_set, const unsigned* num_sets,         \
        int num_tables, const fp16* fps, Slot* slots, int stride, i64 clock, const T* rows, int dim, O* out,      \
        bool* hit, u64* counts) {                                                                                 \
        query_impl<T, O>(qkeys, qtables, n, first_set, num_sets, num_tables, fps, slots, stride, clock, rows,     \
                         dim, out, hit, counts);                                                                  \
    }                                                                                                             \
    extern "C" __global__ void static_query_##SUFFIX##_##OUT(                                                     \
        const i64* qkeys, const int* qtables, i64 n, int num_tables, const Entry* entries, unsigned mask,         \
        const T* rows, int dim, O* out, bool* hit, u64* counts) {                                                 \
        static_query_impl<T, O>(qkeys, qtables, n, num_tables, entries, mask, rows, dim, out, hit, counts);       \
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
