//! Which backend a device is: where the flex kernels and the Cube kernels run.

use burn::tensor::Device;

/// Whether `device` is flex (autodiff or not), where the fused mixer operations
/// (the kernels of this folder) run. Burn 0.22 has no backend query on
/// a `Device`; its `Debug` form names the backend.
pub fn on_flex(device: &Device) -> bool {
    format!("{device:?}").contains("Flex")
}

/// Whether `device` is one of Burn's CubeCL backends (wgpu, CUDA, ...).
pub fn on_cube(device: &Device) -> bool {
    format!("{device:?}").contains("Cube")
}
