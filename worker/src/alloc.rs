//! The worker's memory allocator: mimalloc, linked with its `override`
//! feature so that it serves every `malloc` / `posix_memalign` of the
//! process, libtorch's CPU tensors included (the binary sets it as the
//! global allocator too).
//!
//! Why: a training step allocates and frees gigabytes of activations. glibc's
//! heap keeps the freed medium blocks as fragmented free lists and unmaps
//! the large ones, so the next step faults them in again: a DPO step on
//! Qwen2.5-0.5B (8 pairs × 128 tokens, bf16, 2 threads) peaked at 4.5 GiB
//! resident for 1.8 GiB of saved activations and spent a third of its time
//! on page faults. mimalloc's size-segregated pages fix the first; keeping
//! freed pages for a second before returning them to the OS (its default is
//! 10 ms) fixes the second, at no cost in peak (`rlhf-worker bench dpo`).

// The crate links mimalloc (and its malloc override) into every binary of this one.
use mimalloc as _;

/// mimalloc's `mi_option_purge_delay` (milliseconds before freed memory is
/// returned to the OS; mimalloc 2.x's option number).
const PURGE_DELAY: i32 = 15;
/// Long enough to span a training step's free-then-reallocate cycle.
const PURGE_DELAY_MS: i64 = 1000;

extern "C" {
    fn mi_option_set(option: i32, value: std::os::raw::c_long);
    fn mi_option_get(option: i32) -> std::os::raw::c_long;
    fn mi_collect(force: bool);
}

/// Returns what this thread's heap and the arenas hold free to the OS now,
/// not after the purge delay (between pipeline stages: the next stage may
/// need it in another form, and the process's resident size should show
/// what is in use).
pub fn release_freed() {
    // SAFETY: mimalloc's collector, callable at any time from any thread.
    unsafe { mi_collect(true) };
}

/// Applies the settings above unless `MIMALLOC_PURGE_DELAY` says otherwise.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc's option setter, callable at any time.
        unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// The purge delay in force, in milliseconds.
pub fn purge_delay_ms() -> i64 {
    // SAFETY: mimalloc's option getter.
    unsafe { mi_option_get(PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        // Option 15 is purge_delay in mimalloc 2.x: its default is 10 ms
        // (or what the environment says); tune() makes it 1000.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(super::purge_delay_ms(), 10);
            super::tune();
            assert_eq!(super::purge_delay_ms(), super::PURGE_DELAY_MS);
        }
    }
}
