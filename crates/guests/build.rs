//! Builds the guest kit (`kit/`, a freestanding no_std library and its programs) by calling
//! rustc directly, then lets `lib.rs` embed the ELFs.
//!
//! The kit is built for the host target, so no extra target or toolchain is needed: the
//! link flags make each program a static, freestanding ELF at the addresses of
//! `kit/guest.ld`, and SSE is off because the build machines' software KVM cannot emulate it
//! in ring 0.
//!
//! Why rustc and not a second cargo: the kit has no dependencies, and a nested cargo would
//! need a `Cargo.toml` in `kit/`, which makes cargo leave the whole directory out of this
//! crate's package (a directory with a manifest is another package), and it would read the
//! configuration (`.cargo/config.toml`, `CARGO_*`) of whatever project builds this crate.
//! rustc reads neither.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The programs of the kit, in the order `lib.rs` lists them; each is
/// `kit/src/bin/<name, dashes as underscores>.rs`.
const PROGRAMS: &[&str] = &[
    "hello",
    "marker",
    "irq",
    "triple-fault",
    "idle",
    "echo",
    "blk-verify",
    "blk-bench",
    "blk-stress",
    "blk-break",
    "exit-bench",
];

/// The kit's library crate, which every program links.
const KIT_CRATE: &str = "splitvisor_guest_kit";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let kit = manifest_dir.join("kit");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("kit");
    let host = env::var("HOST").expect("set by cargo");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // A directory: cargo looks at every file below it.
    println!("cargo:rerun-if-changed={}", kit.display());
    std::fs::create_dir_all(&out_dir).expect("cannot create the kit's output directory");

    let linker_script = kit.join("guest.ld");
    let common = |command: &mut Command| {
        command
            .args(["--edition=2024", "--target", &host])
            .args(["-Copt-level=2", "-Cpanic=abort", "-Ccodegen-units=1", "-Cstrip=debuginfo"])
            .args(["-Crelocation-model=static", "-Ctarget-feature=-sse,-sse2,-avx,-avx2"])
            .args(["-Clink-arg=-nostartfiles", "-Clink-arg=-nostdlib", "-Clink-arg=-static"])
            .args(["-Clink-arg=-Wl,--build-id=none", "-Clink-arg=-Wl,-n"])
            .arg(format!("-Clink-arg=-Wl,-T,{}", linker_script.display()));
    };

    // The library, as bitcode for the programs' link-time optimisation.
    let library = out_dir.join(format!("lib{KIT_CRATE}.rlib"));
    let mut command = Command::new(&rustc);
    common(&mut command);
    command
        .args(["--crate-type", "rlib", "--crate-name", KIT_CRATE, "-Clinker-plugin-lto"])
        .arg("-o")
        .arg(&library)
        .arg(kit.join("src/lib.rs"));
    run(command, "the kit library");

    // The programs, as many at a time as cargo gives this build jobs.
    let jobs = env::var("NUM_JOBS").ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(1).max(1);
    let queue = Mutex::new(PROGRAMS.iter());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(PROGRAMS.len()) {
            scope.spawn(|| {
                loop {
                    let Some(program) = queue.lock().expect("no builder panics holding it").next() else {
                        return;
                    };
                    let mut command = Command::new(&rustc);
                    common(&mut command);
                    let mut extern_kit = OsString::from(format!("{KIT_CRATE}="));
                    extern_kit.push(&library);
                    command
                        .args(["--crate-type", "bin", "--crate-name", &program.replace('-', "_"), "-Clto"])
                        .arg("--extern")
                        .arg(extern_kit)
                        .arg("-o")
                        .arg(out_dir.join(program))
                        .arg(source_of(&kit, program));
                    run(command, program);
                }
            });
        }
    });

    for program in PROGRAMS {
        let elf = out_dir.join(program);
        let var = format!("SPLITVISOR_GUEST_{}", program.to_uppercase().replace('-', "_"));
        println!("cargo:rustc-env={var}={}", elf.display());
    }
}

fn source_of(kit: &Path, program: &str) -> PathBuf {
    kit.join("src/bin").join(format!("{}.rs", program.replace('-', "_")))
}

/// Runs one rustc; fails the build with its output if it fails, and passes the kit's own
/// warnings on to cargo.
fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run rustc to build {what}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "building the guest kit ({what}) failed:\n{stderr}");
    for line in stderr.lines().filter(|line| line.starts_with("warning:")) {
        // The kit turns SSE off on a target whose ABI has it, knowingly (see above).
        let known = line.contains("must be enabled to ensure that the ABI")
            || line.contains("warning emitted")
            || line.contains("warnings emitted");
        if !known {
            println!("cargo:warning=guest kit ({what}): {}", &line["warning:".len()..].trim());
        }
    }
}
