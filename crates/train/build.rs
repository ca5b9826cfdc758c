//! No build step: the script exists so that the `[build-dependencies]` feature request in
//! Cargo.toml (clang-sys's `clang_11_0`, one build for the README's two commands) is honoured.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
