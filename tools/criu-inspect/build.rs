//! Links `criu-inspect` as a position-dependent executable.
//!
//! With `+crt-static` (see `.cargo/config.toml`) rustc links a static PIE, which relocates
//! its own data at every start: for this binary that is about 80 copy-on-write page faults,
//! a quarter of the run time of a quick command such as `x DIR mems`. Linked without PIE, the
//! linker resolves those relocations once. Only this binary gives up the randomised load
//! address of its own code; `restore`, which runs as root around CRIU, stays a PIE.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE")
        .unwrap_or_default()
        .split(',')
        .any(|feature| feature == "crt-static");
    if target.contains("linux") && static_crt {
        println!("cargo:rustc-link-arg-bins=-no-pie");
        println!("cargo:rustc-link-arg-bins=-static");
    }
}
