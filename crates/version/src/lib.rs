//! The version both binaries print with `--version`: the package version and the git revision it
//! was built from (recorded by `build.rs`), e.g. `0.1.0 (git 3e13af9c0d2a)`.

/// `<package version> (git <revision>)`, or `<package version> (not built from a git checkout)`.
pub const VERSION: &str = env!("FERRO_VERSION");
