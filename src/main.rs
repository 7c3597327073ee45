//! `cloud-hypervisor`: starts the VMM, with a VM built from the command line or waiting for one
//! over the REST API.

mod cli_error;

use std::fs::OpenOptions;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use vmm::config::{
    BalloonConfig, ConsoleConfig, CpusConfig, MemoryConfig, OptionParser, PayloadConfig, VmConfig,
};

use cli_error::{handle_clap_error, one_line, ClapOutcome};
use vmm::{start_vmm, SeccompMode, VmmParams};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cloud-hypervisor",
    version,
    about = "A virtual machine monitor whose live migration skips the guest's free memory"
)]
struct Cli {
    /// REST API socket
    #[arg(
        long,
        value_name = "path=<sock>",
        help = "REST API socket: path=<sock> or a bare path"
    )]
    api_socket: Option<String>,
    /// Kernel to boot: an ELF with a PVH note, or a bzImage
    #[arg(long, value_name = "file")]
    kernel: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "text")]
    cmdline: Option<String>,
    /// Initramfs image
    #[arg(long, value_name = "file")]
    initramfs: Option<PathBuf>,
    /// vCPUs
    #[arg(long, value_name = "boot=<n>", help = "vCPUs: boot=<n>")]
    cpus: Option<String>,
    /// Guest memory
    #[arg(
        long,
        value_name = "size=<size>,...",
        help = "Guest memory: size=<size>[,shared=on|off][,prefault=on|off][,thp=on|off]"
    )]
    memory: Option<String>,
    /// virtio-balloon
    #[arg(
        long,
        value_name = "size=<size>,...",
        help = "virtio-balloon: size=<size>[,deflate_on_oom=on|off][,free_page_reporting=on|off]\
                [,free_page_hinting=on|off][,statistics=on|off]"
    )]
    balloon: Option<String>,
    /// Serial port
    #[arg(
        long,
        value_name = "off|null|tty|file=<path>",
        help = "Serial port: off|null|tty|file=<path>"
    )]
    serial: Option<String>,
    /// Console: off|null|tty
    #[arg(long, value_name = "off|null|tty")]
    console: Option<String>,
    /// Append the log to this file instead of standard error
    #[arg(long, value_name = "path")]
    log_file: Option<PathBuf>,
    /// More logging: -v warnings, -vv info, -vvv debug, -vvvv trace
    #[arg(short = 'v', action = ArgAction::Count)]
    verbose: u8,
    /// Seccomp filters on the VMM's threads
    #[arg(
        long,
        value_name = "true|false|log",
        help = "Seccomp filters: true (default: a forbidden call kills the process), \
                false (none) or log (the kernel logs forbidden calls)"
    )]
    seccomp: Option<String>,
    /// Events as JSON lines (one per migration phase change, among others)
    #[arg(
        long,
        value_name = "path=<file>|fd=<n>",
        help = "Write events as JSON lines to a file (path=<file>) or an inherited descriptor (fd=<n>)"
    )]
    event_monitor: Option<String>,
}

fn main() {
    let code = match Cli::try_parse() {
        Ok(cli) => run(cli).unwrap_or_else(|e| {
            eprintln!("cloud-hypervisor: error: {}", one_line(&e));
            1
        }),
        Err(e) => match handle_clap_error(e) {
            ClapOutcome::Printed => 0,
            ClapOutcome::Error(message) => {
                eprintln!("cloud-hypervisor: error: {message}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    init_logging(&cli)?;
    let api_socket = cli
        .api_socket
        .as_deref()
        .map(parse_api_socket)
        .transpose()?;
    let vm_config = vm_config(&cli)?;
    let seccomp: SeccompMode = cli.seccomp.as_deref().unwrap_or("true").parse()?;
    if api_socket.is_none() && vm_config.is_none() {
        bail!("nothing to do: give --kernel to boot a VM, or --api-socket to wait for requests");
    }
    if let Some(config) = &vm_config {
        config.validate()?;
    }
    if let Some(target) = &cli.event_monitor {
        vmm::event_monitor::start(&vmm::event_monitor::EventTarget::parse(target)?)?;
        vmm::event_monitor::emit("vmm", "starting", None);
    }
    log::info!("cloud-hypervisor {} starting", env!("CARGO_PKG_VERSION"));
    Ok(start_vmm(VmmParams {
        api_socket,
        vm_config,
        seccomp,
    })?)
}

/// `--api-socket path=<sock>` or `--api-socket <sock>`.
fn parse_api_socket(value: &str) -> anyhow::Result<PathBuf> {
    let looks_like_options = value
        .split_once('=')
        .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let path = if looks_like_options {
        let options = OptionParser::parse("--api-socket", value, &["path"])?;
        options.get("path").unwrap_or_default().to_string()
    } else {
        value.to_string()
    };
    if path.is_empty() {
        bail!("--api-socket: empty path");
    }
    Ok(PathBuf::from(path))
}

/// The VM configuration, if the command line asks for a VM (with `--kernel`).
fn vm_config(cli: &Cli) -> anyhow::Result<Option<VmConfig>> {
    let Some(kernel) = &cli.kernel else {
        let vm_flags = [
            ("--cmdline", cli.cmdline.is_some()),
            ("--initramfs", cli.initramfs.is_some()),
            ("--cpus", cli.cpus.is_some()),
            ("--memory", cli.memory.is_some()),
            ("--balloon", cli.balloon.is_some()),
            ("--serial", cli.serial.is_some()),
            ("--console", cli.console.is_some()),
        ];
        if let Some((flag, _)) = vm_flags.iter().find(|(_, given)| *given) {
            bail!("{flag} needs --kernel (without it the VM comes from the API)");
        }
        return Ok(None);
    };
    let defaults = VmConfig::default();
    Ok(Some(VmConfig {
        cpus: cli
            .cpus
            .as_deref()
            .map(CpusConfig::parse)
            .transpose()?
            .unwrap_or(defaults.cpus),
        memory: cli
            .memory
            .as_deref()
            .map(MemoryConfig::parse)
            .transpose()?
            .unwrap_or(defaults.memory),
        payload: PayloadConfig {
            kernel: Some(kernel.clone()),
            cmdline: cli.cmdline.clone(),
            initramfs: cli.initramfs.clone(),
        },
        balloon: cli
            .balloon
            .as_deref()
            .map(BalloonConfig::parse)
            .transpose()?,
        serial: cli
            .serial
            .as_deref()
            .map(ConsoleConfig::parse_serial)
            .transpose()?
            .unwrap_or(defaults.serial),
        console: cli
            .console
            .as_deref()
            .map(ConsoleConfig::parse_console)
            .transpose()?
            .unwrap_or(defaults.console),
    }))
}

/// Logs to standard error, or appends to `--log-file`; `-v` raises the level from errors only.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = match cli.verbose {
        0 => log::LevelFilter::Error,
        1 => log::LevelFilter::Warn,
        2 => log::LevelFilter::Info,
        3 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).parse_default_env();
    if let Some(path) = &cli.log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open log file {}", path.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    // Only fails if a logger is already installed, which cannot happen here.
    let _ = builder.try_init();
    Ok(())
}
