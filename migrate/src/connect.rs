//! Connecting to PostgreSQL with libpq's `sslmode` and `sslrootcert`, as users write them in
//! URLs (`postgresql://u@db.example.com/app?sslmode=verify-full`) and key/value strings:
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | checked against `sslrootcert` when one is given, else not checked (as libpq) |
//! | `require` | always | as `prefer` |
//! | `verify-ca` | always | chain checked against `sslrootcert` (else the Mozilla roots) |
//! | `verify-full` | always | chain and host name checked |
//!
//! The `postgres` crate knows only `disable | prefer | require` and no `sslrootcert`: both are
//! read here and the string it parses gets the mode it knows.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Not checked (`prefer`/`require` without `sslrootcert`, as libpq).
    Nothing,
    /// Its chain up to a trusted root, not its name.
    Chain,
    /// Chain and host name.
    Full,
}

/// A database to connect to: the parsed settings and how TLS is done.
#[derive(Clone)]
pub struct Target {
    pub config: postgres::Config,
    verify: Verify,
    roots: Option<String>,
}

/// The value of `key` in a URL query or a key/value string, and the string without it.
fn take_param(s: &str, key: &str) -> (Option<String>, String) {
    let url = s.starts_with("postgres://") || s.starts_with("postgresql://");
    let sep = if url { '&' } else { ' ' };
    let (head, query) = if url {
        match s.split_once('?') {
            Some((h, q)) => (format!("{h}?"), q.to_string()),
            None => return (None, s.to_string()),
        }
    } else {
        (String::new(), s.to_string())
    };
    let mut found = None;
    let kept: Vec<&str> = query
        .split(sep)
        .filter(|p| match p.split_once('=') {
            Some((k, v)) if k.trim() == key => {
                found = Some(v.trim().to_string());
                false
            }
            _ => true,
        })
        .collect();
    let rest = kept.join(&sep.to_string());
    let out = if url && rest.is_empty() {
        head.trim_end_matches('?').to_string()
    } else {
        format!("{head}{rest}")
    };
    (found, out)
}

impl Target {
    /// Parses a URL or key/value string; `what` names it in errors (`--url`, `--staging-url`).
    pub fn parse(s: &str, what: &str) -> Result<Target, String> {
        let (mode, rest) = take_param(s, "sslmode");
        let (roots, rest) = take_param(&rest, "sslrootcert");
        let (verify, known) = match mode.as_deref() {
            None => (Verify::Nothing, None),
            Some(m @ ("disable" | "allow" | "prefer" | "require")) => (
                Verify::Nothing,
                Some(if m == "allow" { "prefer" } else { m }),
            ),
            Some("verify-ca") => (Verify::Chain, Some("require")),
            Some("verify-full") => (Verify::Full, Some("require")),
            Some(m) => {
                return Err(format!(
                    "{what}: sslmode {m:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        };
        let mut config: postgres::Config = rest.parse().map_err(|e| format!("{what}: {e}"))?;
        if let Some(k) = known {
            config.ssl_mode(match k {
                "disable" => postgres::config::SslMode::Disable,
                "require" => postgres::config::SslMode::Require,
                _ => postgres::config::SslMode::Prefer,
            });
        }
        // A root certificate makes require/prefer check the chain, as in libpq.
        let verify = if verify == Verify::Nothing && roots.is_some() {
            Verify::Chain
        } else {
            verify
        };
        let roots = match roots {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{what}: sslrootcert {path}: {e}"))?,
            ),
            None => None,
        };
        Ok(Target {
            config,
            verify,
            roots,
        })
    }

    /// The same server, another database.
    pub fn with_dbname(&self, db: &str) -> Target {
        let mut t = self.clone();
        t.config.dbname(db);
        t
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        let mut store = RootCertStore::empty();
        // The given roots, read once: trusted as roots, and pinned (see `Checker`).
        let mut pinned: Vec<Vec<u8>> = Vec::new();
        match &self.roots {
            Some(pem) => {
                for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    let cert = cert.map_err(|e| format!("sslrootcert: {e}"))?;
                    pinned.push(cert.as_ref().to_vec());
                    store.add(cert).map_err(|e| format!("sslrootcert: {e}"))?;
                }
                if store.is_empty() {
                    return Err("sslrootcert: no PEM certificate in the file".into());
                }
            }
            None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))?;
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Checker {
                webpki,
                verify: self.verify,
                pinned,
                provider,
            }))
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    pub fn connect(&self) -> Result<postgres::Client, String> {
        let tls = self.tls()?;
        self.config.connect(tls).map_err(|e| chain(&e))
    }
}

/// An error with its causes (`error connecting to server: Connection refused (os error 111)`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// The certificate check of each [`Verify`] mode. As in libpq, `sslrootcert` may hold the
/// server's own self-signed certificate: a certificate equal to one given there is trusted
/// (webpki alone refuses a CA certificate used as the server's). Handshake signatures are
/// always checked.
#[derive(Debug)]
struct Checker {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    verify: Verify,
    pinned: Vec<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

fn name_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
        )
    )
}

impl ServerCertVerifier for Checker {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        let e =
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
        if name_error(&e) {
            return match self.verify {
                Verify::Full => Err(e),
                _ => Ok(ServerCertVerified::assertion()),
            };
        }
        if !self
            .pinned
            .iter()
            .any(|p| p.as_slice() == end_entity.as_ref())
        {
            return Err(e);
        }
        if self.verify == Verify::Full {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_settings_are_read_from_urls_and_key_values() {
        let t = Target::parse(
            "postgresql://u@db.example.com:5433/app?sslmode=verify-full&application_name=x",
            "--url",
        )
        .unwrap();
        assert_eq!(t.verify, Verify::Full);
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Require);
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = Target::parse("host=h dbname=d sslmode=verify-ca", "--url").unwrap();
        assert_eq!(t.verify, Verify::Chain);
        let t = Target::parse("postgresql://u@h/d", "--url").unwrap();
        assert_eq!(t.verify, Verify::Nothing);
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Prefer);
        let t = Target::parse("postgresql://u@h/d?sslmode=disable", "--url").unwrap();
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Disable);
        assert_eq!(t.config.get_dbname(), Some("d"));
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Target::parse("postgresql://u@h/d?sslmode=verify", "--url")
            .err()
            .unwrap();
        assert!(e.contains("--url: sslmode \"verify\" is not one of"), "{e}");
        let e = Target::parse(
            "postgresql://u@h/d?sslmode=require&sslrootcert=/nonexistent/ca.pem",
            "--staging-url",
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with("--staging-url: sslrootcert /nonexistent/ca.pem:"),
            "{e}"
        );
        let e = Target::parse("postgresql://u@h:notaport/d", "--url")
            .err()
            .unwrap();
        assert!(e.starts_with("--url: "), "{e}");
    }

    #[test]
    fn a_parameter_is_taken_out_of_either_form() {
        assert_eq!(
            take_param("postgresql://h/d?sslmode=require", "sslmode"),
            (Some("require".into()), "postgresql://h/d".into())
        );
        assert_eq!(
            take_param("postgresql://h/d?a=1&sslmode=require&b=2", "sslmode"),
            (Some("require".into()), "postgresql://h/d?a=1&b=2".into())
        );
        assert_eq!(
            take_param("host=h sslmode=require dbname=d", "sslmode"),
            (Some("require".into()), "host=h dbname=d".into())
        );
        assert_eq!(
            take_param("host=h dbname=d", "sslmode"),
            (None, "host=h dbname=d".into())
        );
    }
}
