//! Errors of configuration parsing and validation.

use std::io;
use std::path::PathBuf;

use super::ConsoleOutputMode;
#[cfg(doc)]
use super::{MIN_MEMORY_SIZE, PAGE_SIZE};

/// Errors from parsing or validating a VM configuration.
///
/// Every message is one line that names the flag (or request field) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The option string is empty.
    #[error("{flag}: empty value")]
    Empty {
        /// The flag or request being parsed.
        flag: &'static str,
    },
    /// An item has no `=value`.
    #[error("{flag}: \"{key}\" needs a value (key=value)")]
    MissingValue {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The item without a value.
        key: String,
    },
    /// A key the flag does not know.
    #[error("{flag}: unknown option \"{key}\"")]
    UnknownKey {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The unknown key.
        key: String,
    },
    /// A key given twice.
    #[error("{flag}: option \"{key}\" given more than once")]
    DuplicateKey {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The repeated key.
        key: String,
    },
    /// A required key is missing.
    #[error("{flag}: \"{key}\" is required")]
    MissingKey {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A size that does not parse.
    #[error("{flag}: invalid size \"{value}\" for {key} (expected bytes with an optional K, M or G suffix)")]
    InvalidSize {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The key holding the size.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A toggle that is neither `on` nor `off`.
    #[error("{flag}: {key} must be on or off, not \"{value}\"")]
    InvalidToggle {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The key holding the toggle.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A number that does not parse or is out of range.
    #[error("{flag}: invalid number \"{value}\" for {key}")]
    InvalidNumber {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The key holding the number.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A value outside the accepted set.
    #[error("{flag}: invalid value \"{value}\" (expected {expected})")]
    InvalidValue {
        /// The flag or request being parsed.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The VM has no kernel to boot.
    #[error("no kernel given (--kernel)")]
    NoKernel,
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {}", path.display())]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("kernel {} is neither an ELF image nor a bzImage", path.display())]
    KernelFormat {
        /// The kernel path.
        path: PathBuf,
    },
    /// The initramfs file cannot be opened.
    #[error("cannot open initramfs {}", path.display())]
    InitramfsRead {
        /// The initramfs path.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: io::Error,
    },
    /// `boot_vcpus` is zero.
    #[error("--cpus: boot must be between 1 and 255")]
    NoVcpus,
    /// `max_vcpus` is smaller than `boot_vcpus`.
    #[error("--cpus: max ({max}) is smaller than boot ({boot})")]
    MaxVcpus {
        /// Boot vCPUs.
        boot: u8,
        /// Maximum vCPUs.
        max: u8,
    },
    /// Guest memory below [`MIN_MEMORY_SIZE`].
    #[error("--memory: size {size} is below the minimum of 64 MiB")]
    MemoryTooSmall {
        /// The size given, in bytes.
        size: u64,
    },
    /// Guest memory not a multiple of [`PAGE_SIZE`].
    #[error("--memory: size {size} is not a multiple of 4 KiB")]
    MemoryUnaligned {
        /// The size given, in bytes.
        size: u64,
    },
    /// The balloon is as large as the guest memory or larger.
    #[error("--balloon: size {balloon} must be smaller than the memory size {memory}")]
    BalloonTooLarge {
        /// Balloon size, in bytes.
        balloon: u64,
        /// Memory size, in bytes.
        memory: u64,
    },
    /// A console or serial mode that needs a path has none, or one that must not have one has one.
    #[error("{flag}: mode {mode:?} {problem}")]
    ConsolePath {
        /// `--serial` or `--console`.
        flag: &'static str,
        /// The mode.
        mode: ConsoleOutputMode,
        /// What is wrong.
        problem: &'static str,
    },
    /// A migration URL that is neither `unix:<path>` nor `tcp:<host>:<port>`.
    #[error("{key}: \"{url}\" is not unix:<path> or tcp:<host>:<port>")]
    InvalidUrl {
        /// The field holding the URL.
        key: &'static str,
        /// The URL given.
        url: String,
    },
    /// A request asks for something this VMM does not do.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// A resize request that resizes nothing.
    #[error("vm.resize: nothing to resize (give desired_balloon)")]
    NothingToResize,
    /// Migration options that do not fit together (`connections`, `tls_dir`).
    #[error("{flag}: {problem}")]
    MigrationOption {
        /// `send-migration` or `receive-migration`.
        flag: &'static str,
        /// What is wrong.
        problem: String,
    },
}
