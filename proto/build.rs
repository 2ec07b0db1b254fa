//! Generates the rlhf.v1 gRPC code with a vendored protoc, so a fresh clone
//! builds with cargo alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the env concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=rlhf/v1");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rlhf_descriptor.bin"))
        .compile_protos(&["rlhf/v1/jobs.proto"], &["."])?;
    Ok(())
}
