//! `ch-remote`: sends one request to a running `cloud-hypervisor` over its API socket, prints
//! the JSON answer on standard output, and exits 0 on a 2xx answer, 1 otherwise.

#[path = "../cli_error.rs"]
mod cli_error;
#[path = "../follow.rs"]
mod follow;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm::api::client::send_request;
use vmm::api::ApiRequest;
use vmm::config::{
    parse_size, BalloonHintsAction, ConfigError, HintAction, ReceiveMigrationData,
    SendMigrationData, VmConfig, VmResizeData,
};

use cli_error::{handle_clap_error, one_line, ClapOutcome};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "ch-remote",
    version,
    about = "Control a cloud-hypervisor VMM through its API socket"
)]
struct Cli {
    /// The VMM's API socket
    #[arg(long, value_name = "path")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// The requests.
#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the VMM answers (vmm.ping)
    Ping,
    /// Show the VM's state and configuration (vm.info)
    Info,
    /// Show the VM's device counters (vm.counters)
    Counters,
    /// Pause the VM (vm.pause)
    Pause,
    /// Resume the VM (vm.resume)
    Resume,
    /// Shut the VM down (vm.shutdown)
    Shutdown,
    /// Stop the VMM process (vmm.shutdown)
    ShutdownVmm,
    /// Boot the created VM (vm.boot)
    Boot,
    /// Delete the VM (vm.delete)
    Delete,
    /// Create a VM from a JSON configuration file (vm.create)
    Create {
        /// The vm.create JSON body
        path: PathBuf,
    },
    /// Resize the balloon (vm.resize)
    Resize {
        /// New balloon size, with an optional K, M or G suffix
        #[arg(long, value_name = "size")]
        balloon: String,
    },
    /// Wait for an incoming migration (vm.receive-migration)
    #[command(about = "Wait for a migration on <url> (vm.receive-migration)")]
    ReceiveMigration {
        /// Where to listen
        #[arg(help = "unix:<path> or tcp:<host>:<port>, or receiver_url=<url>[,tls_dir=<dir>]")]
        url: String,
    },
    /// Migrate the VM and print the report (vm.send-migration)
    #[command(about = "Migrate the VM to <url> and print the report (vm.send-migration)")]
    SendMigration {
        /// Local migration (memory handed over, not copied)
        #[arg(long)]
        local: bool,
        /// Return once the migration has started (print its progress) instead of waiting
        #[arg(long)]
        no_wait: bool,
        /// Where to send the VM, and the migration options
        #[arg(
            help = "unix:<path> or tcp:<host>:<port>, or destination_url=<url>[,downtime_ms=<n>]\
            [,timeout_s=<n>][,timeout_strategy=cancel|ignore][,free_page_hints=on|off][,zero_pages=on|off]\
            [,hint_wait_ms=<n>][,local=on][,tls_dir=<dir>][,connections=<n>]"
        )]
        url: String,
    },
    /// Show where the migration being sent or received is (vm.migration-progress)
    MigrationProgress,
    /// Stop the migration being sent or received; the VM runs on (vm.migration-cancel)
    MigrationCancel,
    /// Show the last hinting round, or run a step of one (vm.balloon-hints)
    BalloonHints {
        /// start, stop or done; none to show the state
        action: Option<String>,
    },
}

fn main() {
    let code = match Cli::try_parse() {
        Ok(cli) => run(cli).unwrap_or_else(|e| {
            eprintln!("ch-remote: {}", one_line(&e));
            1
        }),
        Err(e) => match handle_clap_error(e) {
            ClapOutcome::Printed => 0,
            ClapOutcome::Error(message) => {
                eprintln!("ch-remote: {message}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let wait = matches!(cli.command, Command::SendMigration { no_wait: false, .. });
    let request = request(cli.command)?;
    let response = send_request(&cli.api_socket, &request)?;
    if !response.is_success() {
        eprintln!("ch-remote: {}", response.error_message());
        return Ok(1);
    }
    // 202: the migration runs on; follow it to the report, as when the request blocked.
    if wait && response.status == 202 {
        return follow::follow_migration(&cli.api_socket);
    }
    print_body(&response.body)?;
    Ok(0)
}

/// Prints an answer's body on standard output, ending in a newline.
fn print_body(body: &[u8]) -> anyhow::Result<()> {
    if !body.is_empty() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(body)?;
        if !body.ends_with(b"\n") {
            stdout.write_all(b"\n")?;
        }
        stdout.flush()?;
    }
    Ok(())
}

/// The API request for a command, with its options checked here rather than by the server.
fn request(command: Command) -> anyhow::Result<ApiRequest> {
    Ok(match command {
        Command::Ping => ApiRequest::VmmPing,
        Command::Info => ApiRequest::VmInfo,
        Command::Counters => ApiRequest::VmCounters,
        Command::Pause => ApiRequest::VmPause,
        Command::Resume => ApiRequest::VmResume,
        Command::Shutdown => ApiRequest::VmShutdown,
        Command::ShutdownVmm => ApiRequest::VmmShutdown,
        Command::Boot => ApiRequest::VmBoot,
        Command::Delete => ApiRequest::VmDelete,
        Command::Create { path } => {
            let text =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let config: VmConfig = serde_json::from_slice(&text)
                .with_context(|| format!("invalid VM configuration in {}", path.display()))?;
            ApiRequest::VmCreate(Box::new(config))
        }
        Command::Resize { balloon } => {
            let size = parse_size(&balloon).ok_or(ConfigError::InvalidSize {
                flag: "resize",
                key: "--balloon",
                value: balloon.clone(),
            })?;
            ApiRequest::VmResize(VmResizeData {
                desired_balloon: Some(size),
                ..Default::default()
            })
        }
        Command::ReceiveMigration { url } => {
            ApiRequest::VmReceiveMigration(ReceiveMigrationData::parse(&url)?)
        }
        Command::MigrationProgress => ApiRequest::VmMigrationProgress,
        Command::MigrationCancel => ApiRequest::VmMigrationCancel,
        Command::SendMigration { local, url, .. } => {
            let mut data = SendMigrationData::parse(&url)?;
            data.local |= local;
            ApiRequest::VmSendMigration(data)
        }
        Command::BalloonHints { action: None } => ApiRequest::VmBalloonHintsGet,
        Command::BalloonHints {
            action: Some(action),
        } => ApiRequest::VmBalloonHintsPut(BalloonHintsAction {
            action: HintAction::parse(&action)?,
        }),
    })
}
