//! glibc malloc tuned for a training step's allocation pattern.
//!
//! A flex step allocates and frees the same few hundred buffers every step, many between
//! 128 KiB and a few MiB. With glibc's defaults each of those is an `mmap` on allocation and
//! an `munmap` on free (the dynamic mmap threshold starts at 128 KiB), and the top of the heap
//! is trimmed back to the kernel whenever 128 KiB are free, so every step page-faults its
//! activations in again: on the 2-core machine about a fifth of a small step's time was kernel
//! time (`exc_page_fault`, `clear_page`, `unmap_page_range`, `__brk`).
//!
//! [`keep_freed_memory`] serves allocations up to 32 MiB (glibc's largest allowed threshold)
//! from the heap and stops trimming it, so freed buffers are reused by the next step instead of
//! returned and faulted in again. Peak RSS does not grow (a step's peak is reused, not added
//! to); docs/BENCHMARKS.md has the measurement. Not a memory pool: the system
//! allocator with two of its documented `mallopt` settings.

/// Largest mmap threshold glibc accepts on 64-bit targets (`HEAP_MAX_SIZE / 2`); larger values
/// are ignored.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory kept at the heap's top before glibc gives it back.
const TRIM_THRESHOLD: i32 = 1 << 30;
/// Extra bytes asked of the kernel whenever the heap grows, so it grows seldom.
const TOP_PAD: i32 = 64 << 20;

/// The glibc tunables a user may set instead (`MALLOC_*_` environment variables, or any
/// `GLIBC_TUNABLES`, which may hold the same settings); when one is set, the user's choice
/// stands and nothing is changed.
const USER_SETTINGS: [&str; 4] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
];

/// Keep freed memory in the process for reuse (see the module doc). Call once, first thing in
/// `main`, before other threads start. A no-op off glibc, or when the user set glibc's malloc
/// tunables. Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    if USER_SETTINGS.iter().any(|k| std::env::var_os(k).is_some()) {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
fn apply() -> bool {
    let settings = [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ];
    // Each setting on its own: one glibc refuses must not keep the others from applying.
    // SAFETY: `mallopt` only changes allocator parameters; it is called before other threads
    // allocate and with values glibc documents as valid for these parameters on 64-bit targets.
    settings
        .map(|(param, value)| unsafe { libc::mallopt(param, value) } == 1)
        .iter()
        .all(|&applied| applied)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    fn glibc_accepts_every_setting() {
        // mallopt returns 0 for a value it refuses (e.g. an mmap threshold above 32 MiB), so a
        // refused setting would silently leave the defaults in place.
        assert!(super::apply(), "glibc refused one of the malloc settings");
    }
}
