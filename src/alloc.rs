//! The binary's global allocator: the system allocator, plus a small cache of freed large blocks.
//!
//! A CPU forward pass allocates every activation afresh (candle's ops return new storage), and
//! at batch 32 and 224 px the early activations are 50-100 MB each. glibc serves blocks over 32
//! MiB with mmap and returns them with munmap on free, so every batch the kernel zeroes those
//! pages again on first touch and shoots down TLBs on every core when they are unmapped:
//! measured with perf on EfficientNet-B0 at batch 32, about a third of the forward pass was page
//! faults, page zeroing and TLB-shootdown IPIs. A pass allocates the same sizes batch after
//! batch, so freed blocks of 1 MiB and more are kept (at most [`SLOTS`]) and handed back for
//! later allocations. Memory returned this way is not zeroed; `alloc_zeroed` zeroes a cached
//! block itself.
//!
//! The cache must stay a speed-up without becoming the process's peak (issue 21: an earlier
//! policy, exact sizes only and up to an eighth of RAM, held 5.8 GB in a 6-size resolution sweep
//! whose live memory was under 3 GB, because no size ever reused another's blocks). So:
//!
//! - **Reuse across sizes.** An allocation takes the smallest cached block that is large enough
//!   and at most [`MAX_SLACK`] times its size (on Linux, where `malloc_usable_size` tells a
//!   block's true size when it comes back; elsewhere exact sizes only). A sweep's smaller sizes
//!   run in the blocks its larger ones freed.
//! - **A cap tied to the working set.** Live large blocks plus the cache may hold at most
//!   [`HEADROOM`] times the peak of what the program has asked for at once (the high-water mark
//!   of live large requests), never more than [`cache_limit`]; the oldest blocks go first.
//! - **Stale blocks go.** A block is released once it has waited, unused, [`STALE`] times as
//!   many allocated bytes as the longest wait after which a block was recently reused: a block of
//!   a size the program has moved away from (a new input size, a new model) is not coming back,
//!   and a pass's own blocks come back within one pass.
//!
//! A training loop (`ckpt distill`) asks for more room ([`training`]): its step keeps every
//! activation for the backward pass, which frees them while it allocates gradients of other
//! sizes, so a step cycles through more blocks than it holds at once. With a quarter of headroom
//! a MobileNetV2 step (batch 32, 224 px, 1.8 GB of live requests at the peak) sent 250k pages a
//! step back to the system, to be faulted in and zeroed again by the next one; with twice its
//! peak, 15k, and the process's peak resident memory did not move (2.71 against 2.72 GB: the
//! cache fills while the live blocks drain). Forward jobs keep the quarter: with twice, a
//! ResNet-50 sweep's peak went from 1.37 to 1.90 GB.
//!
//! [`CachingAllocator::stats`] reports the cache's bytes (the binary prints them with its peak
//! memory under `CKPT_REPORT_PEAK_RSS`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks below this size are left to the system allocator, which already reuses them.
const MIN_BYTES: usize = 1 << 20;
/// A cached block serves a request of at least 1 / MAX_SLACK of its size. Adjacent sizes of a
/// sweep (160, 192, ..., 320 px) differ by 1.2-1.5x in area, within reach of each other. Within
/// one pass a network's widest activation is several times the next ones (MobileNetV2 at batch
/// 64: a 294 MB expansion, then 110 MB ones): with a slack of 2 the big block could serve none
/// of them, so each batch freed it to make room for them and faulted it in again for the next
/// batch (eval of 448 images, 2 against 4: 1.10M -> 0.62M page faults, 4.82-5.35 -> 4.67-4.86
/// s, the same peak; a 6-candidate soup 15.6-17.2 -> 13.1-13.5 s). With 8 a ResNet-50 sweep's
/// peak went from 1.43 to 1.65 GB (`benches/memory_bench.py`, 2026-12-01, session 10).
pub const MAX_SLACK: usize = 4;
/// Held bytes (live large blocks plus the cache) may exceed the peak of live requests by this
/// fraction, in eighths: 10 / 8 = a quarter more.
pub const HEADROOM_EIGHTHS: usize = 10;
/// See the module doc.
pub const HEADROOM: f64 = HEADROOM_EIGHTHS as f64 / 8.0;
/// The headroom while training, in eighths (see the module doc).
pub const TRAINING_HEADROOM_EIGHTHS: usize = 16;
/// A cached block unused for this many times the recent longest reuse wait is released.
pub const STALE: u64 = 2;

/// Most bytes ever held in freed blocks, whatever the working set: an eighth of physical memory,
/// between 1 and 8 GiB.
pub fn cache_limit() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static LIMIT: AtomicUsize = AtomicUsize::new(0);
    let l = LIMIT.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let l = (physical_memory() / 8).clamp(1 << 30, 8 << 30);
    LIMIT.store(l, Ordering::Relaxed);
    l
}

/// The limit while training: twice [`cache_limit`].
pub fn training_cache_limit() -> usize {
    2 * cache_limit()
}

/// The binary's allocator, whose policy [`training`] changes.
pub static GLOBAL: CachingAllocator = CachingAllocator::new();

/// What the binary registers as its global allocator: [`GLOBAL`].
pub struct Global;

// SAFETY: forwards every call to GLOBAL, an allocator that keeps GlobalAlloc's contract.
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        GLOBAL.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        GLOBAL.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        GLOBAL.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        GLOBAL.realloc(ptr, layout, new_size)
    }
}

/// From now on the process trains: [`GLOBAL`] keeps up to twice the peak of live requests, and
/// up to [`training_cache_limit`] (see the module doc).
pub fn training() {
    GLOBAL.set_training();
}

/// The machine's physical memory in bytes (0 when the system does not say).
pub fn physical_memory() -> usize {
    // SAFETY: sysconf has no preconditions and does not allocate.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        pages as usize * page as usize
    } else {
        0
    }
}

/// Most blocks held. A training step keeps every activation for its backward pass and frees
/// them together, several hundred large blocks (MobileNetV2 at batch 32 and 224 px): with 64
/// slots most of them went back to the system, and `ckpt distill` took 480k page faults a step
/// (1.9 GB zeroed afresh); with 512, 23k. The byte budget above still bounds what is held.
pub const SLOTS: usize = 512;

/// A block's true size: what it can hold, which a block handed out for a smaller request keeps.
#[cfg(target_os = "linux")]
fn usable_size(ptr: *mut u8, _requested: usize) -> usize {
    // SAFETY: `ptr` is a live block from System, i.e. from glibc's malloc or posix_memalign.
    unsafe { libc::malloc_usable_size(ptr.cast()) }
}
#[cfg(not(target_os = "linux"))]
fn usable_size(_ptr: *mut u8, requested: usize) -> usize {
    requested
}
const BEST_FIT: bool = cfg!(target_os = "linux");

#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    /// True size (see [`usable_size`]).
    size: usize,
    /// The alignment it was freed with (System may need it back).
    align: usize,
    /// The allocation clock when it was freed.
    freed_at: u64,
}

struct Cache {
    slots: [Option<Slot>; SLOTS],
    /// Bytes in the cache.
    cached: usize,
    /// Bytes requested by the live large blocks, and the most ever at once.
    live_requested: usize,
    peak_requested: usize,
    /// True sizes of the live large blocks.
    live_held: usize,
    /// Bytes of large allocations so far.
    clock: u64,
    /// Bytes of them served by fresh blocks from System.
    fresh: u64,
    /// The longest recent wait (in clock bytes) of a block that was reused, decaying.
    reuse_wait: u64,
    /// Held bytes may exceed the peak of live requests by this, in eighths.
    headroom_eighths: usize,
    /// Whether the cache's own limit is [`training_cache_limit`] (else [`cache_limit`]).
    training: bool,
    /// [`MAX_SLACK`] (another in tests).
    slack: usize,
}

/// What the allocator holds, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Freed blocks kept for reuse.
    pub cached: usize,
    /// Live large blocks (true sizes).
    pub live: usize,
    /// The most live large requests at once.
    pub peak_requested: usize,
    /// Bytes of large blocks taken from System so far (each a fresh block whose pages the
    /// kernel faults in and zeroes on first touch): what the cache did not save.
    pub fresh: u64,
}

/// The system allocator with a cache of large freed blocks (see the module doc).
pub struct CachingAllocator {
    cache: Mutex<Cache>,
}

impl Cache {
    /// Most bytes live blocks plus cache may hold.
    fn budget(&self) -> usize {
        (self.peak_requested / 8 * self.headroom_eighths).max(self.peak_requested)
    }

    /// Most bytes the cache itself may hold.
    fn limit(&self) -> usize {
        if self.training {
            training_cache_limit()
        } else {
            cache_limit()
        }
    }

    /// Releases stale blocks, then the oldest ones until `extra` more bytes fit the budget and
    /// the cache's own limit (System never calls back into this allocator, so freeing under the
    /// lock cannot deadlock).
    fn trim(&mut self, extra: usize, want_slot: bool) {
        let stale_after = self.reuse_wait.saturating_mul(STALE);
        for i in 0..SLOTS {
            if let Some(s) = self.slots[i] {
                if self.reuse_wait > 0 && self.clock - s.freed_at > stale_after {
                    self.release(i);
                }
            }
        }
        let limit = self.limit();
        loop {
            let over = self.live_held + self.cached + extra > self.budget()
                || self.cached + extra > limit
                || (want_slot && self.slots.iter().all(Option::is_some));
            if !over {
                break;
            }
            let Some(i) = (0..SLOTS)
                .filter(|&i| self.slots[i].is_some())
                .min_by_key(|&i| self.slots[i].map_or(u64::MAX, |s| s.freed_at))
            else {
                break;
            };
            self.release(i);
        }
    }

    fn release(&mut self, i: usize) {
        let s = self.slots[i].take().expect("an occupied slot");
        self.cached -= s.size;
        // SAFETY: the block came from System and is owned by the cache; System's blocks are
        // freed whatever the size in the layout (`free`), and this is a size it can hold.
        unsafe {
            System.dealloc(
                s.ptr as *mut u8,
                Layout::from_size_align_unchecked(s.size, s.align),
            )
        };
    }
}

impl CachingAllocator {
    pub const fn new() -> CachingAllocator {
        CachingAllocator {
            cache: Mutex::new(Cache {
                slots: [None; SLOTS],
                cached: 0,
                live_requested: 0,
                peak_requested: 0,
                live_held: 0,
                clock: 0,
                fresh: 0,
                reuse_wait: 0,
                headroom_eighths: HEADROOM_EIGHTHS,
                training: false,
                slack: MAX_SLACK,
            }),
        }
    }

    /// The training policy (see [`training`]).
    pub fn set_training(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.headroom_eighths = TRAINING_HEADROOM_EIGHTHS;
            c.training = true;
        }
    }

    /// What the allocator holds now.
    pub fn stats(&self) -> Stats {
        match self.cache.lock() {
            Ok(c) => Stats {
                cached: c.cached,
                live: c.live_held,
                peak_requested: c.peak_requested,
                fresh: c.fresh,
            },
            Err(_) => Stats::default(),
        }
    }

    /// A large block for `layout`: the best-fitting cached one, or a fresh one from System (after
    /// making room for it in the budget). Null when System has none.
    fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let Ok(mut c) = self.cache.lock() else {
            // SAFETY: forwarded as given.
            return unsafe { fresh(layout, zeroed) };
        };
        let want = layout.size();
        c.clock += want as u64;
        c.live_requested += want;
        c.peak_requested = c.peak_requested.max(c.live_requested);
        let slack = c.slack;
        let fits = |s: &Slot| {
            s.ptr % layout.align() == 0
                && if BEST_FIT {
                    s.size >= want && s.size / slack <= want
                } else {
                    s.size == want && s.align == layout.align()
                }
        };
        let best = (0..SLOTS)
            .filter(|&i| c.slots[i].as_ref().is_some_and(fits))
            .min_by_key(|&i| c.slots[i].map_or(usize::MAX, |s| s.size));
        if let Some(i) = best {
            let s = c.slots[i].take().expect("an occupied slot");
            c.cached -= s.size;
            c.live_held += s.size;
            let wait = c.clock - s.freed_at;
            c.reuse_wait = wait.max(c.reuse_wait - c.reuse_wait / 8192);
            drop(c);
            let p = s.ptr as *mut u8;
            if zeroed {
                // SAFETY: the block holds at least `want` bytes and is ours to hand out.
                unsafe { std::ptr::write_bytes(p, 0, want) };
            }
            return p;
        }
        c.trim(want, false);
        // SAFETY: forwarded as given.
        let p = unsafe { fresh(layout, zeroed) };
        if p.is_null() {
            c.live_requested -= want;
        } else {
            c.live_held += usable_size(p, want);
            c.fresh += want as u64;
        }
        p
    }

    /// Takes back a large block: into the cache if the budget allows, else to System.
    fn dealloc_large(&self, ptr: *mut u8, layout: Layout) {
        let size = usable_size(ptr, layout.size());
        let Ok(mut c) = self.cache.lock() else {
            // SAFETY: a block of ours, with its layout.
            return unsafe { System.dealloc(ptr, layout) };
        };
        c.live_requested -= layout.size();
        c.live_held -= size;
        c.trim(size, true);
        let fits = c.live_held + c.cached + size <= c.budget() && c.cached + size <= c.limit();
        match c.slots.iter().position(Option::is_none) {
            Some(free) if fits => {
                let freed_at = c.clock;
                c.slots[free] = Some(Slot {
                    ptr: ptr as usize,
                    size,
                    align: layout.align(),
                    freed_at,
                });
                c.cached += size;
            }
            // SAFETY: a block of ours, with its layout.
            _ => unsafe { System.dealloc(ptr, layout) },
        }
    }
}

/// A block from System.
unsafe fn fresh(layout: Layout, zeroed: bool) -> *mut u8 {
    if zeroed {
        System.alloc_zeroed(layout)
    } else {
        System.alloc(layout)
    }
}

impl Default for CachingAllocator {
    fn default() -> Self {
        CachingAllocator::new()
    }
}

// SAFETY: every block handed out is either fresh from System or a System block at least as
// large, suitably aligned, that was freed to us and not handed out since; System frees blocks
// whatever size the layout says (glibc's `free`; off Linux only exact layouts are reused).
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BYTES {
            return self.alloc_large(layout, false);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BYTES {
            return self.alloc_large(layout, true);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN_BYTES {
            return self.dealloc_large(ptr, layout);
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_BYTES && new_size < MIN_BYTES {
            return System.realloc(ptr, layout, new_size);
        }
        // Growing or shrinking a large block: a new block (perhaps cached), copy, free the old.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// One "forward pass": `n` blocks of `size` alive at once, then all freed.
    fn pass(a: &CachingAllocator, size: usize, n: usize) {
        let l = Layout::from_size_align(size, 64).unwrap();
        unsafe {
            let ps: Vec<_> = (0..n).map(|_| a.alloc(l)).collect();
            for &p in &ps {
                assert!(!p.is_null());
                p.write_bytes(1, size);
            }
            for p in ps {
                a.dealloc(p, l);
            }
        }
    }

    #[test]
    fn reuses_blocks_of_the_same_or_a_near_size_and_zeroes_them() {
        let a = CachingAllocator::new();
        let big = Layout::from_size_align(8 * MIB, 64).unwrap();
        unsafe {
            let p = a.alloc(big);
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            assert_eq!(a.stats().cached, usable_size(p, big.size()));
            assert_eq!(a.alloc(big), p, "same layout: the cached block");
            a.dealloc(p, big);
            let z = a.alloc_zeroed(big);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, big.size())
                .iter()
                .all(|&b| b == 0));
            a.dealloc(z, big);
            let near = Layout::from_size_align(8 * MIB / MAX_SLACK + MIB, 64).unwrap();
            let q = a.alloc(near);
            if BEST_FIT {
                assert_eq!(q, p, "a smaller size within the slack: the cached block");
                assert_eq!(a.stats().cached, 0);
            }
            a.dealloc(q, near);
            let far = Layout::from_size_align(8 * MIB / MAX_SLACK - MIB / 2, 64).unwrap();
            let r = a.alloc(far);
            assert!(
                a.stats().live < 8 * MIB / MAX_SLACK,
                "a block over MAX_SLACK times the size is not lent: {:?}",
                a.stats()
            );
            a.dealloc(r, far);
        }
    }

    #[test]
    fn holds_no_more_than_the_working_set_allows_however_the_sizes_change() {
        let a = CachingAllocator::new();
        // A sweep: passes of four sizes in turn, each several blocks at once.
        for _ in 0..6 {
            for size in [2 * MIB, 3 * MIB, 4 * MIB, 6 * MIB] {
                pass(&a, size, 5);
                let s = a.stats();
                assert_eq!(s.live, 0);
                assert!(
                    s.cached <= s.peak_requested / 8 * HEADROOM_EIGHTHS,
                    "{s:?} over the budget"
                );
            }
        }
        let s = a.stats();
        assert_eq!(s.peak_requested, 30 * MIB);
        assert!(s.cached > 0, "the cache keeps blocks for the next step");
        // Never more slots than there are.
        for _ in 0..3 {
            pass(&a, MIB, SLOTS + 8);
        }
        assert!(a.stats().cached <= SLOTS * 2 * MIB);
    }

    /// In training mode the cache keeps up to twice the peak of live requests, more than a
    /// forward job's quarter, and never more: a sweep of sizes whose blocks cannot serve each
    /// other fills the larger budget.
    #[test]
    fn training_mode_keeps_twice_the_working_set() {
        let cached_after = |training: bool| {
            let a = CachingAllocator::new();
            if training {
                a.set_training();
            }
            for _ in 0..3 {
                for size in [2 * MIB, 5 * MIB, 11 * MIB] {
                    pass(&a, size, 4);
                    let s = a.stats();
                    let eighths = if training {
                        TRAINING_HEADROOM_EIGHTHS
                    } else {
                        HEADROOM_EIGHTHS
                    };
                    assert!(
                        s.cached <= s.peak_requested / 8 * eighths,
                        "{s:?} over the budget"
                    );
                }
            }
            a.stats()
        };
        let (forward, training) = (cached_after(false), cached_after(true));
        assert_eq!(training.peak_requested, 44 * MIB);
        assert!(forward.cached <= 55 * MIB, "{forward:?}");
        assert!(
            training.cached > 55 * MIB,
            "{training:?}: the training budget is not used"
        );
    }

    /// A training step holds hundreds of activations for its backward pass and frees them
    /// together: the next step gets every one back (64 slots once sent most to the system).
    #[test]
    fn a_training_step_gets_all_its_blocks_back() {
        let a = CachingAllocator::new();
        let n = 300;
        pass(&a, MIB, n);
        let s = a.stats();
        assert!(
            s.cached >= n * MIB,
            "{s:?}: not every block of the step was kept"
        );
        let l = Layout::from_size_align(MIB, 64).unwrap();
        unsafe {
            let ps: Vec<_> = (0..n).map(|_| a.alloc(l)).collect();
            assert_eq!(
                a.stats().cached,
                0,
                "the second step ran in the first one's blocks"
            );
            for p in ps {
                a.dealloc(p, l);
            }
        }
    }

    /// Issue 21: after the input size changes, the blocks of the old size are not kept for ever.
    /// (The policy before kept every freed block by exact size up to an eighth of RAM: 32 MiB
    /// of 8 MiB blocks sat in its cache through any number of passes at a smaller size.)
    #[test]
    fn regression_21_releases_blocks_a_new_size_cannot_use() {
        let a = CachingAllocator::new();
        for _ in 0..5 {
            pass(&a, 8 * MIB, 4);
        }
        let before = a.stats().cached;
        assert!(
            before >= 32 * MIB,
            "the passes' blocks are cached: {before}"
        );
        // A smaller input size: blocks under half the old ones, which cannot use them.
        for _ in 0..30 {
            pass(&a, 3 * MIB / 2, 4);
        }
        let after = a.stats().cached;
        assert!(
            after <= 4 * (3 * MIB / 2 + MIB / 8),
            "cached {after} bytes after the size change (before {before}): only the new size's blocks should stay"
        );
        assert!(after > 0, "the new size's own blocks are cached");
    }

    /// Runs `pass` `passes` times beside a 4 MiB block live throughout (a prefetched input) and
    /// gives the MiB each pass took fresh from System. A step `(slot, Some(mib))` allocates a
    /// block into `slot`, `(slot, None)` frees the slot's block.
    fn fresh_per_pass(slack: usize, pass: &[(usize, Option<usize>)], passes: usize) -> Vec<u64> {
        let a = CachingAllocator::new();
        a.cache.lock().unwrap().slack = slack;
        let layout = |mib: usize| Layout::from_size_align(mib * MIB, 64).unwrap();
        let mut fresh = vec![];
        unsafe {
            let input = a.alloc(layout(4));
            input.write_bytes(1, 4 * MIB);
            let mut live = [(std::ptr::null_mut(), layout(1)); 8];
            for _ in 0..passes {
                let before = a.stats().fresh;
                for &(slot, size) in pass {
                    match size {
                        Some(mib) => {
                            let p = a.alloc(layout(mib));
                            assert!(!p.is_null());
                            p.write_bytes(1, mib * MIB);
                            live[slot] = (p, layout(mib));
                        }
                        None => a.dealloc(live[slot].0, live[slot].1),
                    }
                }
                fresh.push((a.stats().fresh - before) / MIB as u64);
            }
            a.dealloc(input, layout(4));
        }
        fresh
    }

    #[test]
    fn a_repeated_pass_runs_in_its_own_blocks_after_the_first() {
        // An inverted residual block's shape (MobileNetV2): an expansion three times its input,
        // then outputs between a third and a half of it. A slack of 2 could lend the freed
        // expansion block to none of them: it went back to System to make room for them, and
        // every pass faulted it in again.
        let pass = [
            (0, Some(8)),
            (1, Some(24)),
            (0, None),
            (2, Some(9)),
            (1, None),
            (3, Some(9)),
            (2, None),
            (4, Some(3)),
            (3, None),
            (4, None),
        ];
        let fresh = fresh_per_pass(MAX_SLACK, &pass, 5);
        assert!(
            fresh[0] > 0 && fresh[1..].iter().all(|&f| f == 0),
            "{fresh:?}"
        );
        if BEST_FIT {
            let fresh = fresh_per_pass(2, &pass, 5);
            assert!(fresh[1..].iter().all(|&f| f > 0), "slack 2: {fresh:?}");
        }
    }
}
