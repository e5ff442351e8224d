//! Compiles model/cuda/paged_attention.cu and paged_prefill.cu to PTX (loaded by `paged.rs` and
//! `paged_prefill.rs` at run time), only with the `cuda` feature: a CPU build needs no nvcc and
//! does nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/paged_attention.cu");
    println!("cargo:rerun-if-changed=cuda/paged_prefill.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) if PathBuf::from(&home).join("bin/nvcc").exists() => {
            PathBuf::from(home).join("bin/nvcc")
        }
        _ => PathBuf::from("nvcc"),
    };
    let ptx = out.join("paged_attention.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("cuda/paged_attention.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{} --ptx cuda/paged_attention.cu failed: {s}",
            nvcc.display()
        ),
        Err(e) => panic!(
            "cannot run {} (set CUDA_HOME or put nvcc on PATH): {e}",
            nvcc.display()
        ),
    }
    // The prefill kernel (paged_prefill.rs), the same way.
    let ptx = out.join("paged_prefill.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("cuda/paged_prefill.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} --ptx cuda/paged_prefill.cu failed: {s}", nvcc.display()),
        Err(e) => panic!(
            "cannot run {} (set CUDA_HOME or put nvcc on PATH): {e}",
            nvcc.display()
        ),
    }
}
