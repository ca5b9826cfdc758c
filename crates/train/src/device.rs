//! Backend selection. Burn 0.22 dispatches at run time, so the backend is only a choice of
//! [`Device`]: every module is the same code on every backend.

use anyhow::{Result, bail};
use burn::tensor::wgpu::WgpuBackend;
use burn::tensor::{Device, DeviceConfig, DeviceKind, FloatDType};

/// A backend named in `train.backend` or `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// A hardware GPU through wgpu if one is present, else flex.
    Auto,
    /// Burn's pure-Rust CPU backend (upstream's recommended CPU backend).
    Flex,
    /// The ndarray CPU backend (deprecated upstream; kept for comparison).
    NdArray,
    /// wgpu (Vulkan / Metal / DX12 / GL), any adapter, including software ones (llvmpipe).
    Wgpu,
    /// Burn's CUDA backend (binaries built with `--features cuda`).
    Cuda,
    /// wgpu pinned to Vulkan, its kernels compiled to SPIR-V (tensor-core matmuls) instead of
    /// WGSL (binaries built with `--features vulkan`).
    Vulkan,
}

impl BackendChoice {
    /// Parse a backend name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "auto" => Self::Auto,
            "flex" => Self::Flex,
            "ndarray" => Self::NdArray,
            "wgpu" => Self::Wgpu,
            "cuda" => Self::Cuda,
            "vulkan" => Self::Vulkan,
            other => bail!(
                "unknown backend `{other}` (train.backend / --backend): use one of auto, flex, \
                 ndarray, wgpu, cuda, vulkan"
            ),
        })
    }
}

/// The device a run trains on, with a human-readable description.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The (non-autodiff) device.
    pub device: Device,
    /// `flex`, `ndarray` or `wgpu`: the concrete backend.
    pub backend: &'static str,
    /// E.g. `wgpu: NVIDIA H200 (DiscreteGpu, Vulkan)`.
    pub description: String,
}

/// Pick the device for `choice`.
pub fn select(choice: BackendChoice) -> Result<Selected> {
    let selected = pick(choice, None)?;
    point_default_at(&selected);
    Ok(selected)
}

/// The optimizer restores its state on `Device::default()` before moving it to the
/// parameters' device; point that default at our backend instead of wgpu's.
fn point_default_at(selected: &Selected) {
    let name = if selected.backend == "cuda" {
        "cuda"
    } else {
        selected.backend
    };
    // SAFETY: called at start-up, before any other thread reads the environment.
    unsafe { std::env::set_var("BURN_DEVICE", name) };
}

/// The devices of a data-parallel run (`train.devices` / `--devices`), the first being the
/// main device (it holds the model and the optimizer and evaluates). Each entry is a backend
/// name with an optional index (`flex`, `ndarray`, `wgpu`, `wgpu:1`, `cuda:0`) or a bare index
/// on `backend` (`0`, `1`: the n-th GPU of wgpu, `auto` or cuda). An empty list is `backend`'s
/// one device.
pub fn select_many(backend: BackendChoice, devices: &[String]) -> Result<Vec<Selected>> {
    if devices.is_empty() {
        return Ok(vec![select(backend)?]);
    }
    let mut out: Vec<Selected> = Vec::with_capacity(devices.len());
    for entry in devices {
        let (choice, index) = parse_device(backend, entry)?;
        let selected = pick(choice, index)
            .map_err(|e| anyhow::anyhow!("train.devices entry `{entry}`: {e:#}"))?;
        if let Some(twin) = out.iter().find(|s| s.device == selected.device) {
            bail!(
                "train.devices lists the same device twice (`{entry}` is {}); name each device once",
                twin.description
            );
        }
        out.push(selected);
    }
    point_default_at(&out[0]);
    Ok(out)
}

/// Float precision of a run (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere (the default).
    F32,
    /// IEEE half precision for parameters, activations and optimizer state.
    F16,
    /// bfloat16 (f32's range, 8 bits of mantissa).
    Bf16,
}

/// Parse one `train.devices` entry (see [`select_many`]).
pub fn parse_device(backend: BackendChoice, entry: &str) -> Result<(BackendChoice, Option<usize>)> {
    let entry = entry.trim();
    let index = |s: &str| {
        s.parse::<usize>().map_err(|_| {
            anyhow::anyhow!(
                "train.devices entry `{entry}`: `{s}` is not a device index (use e.g. `wgpu:1`)"
            )
        })
    };
    if entry.chars().all(|c| c.is_ascii_digit()) && !entry.is_empty() {
        let i = index(entry)?;
        return match backend {
            BackendChoice::Auto | BackendChoice::Wgpu => Ok((BackendChoice::Wgpu, Some(i))),
            BackendChoice::Cuda => Ok((BackendChoice::Cuda, Some(i))),
            BackendChoice::Vulkan => Ok((BackendChoice::Vulkan, Some(i))),
            BackendChoice::Flex | BackendChoice::NdArray => bail!(
                "train.devices entry `{entry}`: the CPU backends have one device each; name \
                 them instead (devices = [\"flex\", \"ndarray\"]) or use a GPU backend"
            ),
        };
    }
    let (name, i) = match entry.split_once(':') {
        Some((name, i)) => (name, Some(index(i)?)),
        None => (entry, None),
    };
    let choice = BackendChoice::parse(name)
        .map_err(|e| anyhow::anyhow!("train.devices entry `{entry}`: {e:#}"))?;
    match (choice, i) {
        (BackendChoice::Auto, _) => bail!(
            "train.devices entry `{entry}`: name a concrete backend (flex, ndarray, wgpu, cuda, \
             vulkan)"
        ),
        (BackendChoice::Flex | BackendChoice::NdArray, Some(i)) if i > 0 => {
            bail!("train.devices entry `{entry}`: {name} has one device (index 0)")
        }
        _ => Ok((choice, i)),
    }
}

fn pick(choice: BackendChoice, index: Option<usize>) -> Result<Selected> {
    Ok(match choice {
        BackendChoice::Flex => flex(),
        #[allow(deprecated)] // ndarray is deprecated upstream; we keep it to measure against.
        BackendChoice::NdArray => Selected {
            device: Device::ndarray(),
            backend: "ndarray",
            description: "ndarray (CPU)".into(),
        },
        BackendChoice::Wgpu => match index {
            None => match wgpu(DeviceKind::DefaultDevice) {
                Ok(s) => s,
                Err(e) => bail!(
                    "backend wgpu was requested but no adapter is available ({e}); install a \
                     Vulkan driver (Debian: mesa-vulkan-drivers) or use --backend flex"
                ),
            },
            Some(i) => wgpu_index(i)?,
        },
        BackendChoice::Auto => match wgpu(DeviceKind::DefaultDevice) {
            Ok(s) if !s.description.contains("Cpu") => s,
            _ => flex(),
        },
        BackendChoice::Cuda => cuda(index.unwrap_or(0))?,
        BackendChoice::Vulkan => vulkan(index)?,
    })
}

/// The adapter kinds GPU number `i` may be, in order of preference: discrete, integrated,
/// virtual.
fn gpu_kinds(i: usize) -> Vec<DeviceKind> {
    vec![
        DeviceKind::DiscreteGpu(i),
        DeviceKind::IntegratedGpu(i),
        DeviceKind::VirtualGpu(i),
    ]
}

/// The first of `kinds` that starts on graphics API `api` (see [`wgpu_on`]), or the last
/// error.
fn first_adapter(
    kinds: Vec<DeviceKind>,
    api: WgpuBackend,
    backend: &'static str,
) -> Result<Selected, String> {
    let mut last = String::new();
    for kind in kinds {
        match wgpu_on(kind, api, backend) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `wgpu:i`: discrete GPU `i`, else integrated GPU `i`, else virtual GPU `i`, else (for
/// `i = 0`) a CPU adapter such as llvmpipe.
fn wgpu_index(i: usize) -> Result<Selected> {
    let mut kinds = gpu_kinds(i);
    if i == 0 {
        kinds.push(DeviceKind::Cpu);
    }
    first_adapter(kinds, WgpuBackend::Auto, "wgpu")
        .map_err(|last| anyhow::anyhow!("no wgpu adapter number {i} ({last})"))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Selected> {
    let device = Device::cuda(index);
    Ok(Selected {
        device,
        backend: "cuda",
        description: format!("cuda:{index}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Selected> {
    bail!(
        "this build has no CUDA backend: rebuild with `cargo build --release --features cuda` \
         (needs an NVIDIA driver at run time), or use --backend wgpu"
    )
}

/// wgpu on Vulkan with the SPIR-V compiler: GPU `index` (discrete first), or the default
/// adapter. Builds without the `vulkan` feature refuse with the rebuild command (they would
/// compile WGSL on Vulkan, which is `--backend wgpu`).
fn vulkan(index: Option<usize>) -> Result<Selected> {
    if !cfg!(feature = "vulkan") {
        bail!(
            "this build has no SPIR-V Vulkan backend: rebuild with `cargo build --release \
             --features vulkan` (a Vulkan GPU driver at run time), or use --backend wgpu"
        );
    }
    let kinds = index.map_or_else(|| vec![DeviceKind::DefaultDevice], gpu_kinds);
    first_adapter(kinds, WgpuBackend::Vulkan, "vulkan").map_err(|last| {
        anyhow::anyhow!(
            "backend vulkan was requested but no Vulkan GPU is available ({last}); use \
             --backend wgpu"
        )
    })
}

fn flex() -> Selected {
    Selected {
        device: Device::flex(),
        backend: "flex",
        description: "flex (CPU)".into(),
    }
}

/// Initialise wgpu on an adapter of `kind`, failing cleanly when there is none.
pub fn wgpu(kind: DeviceKind) -> Result<Selected, String> {
    wgpu_on(kind, WgpuBackend::Auto, "wgpu")
}

/// Initialise wgpu on an adapter of `kind` through graphics API `api` (`Auto`: wgpu's choice),
/// reported as `backend`.
fn wgpu_on(kind: DeviceKind, api: WgpuBackend, backend: &'static str) -> Result<Selected, String> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // Mesa's drivers print an error per probe without it; any private directory will do.
        // SAFETY: set during start-up, before the wgpu runtime spawns threads.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let (device, setup) = Device::wgpu_options()
        .device_kind(kind)
        .graphics_api(api)
        .init_with_setup()
        .map_err(|e| e.to_string())?;
    let info = setup.adapter.get_info();
    Ok(Selected {
        device,
        backend,
        description: format!(
            "{backend}: {} ({:?}, {:?})",
            info.name, info.device_type, info.backend
        ),
    })
}

/// Make `precision` the default float type of `selected`'s device. Call it before any tensor
/// exists on the device (Burn fixes a device's dtypes at its first tensor). Burn keeps no f32
/// master weights: in `f16` / `bf16` the parameters and AdamW's moments are half precision too.
pub fn set_precision(selected: &mut Selected, precision: Precision) -> Result<()> {
    let (dtype, name) = match precision {
        Precision::F32 => return Ok(()),
        Precision::F16 => (FloatDType::F16, "f16"),
        Precision::Bf16 => (FloatDType::BF16, "bf16"),
    };
    if !selected.device.supports_dtype(dtype) {
        let hint = match selected.backend {
            "ndarray" => "ndarray has no half precision: use --backend flex",
            "wgpu" | "cuda" | "vulkan" => {
                "this device lacks the support: use precision = \"f32\" here"
            }
            _ => "use precision = \"f32\"",
        };
        bail!(
            "train.precision = \"{name}\": {} does not support {name}; {hint}",
            selected.description
        );
    }
    selected
        .device
        .configure(DeviceConfig::default().float_dtype(dtype))
        .map_err(|e| {
            anyhow::anyhow!(
                "train.precision = \"{name}\": cannot set up {} ({e:?})",
                selected.description
            )
        })?;
    selected.description.push_str(&format!(" · {name}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entries_parse_to_backend_and_index() {
        let p = |backend, entry: &str| parse_device(backend, entry).map_err(|e| format!("{e:#}"));
        assert_eq!(
            p(BackendChoice::Auto, "1").unwrap(),
            (BackendChoice::Wgpu, Some(1))
        );
        assert_eq!(
            p(BackendChoice::Cuda, "0").unwrap(),
            (BackendChoice::Cuda, Some(0))
        );
        assert_eq!(
            p(BackendChoice::Flex, "wgpu:2").unwrap(),
            (BackendChoice::Wgpu, Some(2))
        );
        assert_eq!(
            p(BackendChoice::Wgpu, " ndarray ").unwrap(),
            (BackendChoice::NdArray, None)
        );
        assert!(
            p(BackendChoice::Flex, "1")
                .unwrap_err()
                .contains("one device each")
        );
        assert!(
            p(BackendChoice::Wgpu, "flex:1")
                .unwrap_err()
                .contains("one device")
        );
        assert!(
            p(BackendChoice::Wgpu, "auto")
                .unwrap_err()
                .contains("concrete backend")
        );
        assert!(
            p(BackendChoice::Wgpu, "wgpu:x")
                .unwrap_err()
                .contains("not a device index")
        );
        assert!(
            p(BackendChoice::Wgpu, "tpu")
                .unwrap_err()
                .contains("unknown backend")
        );
        assert_eq!(
            p(BackendChoice::Vulkan, "1").unwrap(),
            (BackendChoice::Vulkan, Some(1))
        );
        assert_eq!(
            p(BackendChoice::Flex, "vulkan:0").unwrap(),
            (BackendChoice::Vulkan, Some(0))
        );
    }

    /// A build without the `vulkan` feature refuses `--backend vulkan` with the rebuild
    /// command (it never starts wgpu on another compiler behind the user's back).
    #[cfg(not(feature = "vulkan"))]
    #[test]
    fn vulkan_without_the_feature_names_the_rebuild() {
        let err = format!("{:#}", select(BackendChoice::Vulkan).unwrap_err());
        assert!(err.contains("--features vulkan"), "{err}");
        assert!(err.contains("--backend wgpu"), "{err}");
    }
}
