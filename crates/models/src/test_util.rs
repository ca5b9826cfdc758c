//! Helpers shared by the unit tests: every tensor test runs on each CPU backend.
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Held by tests that draw fused attention dropout on flex: every `Device::flex().autodiff()`
/// shares one host-side seed stream (`mixer::seed_dropout`), so such tests must not
/// interleave.
pub(crate) static FUSED_DROPOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// wgpu's adapter (Mesa's llvmpipe in CI), started once per test binary (wgpu's runtime
/// registers once), for tests that run Burn's own kernels there (matmul, reductions); `None`
/// with the reason printed — unless `MIXLAB_REQUIRE_WGPU` is set, when a missing adapter fails
/// the test. Also `None` in a `vulkan` build (SPIR-V kernels): cubecl-spirv 0.11.3 declares
/// shared memory with a pointer type where the device lacks
/// `VK_KHR_workgroup_memory_explicit_layout` (lavapipe, Mesa 22.3 to 25.0), an invalid module
/// on which lavapipe crashes, and Burn's matmul and reduction kernels use shared memory
/// (docs/DEVICES.md). [`wgpu_kernels`] is the device for tests that avoid them.
pub fn wgpu() -> Option<Device> {
    if cfg!(feature = "vulkan") {
        eprintln!(
            "skipped: a vulkan build's SPIR-V of Burn's shared-memory kernels is invalid on \
             lavapipe (see test_util::wgpu)"
        );
        return None;
    }
    wgpu_kernels()
}

/// wgpu's adapter for tests whose wgpu side runs only Mixlab's own Cube kernels, slices and
/// elementwise ops (no shared memory), so they run on the WGSL and the SPIR-V compiler alike;
/// `None` (or a failure under `MIXLAB_REQUIRE_WGPU`) as [`wgpu`].
pub fn wgpu_kernels() -> Option<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            // SAFETY: before wgpu starts; Mesa only reads it.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
        }
        Device::wgpu_options().init().map_err(|e| e.to_string())
    });
    match device {
        Ok(device) => Some(device.clone()),
        Err(e) => {
            assert!(
                std::env::var_os("MIXLAB_REQUIRE_WGPU").is_none(),
                "MIXLAB_REQUIRE_WGPU is set but wgpu has no adapter: {e}"
            );
            eprintln!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// The CPU backends every tensor test runs on.
#[allow(deprecated)] // ndarray is deprecated upstream; we keep testing it.
pub fn devices() -> Vec<(&'static str, Device)> {
    vec![("flex", Device::flex()), ("ndarray", Device::ndarray())]
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Every `got[i]` within `rel` of `want[i]`, relative to the largest `|want|`; the message
/// names `what` and the first index that is not.
/// `len` deterministic values in `[-scale/2, scale/2)`, a different pattern per `salt`:
/// kernel inputs for the thread-count tests.
pub fn pattern(len: usize, salt: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5) * scale)
        .collect()
}

/// Whether `kernels` gives the same bits run in a pool of 1 thread and of 3.
pub fn same_bits_on_1_and_3_threads<const N: usize>(
    kernels: impl Fn() -> [Vec<f32>; N] + Send + Sync,
) -> bool {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| kernels().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
    };
    run(1) == run(3)
}

pub fn assert_all_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert!((x - y).abs() <= rel * scale, "{what}[{i}]: {x} vs {y}");
    }
}

/// Train `model` for 150 AdamW steps (lr 1e-2, no decay) on `loss`, returning the losses.
pub fn overfit(mut model: crate::lm::Lm, loss: impl Fn(&crate::lm::Lm) -> Tensor<1>) -> Vec<f32> {
    use burn::optim::{AdamWConfig, GradientsParams};
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut losses = vec![];
    for _ in 0..150 {
        let l = loss(&model);
        losses.push(l.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    losses
}

/// Deterministic pseudo-random token ids `[batch, seq]` in `0..vocab`.
pub fn tokens(
    batch: usize,
    seq: usize,
    vocab: usize,
    salt: u64,
    device: &Device,
) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i as u64 * 2654435761 + salt * 97 + 13) % vocab as u64) as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}
