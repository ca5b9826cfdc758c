//! Records the optimisation level this crate (the mixers and their fused kernels, where the
//! training time goes) is built at, so `train` can warn when it runs unoptimised.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let level = std::env::var("OPT_LEVEL").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=MIXLAB_MODELS_OPT_LEVEL={level}");
}
