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

/// A private CA and two certificates it signed, as a collector and its
/// clients use them: a server certificate for `localhost` and `127.0.0.1`
/// (subjectAltName, as verifying clients such as rustls require) and a
/// client certificate (mTLS). Made by the real `openssl` command.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    pub fn generate() -> Result<TestCa> {
        let dir = TempDir::new("ca")?;
        let d = dir.path();
        let run = |what: &str, args: &[&str]| -> Result<()> {
            let mut cmd = Command::new(openssl()?);
            cmd.current_dir(d).args(args);
            run_capture(what, &mut cmd, Duration::from_secs(60))?
                .ok()
                .with_context(|| format!("openssl: {what}"))?;
            Ok(())
        };
        run(
            "ca",
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=periscope test CA",
                "-days", "1", "-keyout", "ca.key", "-out", "ca.pem", "-addext",
                "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            ),
            (
                "client",
                "periscope agent",
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), ext)?;
            run(
                name,
                &[
                    "req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={cn}"), "-keyout",
                    &format!("{name}.key"), "-out", &format!("{name}.csr"),
                ],
            )?;
            run(
                name,
                &[
                    "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "1", "-extfile", &format!("{name}.ext"), "-out",
                    &format!("{name}.pem"),
                ],
            )?;
        }
        Ok(TestCa { dir })
    }

    /// The CA's certificate (PEM): what clients of the server trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}
