//! `splitvisor-ctl`: drives a running VM's control socket (`--api-socket PATH` on the
//! examples): lists the devices' drivers, and restarts, upgrades or fails one.
//!
//! ```text
//! splitvisor-ctl --api-socket /run/vm.sock list
//! splitvisor-ctl --api-socket /run/vm.sock upgrade disk0 --driver ./target/x86_64-unknown-linux-gnu/release/splitvisor-driver
//! ```
//!
//! The protocol is one line of JSON per request and per answer (see
//! `splitvisor::layout::api`); `--json` prints the answer as it came.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};

/// Drive a running splitvisor VM's drivers through its control socket.
#[derive(Debug, Parser)]
#[command(name = "splitvisor-ctl", version)]
struct Args {
    /// The VM's control socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the answer as the JSON line it came as.
    #[arg(long)]
    json: bool,
    /// Wait up to this long for the control socket to appear (a VM started just before
    /// is still setting up); by default a missing socket is an error at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    wait: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every device: placement, fault policy, driver process, health, restarts.
    List,
    /// Replace a device's driver as after a crash.
    Restart {
        /// The device (`disk0`, `com1`, ...).
        device: String,
    },
    /// Start a new driver (another `splitvisor-driver` binary, optionally) and hand the
    /// device over to it; prints how long the device paused.
    Upgrade {
        /// The device.
        device: String,
        /// The new driver program (default: the one running now).
        #[arg(long, value_name = "PATH")]
        driver: Option<PathBuf>,
    },
    /// Fail a device, as its fault policy would.
    Fail {
        /// The device.
        device: String,
    },
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Nothing given: what to give, not clap's whole help.
            eprintln!("splitvisor-ctl: nothing to do. {} (see --help)", Args::command().render_usage());
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line: clap's first paragraph (a list of missing arguments follows its
            // line), joined.
            let rendered = e.render().to_string();
            let first: Vec<&str> =
                rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
            eprintln!("splitvisor-ctl: {} (see --help)", first.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitvisor-ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// Connects to `socket`, retrying for up to `wait` while nobody listens there yet.
fn connect(socket: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(socket) {
            Err(e)
                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let request = match &args.command {
        Command::List => serde_json::json!({"op": "list"}),
        Command::Restart { device } => serde_json::json!({"op": "restart", "device": device}),
        Command::Fail { device } => serde_json::json!({"op": "fail", "device": device}),
        Command::Upgrade { device, driver } => match driver {
            Some(path) => {
                let path = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::json!({"op": "upgrade", "device": device, "driver": path})
            }
            None => serde_json::json!({"op": "upgrade", "device": device}),
        },
    };
    let socket = &args.api_socket;
    let mut stream = connect(socket, Duration::from_secs(args.wait))
        .map_err(|e| format!("cannot reach {}: {e}", socket.display()))?;
    let io = |e: std::io::Error| format!("{}: {e}", socket.display());
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
    writeln!(stream, "{request}").map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    if args.json {
        print!("{line}");
        return Ok(());
    }
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("unreadable answer: {e}"))?;
    if answer["ok"] != true {
        return Err(answer["error"].as_str().unwrap_or("the VM refused").to_string());
    }
    match &args.command {
        Command::List => {
            println!(
                "{:<8} {:<12} {:<18} {:<12} {:>8}  {:<40} policy",
                "device", "kind", "placement", "driver", "restarts", "health"
            );
            for device in answer["devices"].as_array().into_iter().flatten() {
                let text = |key: &str| device[key].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<8} {:<12} {:<18} {:<12} {:>8}  {:<40} {}",
                    text("device"),
                    text("kind"),
                    text("placement"),
                    text("driver"),
                    device["restarts"].as_u64().unwrap_or(0),
                    text("health"),
                    text("policy"),
                );
            }
        }
        Command::Upgrade { device, .. } => {
            let result = &answer["result"];
            let paused = result["paused_us"].as_u64().unwrap_or(0);
            println!(
                "{device}: now served by {} (the device paused {}.{:03} ms)",
                result["driver"].as_str().unwrap_or("?"),
                paused / 1000,
                paused % 1000
            );
        }
        Command::Restart { device } => {
            println!("{device}: now served by {}", answer["result"]["driver"].as_str().unwrap_or("?"));
        }
        Command::Fail { device } => println!("{device}: failed"),
    }
    Ok(())
}
