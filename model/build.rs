//! Bakes the libtorch directory into the rpath of this crate's test
//! binaries, so `cargo test -p rlhf-model` runs without LD_LIBRARY_PATH
//! (the worker's build script does the same, and more, for the binaries),
//! and compiles the C++ of `csrc/` against the same libtorch's headers:
//! the fused ops always; the CUDA allocator statistics and the CUDA graph
//! shim where libtorch has CUDA and the CUDA runtime headers are beside it
//! (the PyPI wheels' nvidia packages), with `cfg(rlhf_cuda)` and
//! `cfg(rlhf_cuda_graph)` set for the Rust side.
use std::path::{Path, PathBuf};

fn torch_build(include: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // PyTorch wheels and libtorch archives since 2.7 use the C++11 ABI only.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT");
    b
}

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo::rustc-check-cfg=cfg(rlhf_cuda)");
    println!("cargo::rustc-check-cfg=cfg(rlhf_cuda_graph)");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys reports its libtorch lib dir (DEP_TCH_LIBTORCH_LIB); build with LIBTORCH_USE_PYTORCH=1 or LIBTORCH set",
    ));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // libtorch's layout, a wheel's or a release archive's: lib/ beside include/.
    let include = lib.parent().expect("the lib dir has a parent").join("include");
    torch_build(&include).file("csrc/fused.cpp").compile("rlhf_fused");
    // The CUDA runtime headers: CUDA_HOME's, or a PyPI wheel's nvidia
    // package beside torch/ (its runtime headers lack crt/, which triton's
    // bundled CUDA headers supply: searched after it).
    let site = lib.join("../..");
    let home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    let dirs: Vec<PathBuf> = home
        .into_iter()
        .chain(
            ["nvidia/cu13/include", "nvidia/cuda_runtime/include", "triton/backends/nvidia/include"]
                .iter()
                .map(|d| site.join(d)),
        )
        .filter(|d| d.exists())
        .collect();
    let has = |f: &str| dirs.iter().any(|d| d.join(f).exists());
    if !lib.join("libc10_cuda.so").exists() {
        return;
    }
    if !(has("cuda_runtime_api.h") && has("crt/host_config.h")) {
        println!("cargo:warning=libtorch has CUDA but its runtime headers were not found (CUDA_HOME): no allocator statistics");
        return;
    }
    let mut b = torch_build(&include);
    dirs.iter().for_each(|d| {
        b.include(d);
    });
    println!("cargo:rustc-link-search=native={}", lib.display());
    match b.clone().file("csrc/cuda_stats.cpp").try_compile("rlhf_cuda_stats") {
        Ok(()) => {
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            println!("cargo:rustc-cfg=rlhf_cuda");
        }
        Err(e) => println!("cargo:warning=csrc/cuda_stats.cpp did not compile ({e}): no allocator statistics"),
    }
    match b.file("csrc/cuda_graph.cpp").try_compile("rlhf_cuda_graph") {
        Ok(()) => {
            // (c10_cuda again: the statistics may not have compiled.)
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-cfg=rlhf_cuda_graph");
        }
        Err(e) => {
            println!("cargo:warning=csrc/cuda_graph.cpp did not compile ({e}): decode steps run without CUDA graphs")
        }
    }
}
