//! Memory telemetry of this process and its devices: resident memory (Linux `/proc`), what
//! a GPU backend's allocator holds, and what the machine can still give. The trainer logs it
//! in `metrics.jsonl` and `summary.json`; `bench` prints it on every measurement line.

/// Peak resident set size of this process in MiB (Linux `VmHWM`), or null elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Resident memory of this process now, in MiB (Linux; `None` elsewhere).
pub fn rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What the device's allocator holds now (GPU memory on wgpu / CUDA), in MiB: `(in use,
/// reserved)`. `None` on the CPU backends, which do not report it.
pub fn device_memory_mb(device: &burn::tensor::Device) -> Option<(f64, f64)> {
    let usage = device.memory_pool_usage()?;
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    Some((mb(usage.bytes_in_use), mb(usage.bytes_reserved)))
}

/// Memory this machine can still give, in GB (Linux `MemAvailable`), if known.
pub fn available_gb() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1e6)
}
