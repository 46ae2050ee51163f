//! A self-signed test certificate, made by the real `openssl` command:
//! `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1`.
//! Every server in the TLS tests uses one; clients skip verification
//! (`curl -k`, an unverified Python context, `rejectUnauthorized: false`,
//! `gnutls-cli --insecure`) or trust it as a root (gRPC).

use crate::proc::{TempDir, run_capture};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const OPENSSL: &str = "/usr/bin/openssl";

pub fn openssl() -> Result<&'static str> {
    if !Path::new(OPENSSL).is_file() {
        bail!("{OPENSSL} is missing: install openssl (`cargo xtask setup --test-deps`)");
    }
    Ok(OPENSSL)
}

/// A key and a certificate for `CN=localhost` in a temp dir of their own
/// (removed on drop).
pub struct TestCert {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCert {
    pub fn generate() -> Result<TestCert> {
        let dir = TempDir::new("cert")?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let mut cmd = Command::new(openssl()?);
        cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args(["-subj", "/CN=localhost", "-days", "1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        run_capture("openssl-req", &mut cmd, Duration::from_secs(60))?
            .ok()
            .context("making the test certificate")?;
        for p in [&cert, &key] {
            let len = std::fs::metadata(p)
                .with_context(|| format!("{} was not written", p.display()))?
                .len();
            if len == 0 {
                bail!("{} is empty", p.display());
            }
        }
        Ok(TestCert { dir, cert, key })
    }

    /// PEM certificate.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// PEM private key (unencrypted).
    pub fn key(&self) -> &Path {
        &self.key
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
