//! Bakes the libtorch directory into the rpath of this crate's test
//! binaries, so `cargo test -p rlhf-model` runs without LD_LIBRARY_PATH
//! (the worker's build script does the same, and more, for the binaries).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
