//! Builds the guest kit (`kit/`, a freestanding no_std library and its programs) with a
//! second cargo invocation and its own target directory, then lets `lib.rs` embed the ELFs.
//!
//! The kit is built for the host target, so no extra target or toolchain is needed: the
//! link flags make each program a static, freestanding ELF at the addresses of
//! `kit/guest.ld`, and SSE is off because the build machines' software KVM cannot emulate it
//! in ring 0.
//!
//! Why the kit's manifest is written here, into `OUT_DIR`, and not kept in `kit/`: a
//! directory with a `Cargo.toml` is another package, which cargo leaves out of this crate's
//! package, and then `splitvisor-guests` would not build from crates.io. The manifest points
//! at the sources in `kit/` by absolute path, and `kit/kit.lock` pins the kit's
//! dependencies (smoltcp for the network guests) as a `Cargo.lock` would.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs of the kit, in the order `lib.rs` lists them; each is
/// `kit/src/bin/<name, dashes as underscores>.rs`.
const PROGRAMS: &[&str] = &[
    "hello",
    "marker",
    "irq",
    "triple-fault",
    "idle",
    "echo",
    "console-flood",
    "blk-verify",
    "blk-bench",
    "blk-stress",
    "blk-break",
    "exit-bench",
    "net-ping",
    "net-echo",
    "net-bench",
];

/// The kit's dependencies, as manifest lines. Every one is `no_std` without an allocator.
const DEPENDENCIES: &str = r#"
# The network guests' TCP/IP stack.
smoltcp = { version = "0.12", default-features = false, features = ["medium-ethernet", "proto-ipv4", "socket-tcp", "socket-udp", "socket-icmp"] }
"#;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kit = manifest_dir.join("kit");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let package_dir = out_dir.join("kit-package");
    let target_dir = out_dir.join("kit-target");
    let host = env::var("HOST").expect("set by cargo");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    // A directory: cargo looks at every file below it.
    println!("cargo:rerun-if-changed={}", kit.display());
    std::fs::create_dir_all(&package_dir).expect("cannot create the kit's package directory");
    std::fs::write(package_dir.join("Cargo.toml"), manifest(&kit)).expect("cannot write the kit's manifest");
    std::fs::copy(kit.join("kit.lock"), package_dir.join("Cargo.lock")).expect("cannot copy kit/kit.lock");

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
        .current_dir(&package_dir)
        .args(["build", "--release", "--bins", "--locked", "--target", &host])
        .arg("--manifest-path")
        .arg(package_dir.join("Cargo.toml"))
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

/// The kit's manifest: its library and one binary per program, by absolute path into `kit`.
fn manifest(kit: &Path) -> String {
    let source = |relative: &str| toml_string(&kit.join(relative));
    let mut text = String::from(
        "# Written by splitvisor-guests' build.rs: the guest kit, built for the host target.\n\
         [package]\nname = \"splitvisor-guest-kit\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [workspace]\n\n[dependencies]",
    );
    text.push_str(DEPENDENCIES);
    let _ = write!(
        text,
        "\n[lib]\nname = \"splitvisor_guest_kit\"\npath = {}\ntest = false\ndoctest = false\nbench = false\n",
        source("src/lib.rs")
    );
    for program in PROGRAMS {
        let path = source(&format!("src/bin/{}.rs", program.replace('-', "_")));
        let _ = write!(text, "\n[[bin]]\nname = \"{program}\"\npath = {path}\ntest = false\nbench = false\n");
    }
    text.push_str(
        "\n[profile.release]\npanic = \"abort\"\nopt-level = 2\nlto = true\ncodegen-units = 1\ndebug = false\n",
    );
    text
}

/// `path` as a TOML basic string.
fn toml_string(path: &Path) -> String {
    let text = path.to_str().expect("the kit's path is UTF-8");
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
