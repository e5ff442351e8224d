//! Compiles the kernels in model/cuda/ to PTX (each loaded at run time by its module:
//! paged_attention.cu by `paged.rs`, paged_prefill.cu by `paged_prefill.rs`, fused.cu by
//! `fused.rs`, sample.cu by `device_sampling.rs`), only with the `cuda` feature: a CPU build
//! needs no nvcc and does nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, each compiled to `$OUT_DIR/<name>.ptx`.
const KERNELS: [&str; 4] = ["paged_attention", "paged_prefill", "fused", "sample"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for name in KERNELS {
        println!("cargo:rerun-if-changed=cuda/{name}.cu");
    }
    println!("cargo:rerun-if-changed=cuda/common.cuh");
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
    for name in KERNELS {
        compile_ptx(
            &nvcc,
            &cap,
            &format!("cuda/{name}.cu"),
            &out.join(format!("{name}.ptx")),
        );
    }
}

/// `nvcc --ptx -O3` of `src` into `ptx` for `sm_<cap>`.
fn compile_ptx(nvcc: &Path, cap: &str, src: &str, ptx: &Path) {
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} --ptx {src} failed: {s}", nvcc.display()),
        Err(e) => panic!(
            "cannot run {} (set CUDA_HOME or put nvcc on PATH): {e}",
            nvcc.display()
        ),
    }
}
