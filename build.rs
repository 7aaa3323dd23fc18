//! Link flags for the optional `torch` feature; the default build needs none.
fn main() {
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        println!("cargo:rerun-if-env-changed=LIBTORCH");
        // Record libtorch's directory so the binary runs without LD_LIBRARY_PATH.
        if let Some(libtorch) = std::env::var_os("LIBTORCH") {
            let lib = std::path::Path::new(&libtorch).join("lib");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
        // Without this the linker drops libtorch.so (nothing calls it directly), and with it
        // libtorch_cuda.so: libtorch then reports a CPU-only build on a GPU machine.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
