//! The binary's global allocator: the system allocator, plus a small cache of freed large blocks.
//!
//! A CPU forward pass allocates every activation afresh (candle's ops return new storage), and
//! at batch 32 and 224 px the early activations are 50-100 MB each. glibc serves blocks over 32
//! MiB with mmap and returns them with munmap on free, so every batch the kernel zeroes those
//! pages again on first touch and shoots down TLBs on every core when they are unmapped:
//! measured with perf on EfficientNet-B0 at batch 32, about a third of the forward pass was page
//! faults, page zeroing and TLB-shootdown IPIs. A pass allocates the same sizes batch after
//! batch, so keeping freed blocks of 1 MiB and more (up to [`cache_limit`] bytes in all, at most
//! [`SLOTS`] blocks) and handing one back for an allocation of exactly the same size and
//! alignment removes that cost. The oldest cached block is released when the cache is full.
//! Memory returned this way is not zeroed; `alloc_zeroed` zeroes a cached block itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks below this size are left to the system allocator, which already reuses them.
const MIN_BYTES: usize = 1 << 20;
/// Most bytes held in freed blocks: an eighth of physical memory, between 1 and 8 GiB. A batch
/// of 64 at 224 px through EfficientNet-B0 in calibrate mode frees blocks of up to 300 MB, so a
/// fixed 1 GiB evicted (and refaulted) every batch there.
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

/// Most blocks held.
pub const SLOTS: usize = 48;

#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
    align: usize,
    /// Insertion order, to release the oldest first.
    age: u64,
}

struct Cache {
    slots: [Option<Slot>; SLOTS],
    bytes: usize,
    clock: u64,
}

/// The system allocator with a cache of large freed blocks (see the module doc).
pub struct CachingAllocator {
    cache: Mutex<Cache>,
}

impl CachingAllocator {
    pub const fn new() -> CachingAllocator {
        CachingAllocator {
            cache: Mutex::new(Cache {
                slots: [None; SLOTS],
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// A cached block of exactly this layout, taken out of the cache.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut c = self.cache.lock().ok()?;
        let i = c.slots.iter().position(|s| {
            s.is_some_and(|s| s.size == layout.size() && s.align == layout.align())
        })?;
        let s = c.slots[i].take()?;
        c.bytes -= s.size;
        Some(s.ptr as *mut u8)
    }

    /// Keeps a freed block; false when it is not kept (the caller frees it).
    fn put(&self, ptr: *mut u8, layout: Layout) -> bool {
        let limit = cache_limit();
        if layout.size() > limit {
            return false;
        }
        let Ok(mut c) = self.cache.lock() else {
            return false;
        };
        // Room: release the oldest blocks until this one fits and a slot is free (System never
        // calls back into this allocator, so freeing under the lock cannot deadlock).
        loop {
            let full = c.slots.iter().all(Option::is_some);
            if !full && c.bytes + layout.size() <= limit {
                break;
            }
            let Some(i) = (0..SLOTS)
                .filter(|&i| c.slots[i].is_some())
                .min_by_key(|&i| c.slots[i].map_or(u64::MAX, |s| s.age))
            else {
                break;
            };
            let old = c.slots[i].take().expect("slot chosen as occupied");
            c.bytes -= old.size;
            // SAFETY: `old` was allocated by System with this layout and is owned by the cache.
            unsafe {
                System.dealloc(
                    old.ptr as *mut u8,
                    Layout::from_size_align_unchecked(old.size, old.align),
                )
            };
        }
        let Some(free) = c.slots.iter().position(Option::is_none) else {
            return false;
        };
        c.clock += 1;
        let age = c.clock;
        c.slots[free] = Some(Slot {
            ptr: ptr as usize,
            size: layout.size(),
            align: layout.align(),
            age,
        });
        c.bytes += layout.size();
        true
    }
}

impl Default for CachingAllocator {
    fn default() -> Self {
        CachingAllocator::new()
    }
}

// SAFETY: every block handed out is either fresh from System or a block System allocated with
// the same size and alignment that was freed to us and not handed out since; blocks are
// returned to System with the layout they were allocated with.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BYTES {
            if let Some(p) = self.take(layout) {
                return p;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BYTES {
            if let Some(p) = self.take(layout) {
                std::ptr::write_bytes(p, 0, layout.size());
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= MIN_BYTES && self.put(ptr, layout) {
            return;
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

    #[test]
    fn reuses_exact_sizes_and_stays_within_its_limits() {
        let a = CachingAllocator::new();
        let big = Layout::from_size_align(4 << 20, 64).unwrap();
        unsafe {
            let p = a.alloc(big);
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            assert_eq!(a.alloc(big), p, "same layout: the cached block");
            a.dealloc(p, big);
            let z = a.alloc_zeroed(big);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, big.size())
                .iter()
                .all(|&b| b == 0));
            a.dealloc(z, big);
            let other = Layout::from_size_align(5 << 20, 64).unwrap();
            let q = a.alloc(other);
            assert_ne!(q, p, "another size is not served from the cache");
            a.dealloc(q, other);
            // Fill past the slot count: the oldest go, the count and bytes stay bounded.
            let ptrs: Vec<_> = (0..SLOTS + 8).map(|_| a.alloc(big)).collect();
            for p in ptrs {
                a.dealloc(p, big);
            }
            let c = a.cache.lock().unwrap();
            assert_eq!(c.slots.iter().flatten().count(), SLOTS);
            assert!(c.bytes <= cache_limit());
        }
    }
}
