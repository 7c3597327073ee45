//! VM configuration: the `vm.create` body, the command line option strings that build it, and the
//! bodies of the other API requests.
//!
//! The JSON shapes follow Cloud Hypervisor's: a `vm.create` body such as
//! `{"cpus": {"boot_vcpus": 2}, "memory": {"size": 536870912}, "payload": {"kernel": "/vmlinux"}}`
//! is accepted as is; omitted fields take the defaults documented on each type. Unknown fields are
//! rejected so that a feature we do not have (a disk, a network card) is never silently dropped.

mod error;
mod parser;
mod request;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use parser::{parse_decimal, parse_size, parse_toggle, OptionParser, MIB};
pub use request::{
    BalloonHintsAction, HintAction, ReceiveMigrationData, SendMigrationData, TimeoutStrategy,
    VmResizeData,
};

/// Smallest guest memory we accept, in bytes.
pub const MIN_MEMORY_SIZE: u64 = 64 * MIB;
/// Guest memory default size, in bytes.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 * MIB;
/// Guest page size: memory sizes must be a multiple of it.
pub const PAGE_SIZE: u64 = 4096;

/// vCPU configuration (`--cpus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CpusConfigBody")]
pub struct CpusConfig {
    /// vCPUs started at boot, 1..=255. Default 1.
    pub boot_vcpus: u8,
    /// Maximum vCPUs; we do not hot-plug, so this is normally `boot_vcpus` (its default).
    pub max_vcpus: u8,
}

/// The JSON form of [`CpusConfig`], where `max_vcpus` defaults to `boot_vcpus`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CpusConfigBody {
    #[serde(default = "default_boot_vcpus")]
    boot_vcpus: u8,
    max_vcpus: Option<u8>,
}

fn default_boot_vcpus() -> u8 {
    1
}

impl From<CpusConfigBody> for CpusConfig {
    fn from(body: CpusConfigBody) -> Self {
        CpusConfig {
            boot_vcpus: body.boot_vcpus,
            max_vcpus: body.max_vcpus.unwrap_or(body.boot_vcpus),
        }
    }
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

impl CpusConfig {
    /// Parses `boot=<n>[,max=<n>]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--cpus", input, &["boot", "max"])?;
        let boot_vcpus = p.number::<u8>("boot")?.unwrap_or(1);
        if boot_vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let max_vcpus = p.number::<u8>("max")?.unwrap_or(boot_vcpus);
        let config = CpusConfig {
            boot_vcpus,
            max_vcpus,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.boot_vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.max_vcpus < self.boot_vcpus {
            return Err(ConfigError::MaxVcpus {
                boot: self.boot_vcpus,
                max: self.max_vcpus,
            });
        }
        Ok(())
    }
}

/// Guest memory configuration (`--memory`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Size in bytes. Default 512 MiB; at least 64 MiB and a multiple of 4 KiB.
    #[serde(default = "default_memory_size")]
    pub size: u64,
    /// Map guest memory `MAP_SHARED` (needed for local migration). Default false.
    #[serde(default)]
    pub shared: bool,
    /// Populate guest memory at start. Default false.
    #[serde(default)]
    pub prefault: bool,
    /// Advise transparent huge pages on guest memory. Default true.
    #[serde(default = "default_true")]
    pub thp: bool,
}

fn default_memory_size() -> u64 {
    DEFAULT_MEMORY_SIZE
}

fn default_true() -> bool {
    true
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            shared: false,
            prefault: false,
            thp: true,
        }
    }
}

impl MemoryConfig {
    /// Parses `size=<size>[,shared=on|off][,prefault=on|off][,thp=on|off]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--memory", input, &["size", "shared", "prefault", "thp"])?;
        let defaults = MemoryConfig::default();
        let config = MemoryConfig {
            size: p.size("size")?.unwrap_or(defaults.size),
            shared: p.toggle("shared")?.unwrap_or(defaults.shared),
            prefault: p.toggle("prefault")?.unwrap_or(defaults.prefault),
            thp: p.toggle("thp")?.unwrap_or(defaults.thp),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.size < MIN_MEMORY_SIZE {
            return Err(ConfigError::MemoryTooSmall { size: self.size });
        }
        if !self.size.is_multiple_of(PAGE_SIZE) {
            return Err(ConfigError::MemoryUnaligned { size: self.size });
        }
        Ok(())
    }
}

/// What to boot (`--kernel`, `--cmdline`, `--initramfs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// ELF (PVH) or bzImage kernel.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Initramfs image.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

/// virtio-balloon configuration (`--balloon`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Initial balloon size in bytes. Default 0.
    #[serde(default)]
    pub size: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (free page reporting).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_HINT (free page hinting, used by migration).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ.
    #[serde(default)]
    pub statistics: bool,
}

impl BalloonConfig {
    /// Parses `size=<size>[,deflate_on_oom=on|off][,free_page_reporting=on|off]
    /// [,free_page_hinting=on|off][,statistics=on|off]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "--balloon",
            input,
            &[
                "size",
                "deflate_on_oom",
                "free_page_reporting",
                "free_page_hinting",
                "statistics",
            ],
        )?;
        Ok(BalloonConfig {
            size: p.size("size")?.unwrap_or(0),
            deflate_on_oom: p.toggle("deflate_on_oom")?.unwrap_or(false),
            free_page_reporting: p.toggle("free_page_reporting")?.unwrap_or(false),
            free_page_hinting: p.toggle("free_page_hinting")?.unwrap_or(false),
            statistics: p.toggle("statistics")?.unwrap_or(false),
        })
    }
}

/// Where a serial port or console writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    /// No device.
    #[serde(alias = "off")]
    Off,
    /// Device present, output discarded.
    #[serde(alias = "null")]
    Null,
    /// Output to the VMM's standard output.
    #[serde(alias = "tty")]
    Tty,
    /// Output appended to a file.
    #[serde(alias = "file")]
    File,
}

/// Serial port (`--serial`) or console (`--console`) configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Output mode.
    pub mode: ConsoleOutputMode,
    /// Output file, for [`ConsoleOutputMode::File`] only.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// The serial port default: present, output discarded.
    pub fn default_serial() -> Self {
        ConsoleConfig {
            mode: ConsoleOutputMode::Null,
            file: None,
        }
    }

    /// The console default: off (there is no virtio-console).
    pub fn default_console() -> Self {
        ConsoleConfig {
            mode: ConsoleOutputMode::Off,
            file: None,
        }
    }

    /// Parses `--serial off|null|tty|file=<path>`.
    pub fn parse_serial(input: &str) -> Result<Self, ConfigError> {
        if let Some(path) = input.strip_prefix("file=") {
            if path.is_empty() {
                return Err(ConfigError::ConsolePath {
                    flag: "--serial",
                    mode: ConsoleOutputMode::File,
                    problem: "needs a path",
                });
            }
            return Ok(ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: Some(PathBuf::from(path)),
            });
        }
        let mode = simple_mode("--serial", input, "off, null, tty or file=<path>")?;
        Ok(ConsoleConfig { mode, file: None })
    }

    /// Parses `--console off|null|tty`.
    pub fn parse_console(input: &str) -> Result<Self, ConfigError> {
        let mode = simple_mode("--console", input, "off, null or tty")?;
        Ok(ConsoleConfig { mode, file: None })
    }

    fn validate(&self, flag: &'static str) -> Result<(), ConfigError> {
        let problem = match (self.mode, &self.file) {
            (ConsoleOutputMode::File, None) => "needs a path",
            (ConsoleOutputMode::File, Some(_)) | (_, None) => return Ok(()),
            (_, Some(_)) => "takes no path",
        };
        Err(ConfigError::ConsolePath {
            flag,
            mode: self.mode,
            problem,
        })
    }
}

fn simple_mode(
    flag: &'static str,
    input: &str,
    expected: &'static str,
) -> Result<ConsoleOutputMode, ConfigError> {
    match input {
        "off" => Ok(ConsoleOutputMode::Off),
        "null" => Ok(ConsoleOutputMode::Null),
        "tty" => Ok(ConsoleOutputMode::Tty),
        _ => Err(ConfigError::InvalidValue {
            flag,
            value: input.to_string(),
            expected,
        }),
    }
}

/// The whole VM configuration: the `vm.create` body, also built from the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest memory.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Kernel, command line and initramfs.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// virtio-balloon, if any.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// Serial port (COM1). Default `Null`.
    #[serde(default = "ConsoleConfig::default_serial")]
    pub serial: ConsoleConfig,
    /// Console. Default `Off`; only `Off`, `Null` and `Tty` are accepted.
    #[serde(default = "ConsoleConfig::default_console")]
    pub console: ConsoleConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: PayloadConfig::default(),
            balloon: None,
            serial: ConsoleConfig::default_serial(),
            console: ConsoleConfig::default_console(),
        }
    }
}

impl VmConfig {
    /// Checks a configuration before a VM is built from it to boot: the resources (see
    /// [`VmConfig::validate_resources`]), and that the kernel is given, readable and an ELF or
    /// bzImage, and that the initramfs, if any, can be opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_resources()?;
        let kernel = self
            .payload
            .kernel
            .as_deref()
            .ok_or(ConfigError::NoKernel)?;
        check_kernel(kernel)?;
        if let Some(initramfs) = &self.payload.initramfs {
            File::open(initramfs).map_err(|source| ConfigError::InitramfsRead {
                path: initramfs.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Checks everything but the payload files: what a migration destination, which never loads
    /// the kernel, needs from a configuration it receives.
    pub fn validate_resources(&self) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        self.memory.validate()?;
        if let Some(balloon) = &self.balloon {
            if balloon.size >= self.memory.size {
                return Err(ConfigError::BalloonTooLarge {
                    balloon: balloon.size,
                    memory: self.memory.size,
                });
            }
        }
        self.serial.validate("--serial")?;
        self.console.validate("--console")?;
        if self.console.mode == ConsoleOutputMode::File {
            return Err(ConfigError::InvalidValue {
                flag: "--console",
                value: "file".to_string(),
                expected: "off, null or tty",
            });
        }
        Ok(())
    }
}

/// Offset of the `HdrS` magic in a bzImage's setup header.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// Checks that `path` can be read and starts like an ELF image or a bzImage.
pub fn check_kernel(path: &Path) -> Result<(), ConfigError> {
    let read_err = |source| ConfigError::KernelRead {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.is_dir() {
        return Err(read_err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    file.take((BZIMAGE_MAGIC_OFFSET + 4) as u64)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS");
    if elf || bzimage {
        Ok(())
    } else {
        Err(ConfigError::KernelFormat {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("vmm-config-{}-{name}", std::process::id()));
            let mut f = File::create(&path).unwrap();
            f.write_all(contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn bzimage() -> Vec<u8> {
        let mut v = vec![0u8; 0x400];
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v
    }

    #[test]
    fn cpus() {
        assert_eq!(
            CpusConfig::parse("boot=4").unwrap(),
            CpusConfig {
                boot_vcpus: 4,
                max_vcpus: 4
            }
        );
        assert_eq!(
            CpusConfig::parse("boot=2,max=8").unwrap(),
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 8
            }
        );
        assert_eq!(CpusConfig::parse("boot=255").unwrap().boot_vcpus, 255);
        for bad in [
            "",
            "boot=0",
            "boot=256",
            "boot=-1",
            "boot=x",
            "boot=",
            "boot",
            "boot=2,max=1",
            "boot=1,boot=2",
            "topology=1:1:1:1",
        ] {
            assert!(CpusConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            CpusConfig::parse("boot=0").unwrap_err().to_string(),
            "--cpus: boot must be between 1 and 255"
        );
        assert_eq!(
            CpusConfig::parse("boot=256").unwrap_err().to_string(),
            "--cpus: invalid number \"256\" for boot"
        );
    }

    #[test]
    fn cpus_json() {
        let c: CpusConfig = serde_json::from_str(r#"{"boot_vcpus": 3}"#).unwrap();
        assert_eq!(
            c,
            CpusConfig {
                boot_vcpus: 3,
                max_vcpus: 3
            }
        );
        let c: CpusConfig = serde_json::from_str(r#"{"boot_vcpus": 1, "max_vcpus": 4}"#).unwrap();
        assert_eq!(c.max_vcpus, 4);
        assert_eq!(
            serde_json::from_str::<CpusConfig>("{}").unwrap(),
            CpusConfig::default()
        );
        assert!(serde_json::from_str::<CpusConfig>(r#"{"boot_vcpus": 256}"#).is_err());
        assert!(serde_json::from_str::<CpusConfig>(r#"{"topology": {}}"#).is_err());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"boot_vcpus":1,"max_vcpus":4}"#
        );
    }

    #[test]
    fn memory() {
        assert_eq!(
            MemoryConfig::parse("size=1G").unwrap(),
            MemoryConfig {
                size: 1 << 30,
                ..Default::default()
            }
        );
        let m = MemoryConfig::parse("size=128M,shared=on,prefault=on,thp=off").unwrap();
        assert_eq!(
            m,
            MemoryConfig {
                size: 128 * MIB,
                shared: true,
                prefault: true,
                thp: false
            }
        );
        assert_eq!(
            MemoryConfig::parse("shared=on").unwrap().size,
            DEFAULT_MEMORY_SIZE
        );
        assert_eq!(MemoryConfig::parse("size=65536K").unwrap().size, 64 * MIB);
        for bad in [
            "",
            "size=12Q",
            "size=",
            "size=0",
            "size=63M",
            "size=67108865",
            "size=99999999999999999999",
            "size=17179869184G",
            "size=1G,shared=yes",
            "size=1G,size=2G",
            "size=1G,hugepages=on",
            "1G",
        ] {
            assert!(MemoryConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            MemoryConfig::parse("size=12Q").unwrap_err().to_string(),
            "--memory: invalid size \"12Q\" for size (expected bytes with an optional K, M or G suffix)"
        );
        assert_eq!(
            MemoryConfig::parse("size=0").unwrap_err().to_string(),
            "--memory: size 0 is below the minimum of 64 MiB"
        );
        assert_eq!(
            MemoryConfig::parse("size=1G,thp=1")
                .unwrap_err()
                .to_string(),
            "--memory: thp must be on or off, not \"1\""
        );
        assert_eq!(
            MemoryConfig::parse("size=1G,mergeable=on")
                .unwrap_err()
                .to_string(),
            "--memory: unknown option \"mergeable\""
        );
    }

    #[test]
    fn balloon() {
        assert_eq!(
            BalloonConfig::parse("size=0").unwrap(),
            BalloonConfig::default()
        );
        let b = BalloonConfig::parse(
            "size=64M,deflate_on_oom=on,free_page_reporting=on,free_page_hinting=on,statistics=on",
        )
        .unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                size: 64 * MIB,
                deflate_on_oom: true,
                free_page_reporting: true,
                free_page_hinting: true,
                statistics: true
            }
        );
        assert_eq!(
            BalloonConfig::parse("free_page_hinting=on").unwrap().size,
            0
        );
        for bad in [
            "",
            "size=1X",
            "size=1M,free_page_hinting=1",
            "size=1M,size=1M",
            "size=1M,foo=on",
            "size",
        ] {
            assert!(BalloonConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn console() {
        assert_eq!(
            ConsoleConfig::parse_serial("off").unwrap().mode,
            ConsoleOutputMode::Off
        );
        assert_eq!(
            ConsoleConfig::parse_serial("null").unwrap(),
            ConsoleConfig::default_serial()
        );
        assert_eq!(
            ConsoleConfig::parse_serial("tty").unwrap().mode,
            ConsoleOutputMode::Tty
        );
        let s = ConsoleConfig::parse_serial("file=/tmp/a,b=c").unwrap();
        assert_eq!(
            s,
            ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: Some("/tmp/a,b=c".into())
            }
        );
        for bad in ["", "file=", "pty", "socket=/x", "Tty", "file"] {
            assert!(ConsoleConfig::parse_serial(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ConsoleConfig::parse_console("off").unwrap(),
            ConsoleConfig::default_console()
        );
        assert_eq!(
            ConsoleConfig::parse_console("tty").unwrap().mode,
            ConsoleOutputMode::Tty
        );
        assert_eq!(
            ConsoleConfig::parse_console("null").unwrap().mode,
            ConsoleOutputMode::Null
        );
        assert_eq!(
            ConsoleConfig::parse_console("file=/x")
                .unwrap_err()
                .to_string(),
            "--console: invalid value \"file=/x\" (expected off, null or tty)"
        );
        assert!(ConsoleConfig::parse_console("pty").is_err());
    }

    #[test]
    fn vm_config_json_defaults_and_round_trip() {
        let c: VmConfig = serde_json::from_str(r#"{"payload": {"kernel": "/k"}}"#).unwrap();
        assert_eq!(c.cpus, CpusConfig::default());
        assert_eq!(c.memory, MemoryConfig::default());
        assert_eq!(c.serial.mode, ConsoleOutputMode::Null);
        assert_eq!(c.console.mode, ConsoleOutputMode::Off);
        assert_eq!(c.balloon, None);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["serial"]["mode"], "Null");
        assert_eq!(json["memory"]["size"], 512 * MIB);
        assert_eq!(serde_json::from_value::<VmConfig>(json).unwrap(), c);

        let c: VmConfig = serde_json::from_str(
            r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 1073741824, "shared": true},
                "payload": {"kernel": "/k", "cmdline": "used=64"},
                "balloon": {"size": 0, "free_page_hinting": true},
                "serial": {"mode": "File", "file": "/tmp/s"}, "console": {"mode": "off"}}"#,
        )
        .unwrap();
        assert!(c.memory.shared && c.memory.thp);
        assert_eq!(c.balloon.as_ref().map(|b| b.free_page_hinting), Some(true));
        assert_eq!(c.serial.file.as_deref(), Some(Path::new("/tmp/s")));
        assert_eq!(
            serde_json::from_value::<VmConfig>(serde_json::to_value(&c).unwrap()).unwrap(),
            c
        );
    }

    #[test]
    fn vm_config_json_rejects() {
        for bad in [
            r#"{"disks": []}"#,
            r#"{"memory": {"size": 1, "hugepages": true}}"#,
            r#"{"memory": {"size": "1G"}}"#,
            r#"{"balloon": {"size": 1, "foo": 1}}"#,
            r#"{"serial": {"mode": "Pty"}}"#,
            r#"{"payload": {"firmware": "/x"}}"#,
            r#"{"cpus": "#,
        ] {
            assert!(serde_json::from_str::<VmConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_resources() {
        let mut c = VmConfig::default();
        c.validate_resources().unwrap();
        c.balloon = Some(BalloonConfig {
            size: c.memory.size,
            ..Default::default()
        });
        assert!(matches!(
            c.validate_resources(),
            Err(ConfigError::BalloonTooLarge { .. })
        ));
        c.balloon = Some(BalloonConfig {
            size: c.memory.size - PAGE_SIZE,
            ..Default::default()
        });
        c.validate_resources().unwrap();
        c.memory.size = MIN_MEMORY_SIZE - PAGE_SIZE;
        assert!(matches!(
            c.validate_resources(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        c.memory.size = MIN_MEMORY_SIZE + 1;
        assert!(matches!(
            c.validate_resources(),
            Err(ConfigError::MemoryUnaligned { .. })
        ));

        let mut c = VmConfig {
            cpus: CpusConfig {
                boot_vcpus: 0,
                max_vcpus: 0,
            },
            ..Default::default()
        };
        assert!(matches!(c.validate_resources(), Err(ConfigError::NoVcpus)));
        c.cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 1,
        };
        assert!(matches!(
            c.validate_resources(),
            Err(ConfigError::MaxVcpus { .. })
        ));

        let mut c = VmConfig {
            serial: ConsoleConfig {
                mode: ConsoleOutputMode::File,
                file: None,
            },
            ..Default::default()
        };
        assert_eq!(
            c.validate_resources().unwrap_err().to_string(),
            "--serial: mode File needs a path"
        );
        c.serial = ConsoleConfig {
            mode: ConsoleOutputMode::Tty,
            file: Some("/x".into()),
        };
        assert!(c.validate_resources().is_err());
        c.serial = ConsoleConfig::default_serial();
        c.console = ConsoleConfig {
            mode: ConsoleOutputMode::File,
            file: Some("/x".into()),
        };
        assert!(c.validate_resources().is_err());
    }

    #[test]
    fn validate_kernel() {
        let mut c = VmConfig::default();
        assert!(matches!(c.validate(), Err(ConfigError::NoKernel)));

        c.payload.kernel = Some("/nonexistent/vmlinux".into());
        let e = c.validate().unwrap_err();
        assert_eq!(e.to_string(), "cannot read kernel /nonexistent/vmlinux");
        assert!(std::error::Error::source(&e).is_some());

        c.payload.kernel = Some(std::env::temp_dir());
        assert!(matches!(c.validate(), Err(ConfigError::KernelRead { .. })));

        let text = TempFile::new("text", b"#!/bin/sh\necho not a kernel\n");
        c.payload.kernel = Some(text.0.clone());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::KernelFormat { .. })
        ));
        let empty = TempFile::new("empty", b"");
        c.payload.kernel = Some(empty.0.clone());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::KernelFormat { .. })
        ));

        let elf = TempFile::new("elf", b"\x7fELF\x02\x01\x01");
        c.payload.kernel = Some(elf.0.clone());
        c.validate().unwrap();
        let bz = TempFile::new("bz", &bzimage());
        c.payload.kernel = Some(bz.0.clone());
        c.validate().unwrap();

        c.payload.initramfs = Some("/nonexistent/initrd".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InitramfsRead { .. })
        ));
        c.payload.initramfs = Some(elf.0.clone());
        c.validate().unwrap();

        c.memory.size = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
    }
}
