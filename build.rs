//! Compiles `proto/csi.proto` and Loam's own `proto/loam.proto` into Rust
//! with a pure-Rust protobuf compiler, so building Loam needs no system
//! `protoc`; and records the git revision being
//! built (`LOAM_GIT_REVISION`), which `loam --version`, GetPluginInfo and the
//! build-info metric report. A build outside a git checkout (an image built
//! from a copy of the tree) takes it from the `LOAM_GIT_REVISION` variable, or
//! says `unknown`.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/loam.proto");
    println!("cargo:rerun-if-env-changed=LOAM_GIT_REVISION");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|text| text.trim().to_owned())
    };
    let revision = std::env::var("LOAM_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=LOAM_GIT_REVISION={revision}");
    // Built again when HEAD moves: a commit, a checkout.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) {
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]).map_or(dir, PathBuf::from);
            println!("cargo:rerun-if-changed={}", common.join(reference).display());
            println!("cargo:rerun-if-changed={}", common.join("packed-refs").display());
        }
    }
    let csi = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(csi)?;
    // Loam's API, in a directory of its own: its CSI messages are the ones
    // of `crate::csi`, so the CSI file generated beside it (services only)
    // is not the one above.
    let api_dir = PathBuf::from(std::env::var("OUT_DIR")?).join("api");
    std::fs::create_dir_all(&api_dir)?;
    let loam = protox::compile(["proto/loam.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".csi.v1", "crate::csi")
        .out_dir(&api_dir)
        .compile_fds(loam)?;
    Ok(())
}
