//! The fused attention dropout's seed stream: per device a seed and a counter, advanced on the
//! host at each draw, from which the kernels hash their masks.

use burn::nn::Dropout;
use burn::tensor::Device;

/// Whether `dropout` drops anything now: `p > 0`, training, on an autodiff device.
pub(crate) fn dropout_active(dropout: &Dropout, device: &Device) -> bool {
    dropout.prob > 0.0 && dropout.training.is_enabled() && device.is_autodiff()
}

/// The fused operations' dropout seeds: per device, a seed and a counter, advanced on the host
/// at every draw, so no draw waits for the device (a GPU step keeps its one read).
static DROPOUT_SEEDS: std::sync::Mutex<Vec<(String, u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// The device's key in [`DROPOUT_SEEDS`]: its `Debug` form (the trainer seeds the autodiff
/// device the mixers see).
fn seed_key(device: &Device) -> String {
    format!("{device:?}")
}

/// Restart the fused attention dropout's mask seeds of `device` from `seed` (the trainer calls
/// it with the device's per-step seed, next to `Device::seed`, so a resumed run draws the same
/// masks). Unseeded devices start from seed 0.
pub fn seed_dropout(device: &Device, seed: u64) {
    let key = seed_key(device);
    let mut seeds = DROPOUT_SEEDS.lock().expect("dropout seeds");
    match seeds.iter_mut().find(|(k, ..)| *k == key) {
        Some(entry) => *entry = (key, seed, 0),
        None => seeds.push((key, seed, 0)),
    }
}

/// The dropout probability and mask seed a fused attention operation should use now: `p` and
/// the next seed of the device's host-side stream ([`seed_dropout`]) when `dropout` is active
/// (training, on an autodiff device), else `(0, 0)`.
pub(crate) fn fused_dropout(dropout: &Dropout, device: &Device) -> (f32, u32) {
    if !dropout_active(dropout, device) {
        return (0.0, 0);
    }
    let key = seed_key(device);
    let draw = {
        let mut seeds = DROPOUT_SEEDS.lock().expect("dropout seeds");
        let index = match seeds.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                seeds.push((key, 0, 0));
                seeds.len() - 1
            }
        };
        let (_, seed, counter) = &mut seeds[index];
        *counter += 1;
        splitmix(seed.wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    };
    // f64 -> f32 must not round a valid p < 1 up to 1.
    let p = (dropout.prob as f32).min(1.0 - f32::EPSILON);
    (p, (draw >> 32) as u32)
}

/// SplitMix64's finaliser.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
