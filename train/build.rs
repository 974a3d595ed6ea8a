//! With `--features cuda`: compiles train/kernels/*.cu to PTX with nvcc (loaded by the
//! driver at run time; `CUDA_COMPUTE_CAP`, default 90, picks the virtual architecture).
//! Without it: nothing.
fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let kernels: &[&str] = &["attention", "ops"];
    for name in kernels {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "-o"])
            .arg(out.join(format!("{name}.ptx")))
            .arg(format!("kernels/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (scripts/cuda/env.sh provides one): {e}"));
        assert!(status.success(), "nvcc failed on kernels/{name}.cu");
    }
}
