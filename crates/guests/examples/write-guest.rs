//! Writes one of the embedded guest programs to a file, to boot it under another VMM:
//!
//! ```text
//! cargo run -p splitvisor-guests --example write-guest -- hello hello.elf
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, path] = args.as_slice() else {
        eprintln!("usage: write-guest PROGRAM FILE (programs: {})", splitvisor_guests::names().join(", "));
        return ExitCode::from(2);
    };
    let Some(guest) = splitvisor_guests::find(name) else {
        eprintln!(
            "write-guest: unknown program '{name}' (programs: {})",
            splitvisor_guests::names().join(", ")
        );
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::write(path, guest.elf) {
        eprintln!("write-guest: cannot write {path}: {e}");
        return ExitCode::from(1);
    }
    println!("{name}: {} bytes written to {path}", guest.elf.len());
    ExitCode::SUCCESS
}
