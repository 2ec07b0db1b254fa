//! Bakes the libtorch directory into the binaries' rpath so they run without
//! LD_LIBRARY_PATH, and keeps libtorch_cuda linked: with `--as-needed` the
//! linker drops it (nothing references it by symbol) and CUDA then silently
//! reports unavailable.
//!
//! NCCL: cudarc dlopens `libnccl.so`, but torch's nvidia-nccl wheel ships
//! only `libnccl.so.2`; a `libnccl.so` link to it goes in OUT_DIR, and that
//! directory in the rpath, so GPU data parallel finds the NCCL torch uses.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its lib dir; binaries need LD_LIBRARY_PATH");
        return;
    };
    let lib = PathBuf::from(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let nccl = lib.join("../../nvidia/nccl/lib/libnccl.so.2");
    if let (Ok(target), Ok(out)) = (nccl.canonicalize(), std::env::var("OUT_DIR")) {
        let dir = PathBuf::from(out).join("nccl");
        let link = dir.join("libnccl.so");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::remove_file(&link);
        match std::os::unix::fs::symlink(&target, &link) {
            Ok(()) => println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display()),
            Err(e) => println!("cargo:warning=cannot link {}: {e}", link.display()),
        }
    }
}
