//! TLS to the collector (`https://` endpoints): which certificates are
//! trusted and which one the agent shows, for both OTLP transports.
//!
//! Trusted: the Mozilla roots built in (a minimal image has no CA store),
//! the system's store when there is one, and `OTEL_EXPORTER_OTLP_CERTIFICATE`
//! (a private CA). A client certificate and key are sent when set (mTLS).
//! The files are read once, at start: a missing or malformed one is an
//! error then, not an export failure later.

use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsFiles;

/// PEM contents of the configured files.
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    /// (certificate chain, key)
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

pub fn read_pem_files(files: &TlsFiles) -> anyhow::Result<TlsPem> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the OTLP {what} {}", p.display()))
    };
    let ca = files.ca.as_deref().map(|p| read(p, "CA certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)")).transpose()?;
    let client = match (&files.client_cert, &files.client_key) {
        (Some(c), Some(k)) => Some((
            read(c, "client certificate (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)")?,
            read(k, "client key (OTEL_EXPORTER_OTLP_CLIENT_KEY)")?,
        )),
        _ => None,
    };
    Ok(TlsPem { ca, client })
}

/// The certificates in a PEM file; an error when there is none.
fn certificates(pem: &[u8], what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what}: not PEM certificates"))?;
    if certs.is_empty() {
        bail!("{what}: no certificate in the file");
    }
    Ok(certs)
}

/// A rustls client configuration for OTLP/HTTP (no ALPN: hyper-rustls sets it).
pub fn http_client_config(pem: &TlsPem) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    log::debug!("OTLP TLS: {added} system root certificates");
    if let Some(ca) = &pem.ca {
        for cert in certificates(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")? {
            roots.add(cert).context("OTEL_EXPORTER_OTLP_CERTIFICATE: unusable CA certificate")?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match &pem.client {
        Some((cert, key)) => {
            let chain = certificates(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .context("OTEL_EXPORTER_OTLP_CLIENT_KEY: no PEM private key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the OTLP client certificate and key do not go together")?
        }
        None => builder.with_no_client_auth(),
    };
    // ALPN is left to hyper-rustls (`enable_http1` offers http/1.1).
    Ok(config)
}

/// `endpoint` with TLS when `cfg` names an `https://` URL (traces and the
/// daemon's own metrics go the same way).
pub fn grpc_endpoint(
    endpoint: tonic::transport::Endpoint,
    cfg: &super::config::OtlpConfig,
) -> anyhow::Result<tonic::transport::Endpoint> {
    if !cfg.url.starts_with("https://") {
        return Ok(endpoint);
    }
    let pem = read_pem_files(&cfg.tls)?;
    endpoint.tls_config(grpc_tls_config(&pem)?).context("OTLP/gRPC TLS settings")
}

/// tonic's TLS settings for OTLP/gRPC (ALPN `h2`, set by tonic).
pub fn grpc_tls_config(pem: &TlsPem) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let mut config = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
    if let Some(ca) = &pem.ca {
        certificates(ca, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
        config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &pem.client {
        certificates(cert, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
        PrivateKeyDer::from_pem_slice(key).context("OTEL_EXPORTER_OTLP_CLIENT_KEY: no PEM private key")?;
        config = config.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_errors_at_start_not_panics() {
        let none = TlsPem { ca: None, client: None };
        assert!(http_client_config(&none).is_ok());
        assert!(grpc_tls_config(&none).is_ok());
        let garbage = TlsPem { ca: Some(b"not a certificate".to_vec()), client: None };
        let e = http_client_config(&garbage).unwrap_err();
        assert!(format!("{e:#}").contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{e:#}");
        assert!(grpc_tls_config(&garbage).is_err());
        let no_key = TlsPem { ca: None, client: Some((Vec::new(), b"-----BEGIN NOTHING-----".to_vec())) };
        assert!(http_client_config(&no_key).is_err());
        assert!(grpc_tls_config(&no_key).is_err());
        let missing = TlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let e = read_pem_files(&missing).err().expect("missing file");
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }
}
