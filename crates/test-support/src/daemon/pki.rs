//! Certificates and tokens for ferrod's TLS listeners, made with the openssl commands of
//! docs/remote.md: a CA, a certificate for 127.0.0.1, localhost and `net::OUTSIDE` (a ferrod in
//! the outside namespace of `net::host_and_outside`) signed by it, a second CA that signed nothing
//! of ours, and token files (admin and readonly, a reader's, a wrong one).

use super::{Api, Daemon, Home};
use crate::{TempDir, run_ok};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The admin token of the `tokens` file (listed first, so the CLI sends it).
pub const ADMIN: &str = "4d9a1c0e7b3f5a2d8c6e0b4f1a3d5c7e";
/// The readonly token of the `tokens` file, alone in `reader-token`.
pub const READER: &str = "readonly-7e5c3a1f9d0b2e4c6a8f0d2b";

/// The files, in a scratch directory: ca.pem, other-ca.pem, ferrod.pem, ferrod.key, tokens,
/// reader-token, wrong-token.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        for ca in ["ca", "other-ca"] {
            run_ok("openssl", &[
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
                "-subj", "/CN=Ferrovisor CA", "-keyout", &p(&format!("{ca}.key")), "-out", &p(&format!("{ca}.pem")),
            ]);
        }
        run_ok("openssl", &[
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", "/CN=ferro1.example", "-keyout", &p("ferrod.key"), "-out", &p("ferrod.csr"),
        ]);
        std::fs::write(
            dir.join("ferrod.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:203.0.113.2\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run_ok("openssl", &[
            "x509", "-req", "-in", &p("ferrod.csr"), "-CA", &p("ca.pem"), "-CAkey", &p("ca.key"), "-CAcreateserial",
            "-days", "825", "-extfile", &p("ferrod.ext"), "-out", &p("ferrod.pem"),
        ]);
        write_private(&dir.join("tokens"), &format!("# admin first: the CLI sends it\n{ADMIN} admin\n\n{READER} readonly\n"));
        write_private(&dir.join("reader-token"), &format!("{READER}\n"));
        write_private(&dir.join("wrong-token"), "not-a-token-of-this-daemon\n");
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// ferrod with TLS listeners on free ports of 127.0.0.1 (in the certificate) and 127.0.0.2
    /// (not in it); returns it and the first listener's address.
    pub fn daemon(&self, home: &Home) -> (Daemon, SocketAddr) {
        let (cert, key, tokens) = (self.arg("ferrod.pem"), self.arg("ferrod.key"), self.arg("tokens"));
        let args = [
            "--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0", "--tls-cert", &cert, "--tls-key", &key, "--token-file", &tokens,
        ];
        let d = Daemon::start_args(home, &args, &[("RUST_LOG", "info")]);
        let addr = d.listening()[0];
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        (d, addr)
    }

    pub fn api(&self, addr: SocketAddr) -> Api {
        Api::tls(addr, &self.path("ca.pem"))
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

/// Writes a file only its owner may read (as ferrod wants its key and token files).
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
