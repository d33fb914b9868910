//! Builds the guest kit (`kit/`, a freestanding no_std package) with a second cargo
//! invocation and its own target directory, then lets `lib.rs` embed the ELFs.
//!
//! The kit is built for the host target, so no extra target or toolchain is needed: the
//! link flags make it a static, freestanding ELF at the addresses of `kit/guest.ld`, and
//! SSE is off because the build machines' software KVM cannot emulate it in ring 0.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The programs of the kit, in the order `lib.rs` lists them.
const PROGRAMS: &[&str] = &[
    "hello",
    "irq",
    "triple-fault",
    "idle",
    "echo",
    "blk-verify",
    "blk-bench",
    "blk-break",
    "exit-bench",
    "net-ping",
    "net-echo",
    "net-bench",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kit = manifest_dir.join("kit");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("kit-target");
    let host = env::var("HOST").expect("set by cargo");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    for path in ["src", "Cargo.toml", "Cargo.lock", "guest.ld"] {
        println!("cargo:rerun-if-changed={}", kit.join(path).display());
    }

    let linker_script = kit.join("guest.ld");
    let rustflags = [
        "-Crelocation-model=static".to_string(),
        "-Ctarget-feature=-sse,-sse2,-avx,-avx2".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        "-Clink-arg=-Wl,-n".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", linker_script.display()),
        // The kit knowingly turns SSE off on a target whose ABI has it; say so once, here.
        "-Awarnings".to_string(),
    ]
    .join("\x1f");

    let status = Command::new(cargo)
        .current_dir(&kit)
        .args(["build", "--release", "--bins", "--target", &host])
        .arg("--manifest-path")
        .arg(kit.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Whatever the outer build was given is not for the freestanding kit.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_PROFILE_RELEASE_LTO")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_LLVM_COV")
        .env_remove("CARGO_MAKEFLAGS")
        .env(format!("CARGO_TARGET_{}_RUSTFLAGS", host.to_uppercase().replace('-', "_")), "")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .status()
        .expect("cannot run cargo to build the guest kit");
    assert!(status.success(), "building the guest kit failed (see the output above)");

    let bin_dir = target_dir.join(&host).join("release");
    for program in PROGRAMS {
        let elf = bin_dir.join(program);
        assert!(elf.exists(), "the guest kit did not produce {}", elf.display());
        let var = format!("SPLITVISOR_GUEST_{}", program.to_uppercase().replace('-', "_"));
        println!("cargo:rustc-env={var}={}", elf.display());
    }
}
