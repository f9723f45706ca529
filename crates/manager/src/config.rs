//! ferrod's configuration file (`/etc/ferrovisor/ferrod.toml`, or `--config FILE`): the same
//! settings as its flags, read strictly (an unknown key is refused, naming it; paths must be
//! absolute, since a service's working directory is `/`). Flags given on the command line win over
//! the file; `packaging/ferrod.toml` is the commented default the package installs.

use crate::domain::toml_error;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where ferrod looks for its configuration when `--config` is not given (absent is fine).
pub const DEFAULT_CONFIG: &str = "/etc/ferrovisor/ferrod.toml";

/// The file's settings; every one optional (ferrod's defaults apply).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub home: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub ferro_bin: Option<PathBuf>,
    pub default_network: Option<bool>,
    pub log_level: Option<String>,
    pub overcommit_ratio: Option<f64>,
    /// false: VMMs run without seccomp filters (`--no-seccomp`).
    pub seccomp: Option<bool>,
    /// false: VMMs run unjailed (`--no-jail`).
    pub jail: Option<bool>,
    /// The user jailed VMMs run as (`--jail-user`; default ferro-vmm).
    pub jail_user: Option<String>,
    /// Directories the files domain definitions name must lie under, besides pool targets.
    pub allowed_image_paths: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub listen: ListenConfig,
}

/// `[listen]`: the TCP listeners (docs/remote.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub no_auth: bool,
}

impl FileConfig {
    /// Reads `path` (given with `--config`: it must exist), or the default file if it exists.
    /// Returns the configuration and the file it came from.
    pub fn load(path: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), String> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok((FileConfig::default(), None)),
            Err(e) => return Err(format!("cannot read the configuration {}: {e}", path.display())),
        };
        let config = FileConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((config, Some(path)))
    }

    /// Parses and checks the text of a configuration file.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let config: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, &e).to_string())?;
        let paths = [
            ("home", &config.home),
            ("socket", &config.socket),
            ("ferro_bin", &config.ferro_bin),
            ("listen.tls_cert", &config.listen.tls_cert),
            ("listen.tls_key", &config.listen.tls_key),
            ("listen.token_file", &config.listen.token_file),
        ];
        for (key, path) in paths {
            if let Some(path) = path.as_ref().filter(|p| !p.is_absolute()) {
                return Err(format!("{key}: {} is a relative path; give an absolute one", path.display()));
            }
        }
        if let Some(path) = config.allowed_image_paths.iter().flatten().find(|p| !p.is_absolute()) {
            return Err(format!("allowed_image_paths: {} is a relative path; give an absolute one", path.display()));
        }
        if let Some(level) = &config.log_level {
            check_log_filter(level).map_err(|e| format!("log_level: {e}"))?;
        }
        if let Some(ratio) = config.overcommit_ratio {
            check_overcommit_ratio(ratio).map_err(|e| format!("overcommit_ratio: {e}"))?;
        }
        Ok(config)
    }
}

/// Checks an overcommit ratio: a positive number up to 100, such as 1.5.
pub fn check_overcommit_ratio(ratio: f64) -> Result<f64, String> {
    if ratio.is_finite() && ratio > 0.0 && ratio <= 100.0 { Ok(ratio) } else { Err(format!("{ratio} is not a ratio between 0 and 100, such as 1.5")) }
}

/// Checks a log filter (`info`, `debug`, `warn,ferro_manager=debug`, ...).
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a log filter (error, warn, info, debug, trace, or target=level lists): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_read() {
        let text = "home = \"/srv/ferro\"\nsocket = \"/run/f.sock\"\nsocket_group = \"kvm\"\nferro_bin = \"/opt/ferro\"\n\
                    default_network = false\nlog_level = \"debug\"\novercommit_ratio = 2.5\nseccomp = false\njail = false\njail_user = \"vmm\"\nallowed_image_paths = [\"/srv/images\"]\n[listen]\naddresses = [\"0.0.0.0:8443\"]\n\
                    tls_cert = \"/etc/c.pem\"\ntls_key = \"/etc/k.pem\"\ntoken_file = \"/etc/t\"\n";
        let c = FileConfig::parse(text).unwrap();
        assert_eq!(c.home.as_deref(), Some(Path::new("/srv/ferro")));
        assert_eq!(c.socket_group.as_deref(), Some("kvm"));
        assert_eq!(c.default_network, Some(false));
        assert_eq!(c.overcommit_ratio, Some(2.5));
        assert_eq!(c.seccomp, Some(false));
        assert_eq!((c.jail, c.jail_user.as_deref()), (Some(false), Some("vmm")));
        assert_eq!(c.allowed_image_paths, Some(vec![PathBuf::from("/srv/images")]));
        assert_eq!(c.listen.addresses, ["0.0.0.0:8443"]);
        assert_eq!(c.listen.token_file.as_deref(), Some(Path::new("/etc/t")));
        assert!(!c.listen.insecure);
    }

    /// The file the package installs is valid as shipped, and so is every setting it shows.
    #[test]
    fn the_packaged_default_is_valid_with_and_without_its_examples() {
        let shipped = include_str!("../../../packaging/ferrod.toml");
        FileConfig::parse(shipped).unwrap();
        let example = |l: &&str| l.starts_with("# [") || l.split_once(" = ").is_some_and(|(k, _)| k.starts_with("# ") && !k[2..].contains(' '));
        let uncommented: String = shipped.lines().filter(example).map(|l| format!("{}\n", &l[2..])).collect();
        let c = FileConfig::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(c.home.as_deref(), Some(Path::new(crate::DEFAULT_HOME)));
        assert_eq!(c.socket.as_deref(), Some(Path::new(crate::DEFAULT_SOCKET)));
        assert_eq!(c.socket_group.as_deref(), Some(crate::listen::DEFAULT_SOCKET_GROUP));
        assert_eq!((c.default_network, c.log_level.as_deref()), (Some(true), Some("info")));
        assert_eq!(c.overcommit_ratio, Some(crate::domains::DEFAULT_OVERCOMMIT_RATIO));
        assert_eq!(c.seccomp, Some(true));
        assert_eq!((c.jail, c.jail_user.as_deref()), (Some(true), Some(crate::DEFAULT_JAIL_USER)));
        assert_eq!(c.listen.addresses, ["0.0.0.0:8443"]);
        assert!(c.listen.token_file.is_some() && !c.listen.insecure && !c.listen.no_auth);
    }

    #[test]
    fn unknown_keys_bad_paths_and_levels_are_refused_by_name() {
        let e = FileConfig::parse("home = \"/x\"\nhomee = \"/y\"\n").unwrap_err();
        assert!(e.starts_with("homee: unknown field `homee`"), "{e}");
        let e = FileConfig::parse("[listen]\naddress = [\"[::1]:1\"]\n").unwrap_err();
        assert!(e.starts_with("listen.address: unknown field `address`"), "{e}");
        let e = FileConfig::parse("socket = \"ferrod.sock\"\n").unwrap_err();
        assert_eq!(e, "socket: ferrod.sock is a relative path; give an absolute one");
        let e = FileConfig::parse("log_level = \"info,ferro=loud\"\n").unwrap_err();
        assert!(e.starts_with("log_level: \"info,ferro=loud\" is not a log filter"), "{e}");
        let e = FileConfig::parse("default_network = \"yes\"\n").unwrap_err();
        assert!(e.starts_with("default_network: invalid type"), "{e}");
        let e = FileConfig::parse("overcommit_ratio = 0.0\n").unwrap_err();
        assert_eq!(e, "overcommit_ratio: 0 is not a ratio between 0 and 100, such as 1.5");
        let e = FileConfig::parse("overcommit_ratio = \"2\"\n").unwrap_err();
        assert!(e.starts_with("overcommit_ratio: invalid type"), "{e}");
    }
}
