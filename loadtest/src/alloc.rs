//! The generator's allocator: mimalloc for small blocks, the system allocator (glibc) for
//! large ones.
//!
//! Why both, measured with `perf` on the same 2-core machine as the gateway:
//! - Reconnect storms make millions of small allocations (handshakes, certificates, tasks).
//!   With glibc alone, `malloc` was ~20 % of the generator's CPU in a 100k storm; mimalloc
//!   removed most of it.
//! - Bulk streams allocate one ~16 KiB buffer per TLS record (rustls encrypts into a fresh
//!   `Vec`). mimalloc hands out the blocks of a page in turn before reusing freed ones, so
//!   every record was copied into memory that had left the cache: the copy cost 3–4 × the
//!   AES-GCM of the same bytes and was 35–50 % of the management side's CPU. glibc reuses
//!   the block just freed, which is still in cache: 345 → 424 MB/s through the gateway,
//!   with the generator using less CPU.
//!
//! Blocks are routed by their size, which `dealloc` and `realloc` receive again, so every
//! block is freed by the allocator that made it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this size and larger go to the system allocator.
const LARGE: usize = 4096;

pub struct SplitAlloc;

fn large(layout: &Layout) -> bool {
    layout.size() >= LARGE
}

// SAFETY: every method forwards to a sound allocator with the caller's layout, and a block is
// always returned to the allocator that produced it: the choice depends only on
// `layout.size()`, which the caller must pass unchanged to `dealloc` (GlobalAlloc contract).
// `realloc` moves a block across allocators itself when the new size changes the choice.
unsafe impl GlobalAlloc for SplitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (non-zero-size) layout.
        unsafe {
            if large(&layout) {
                System.alloc(layout)
            } else {
                mimalloc::MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if large(&layout) {
                System.alloc_zeroed(layout)
            } else {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout, so from the allocator chosen here.
        unsafe {
            if large(&layout) {
                System.dealloc(ptr, layout)
            } else {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `new_layout` is valid: the caller guarantees `new_size`, rounded up to
        // `layout.align()`, does not overflow isize. When both sizes pick the same allocator,
        // its own realloc is used. Otherwise a new block is taken from the other one, the
        // `min(old, new)` bytes that are initialised are copied (the blocks cannot overlap:
        // they come from different allocators), and the old block is freed by its owner.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            match (large(&layout), large(&new_layout)) {
                (true, true) => System.realloc(ptr, layout, new_size),
                (false, false) => mimalloc::MiMalloc.realloc(ptr, layout, new_size),
                _ => {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blocks_cross_the_threshold_with_their_contents() {
        // Runs on the global allocator (SplitAlloc): grow a small Vec past the threshold and
        // shrink it back, checking the bytes survive each move between allocators.
        let mut v: Vec<u8> = (0..100u8).collect();
        v.reserve(10_000);
        assert!(v.capacity() >= super::LARGE);
        assert_eq!(v, (0..100u8).collect::<Vec<_>>());
        v.extend(std::iter::repeat_n(7u8, 9_000));
        v.truncate(50);
        v.shrink_to_fit();
        assert!(v.capacity() < super::LARGE);
        assert_eq!(v, (0..50u8).collect::<Vec<_>>());
    }
}
