//! Under the `cuda` feature, compiles kernels/cuda/*.cu to PTX with nvcc (from $CUDA_ROOT/bin or
//! PATH; scripts/cuda-toolkit.sh provides one without a GPU). Other builds compile no CUDA.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=KILN_PTX_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for the oldest architecture CUDA 13 supports: the driver JIT-compiles it for the GPU.
    let arch = std::env::var("KILN_PTX_ARCH").unwrap_or_else(|_| "compute_75".into());
    const KERNELS: &[&str] = &["blend", "attention", "group_norm"];
    // Included by the kernels: element-type loads and stores.
    println!("cargo:rerun-if-changed=cuda/kiln_dtype.cuh");
    for name in KERNELS {
        let src = format!("cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch={arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("kiln-kernels: cannot run {} ({e}); see scripts/cuda-toolkit.sh", nvcc.display())
            });
        assert!(status.success(), "kiln-kernels: nvcc failed on {src}");
    }
}
