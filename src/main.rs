//! `senet`: the command-line interface. Parses arguments and calls the library; nothing else.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use senet_wgpu::gpu::{self, GpuOptions, NoAdapterError};

#[derive(Parser)]
#[command(name = "senet", version, about = "Train Squeeze-and-Excitation networks on any GPU through wgpu")]
struct Cli {
    /// Backends to search: vulkan, metal, dx12, gl, or a comma list (default: WGPU_BACKEND, else all).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Use the first adapter whose name contains this text (default: WGPU_ADAPTER_NAME).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter with its backend, type, driver and the limits that matter,
    /// and say which one `senet` would use.
    Devices,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = GpuOptions { backend: cli.backend, adapter_name: cli.adapter };
    match cli.command {
        Command::Devices => {
            let adapters = gpu::list_adapters(&opts)?;
            if adapters.is_empty() {
                return Err(NoAdapterError { detail: String::new() }.into());
            }
            for a in &adapters {
                println!("{a}\n");
            }
            let chosen = gpu::Gpu::new(&opts)?;
            println!("selected: {}", chosen.describe());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A missing adapter, like bad input, is the user's to fix: exit 2, as for bad arguments.
            ExitCode::from(2)
        }
    }
}
