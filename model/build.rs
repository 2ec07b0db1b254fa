//! Bakes the libtorch directory into the rpath of this crate's test
//! binaries, so `cargo test -p rlhf-model` runs without LD_LIBRARY_PATH
//! (the worker's build script does the same, and more, for the binaries),
//! and compiles the fused ops of `csrc/` against the same libtorch's headers.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/fused.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys reports its libtorch lib dir (DEP_TCH_LIBTORCH_LIB); build with LIBTORCH_USE_PYTORCH=1 or LIBTORCH set",
    ));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // libtorch's layout, a wheel's or a release archive's: lib/ beside include/.
    let include = lib.parent().expect("the lib dir has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // PyTorch wheels and libtorch archives since 2.7 use the C++11 ABI only.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/fused.cpp")
        .compile("rlhf_fused");
}
