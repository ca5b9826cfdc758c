//! Backend selection. Burn 0.22 dispatches at run time, so the backend is only a choice of
//! [`Device`]: every module is the same code on every backend.

use anyhow::{Result, bail};
use burn::tensor::{Device, DeviceConfig, DeviceKind, FloatDType};

use crate::config::Precision;

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
}

impl BackendChoice {
    /// Parse a backend name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "auto" => Self::Auto,
            "flex" => Self::Flex,
            "ndarray" => Self::NdArray,
            "wgpu" => Self::Wgpu,
            other => bail!(
                "unknown backend `{other}` (train.backend / --backend): use one of auto, flex, ndarray, wgpu"
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
    let selected = match choice {
        BackendChoice::Flex => flex(),
        #[allow(deprecated)] // ndarray is deprecated upstream; we keep it to measure against.
        BackendChoice::NdArray => Selected {
            device: Device::ndarray(),
            backend: "ndarray",
            description: "ndarray (CPU)".into(),
        },
        BackendChoice::Wgpu => match wgpu(DeviceKind::DefaultDevice) {
            Ok(s) => s,
            Err(e) => bail!(
                "backend wgpu was requested but no adapter is available ({e}); install a Vulkan \
                 driver (Debian: mesa-vulkan-drivers) or use --backend flex"
            ),
        },
        BackendChoice::Auto => match wgpu(DeviceKind::DefaultDevice) {
            Ok(s) if !s.description.contains("Cpu") => s,
            _ => flex(),
        },
    };
    // The optimizer restores its state on `Device::default()` before moving it to the
    // parameters' device; point that default at our backend instead of wgpu's.
    // SAFETY: called once at start-up, before any other thread reads the environment.
    unsafe { std::env::set_var("BURN_DEVICE", selected.backend) };
    Ok(selected)
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
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // Mesa's drivers print an error per probe without it; any private directory will do.
        // SAFETY: set during start-up, before the wgpu runtime spawns threads.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let (device, setup) = Device::wgpu_options()
        .device_kind(kind)
        .init_with_setup()
        .map_err(|e| e.to_string())?;
    let info = setup.adapter.get_info();
    Ok(Selected {
        device,
        backend: "wgpu",
        description: format!(
            "wgpu: {} ({:?}, {:?})",
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
            "wgpu" => "this adapter lacks the shader support: use precision = \"f32\" here",
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
