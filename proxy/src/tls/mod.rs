//! TLS for the mail listeners and for connections to mailbox servers, with rustls (ring).
//!
//! - [`CertificateStore`]: the listeners' certificates, chosen by SNI and reloaded from their
//!   files while sessions run (Kubernetes rotates Secrets in place). A reload that fails keeps
//!   the certificates in use.
//! - [`server_config`]: TLS 1.2 and 1.3 only, with ring's default suites (ECDHE with AES-GCM
//!   or ChaCha20-Poly1305), and the ALPN protocols of one service.
//! - [`MailTls`]: the mail listeners' acceptors (implicit TLS and STARTTLS/STLS), each
//!   naming only its own protocol in ALPN, so that a browser's handshake on a mail port fails
//!   (ALPACA cross-protocol attacks).
//! - [`UpstreamConnector`]: TLS to IMAPS and POP3S backends, trusting the system's CAs plus
//!   `upstreamTls.caFile`; [`client_config`] is its trust, shared with the web backends'
//!   connector (`http.upstreamCaFile`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mailproxy_crds::proxy_config::CertificateFiles;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use crate::mounted_file::{FileStamp, polls};

/// Why certificates or trust anchors could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate file: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} holds no usable private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("no certificates configured")]
    Empty,
    #[error("TLS settings rejected: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// One certificate chain and its key, ready for handshakes.
fn load_pair(files: &CertificateFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certificates(&files.cert, &read(&files.cert)?)?;
    let bad_key = |reason: String| TlsError::BadKey {
        path: files.key.clone(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|error| bad_key(error.to_string()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| bad_key(error.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // A key type that cannot report its public half is checked by the first handshake.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(error) => {
            return Err(bad_key(format!(
                "it does not match {}: {error}",
                files.cert.display()
            )));
        }
    }
    Ok(Arc::new(certified))
}

/// The listeners' certificates: the first is the default, the others are picked when the
/// client's SNI names one of their subjects.
pub struct CertificateStore {
    files: Vec<CertificateFiles>,
    keys: ArcSwap<Vec<Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl CertificateStore {
    /// Loads every pair; any failure is an error, since a proxy must not start without the
    /// certificates it was told to serve.
    pub fn load(files: &[CertificateFiles]) -> Result<Arc<Self>, TlsError> {
        if files.is_empty() {
            return Err(TlsError::Empty);
        }
        let keys = files.iter().map(load_pair).collect::<Result<_, _>>()?;
        Ok(Arc::new(Self {
            files: files.to_vec(),
            keys: ArcSwap::from_pointee(keys),
        }))
    }

    /// Reads the files again; on any failure the certificates in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let keys = self.files.iter().map(load_pair).collect::<Result<_, _>>()?;
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    fn stamps(&self) -> Vec<Option<FileStamp>> {
        self.files
            .iter()
            .flat_map(|files| [FileStamp::of(&files.cert), FileStamp::of(&files.key)])
            .collect()
    }

    /// Polls the files every `interval` and reloads when one changed, until the store is the
    /// only owner left (the server has stopped). Polling rather than inotify: a Secret volume
    /// update replaces a symlink in the parent of the parent of the file, which a watch on the
    /// file's directory misses on some kernels, and a poll of four stats is cheap.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let mut seen = self.stamps();
        tokio::spawn(async move {
            let mut ticks = polls(interval);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else { return };
                let now = store.stamps();
                if now == seen {
                    continue;
                }
                match store.reload() {
                    Ok(()) => {
                        tracing::info!("TLS certificates reloaded");
                        seen = now;
                    }
                    // Kept unseen so that the next poll retries: a rotation can write the
                    // certificate and the key a moment apart.
                    Err(error) => {
                        tracing::error!(%error, "TLS certificate reload failed; serving the previous certificates");
                    }
                }
            }
        })
    }

    fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.load();
        let default = keys.first().cloned();
        let Some(name) = server_name.and_then(|name| ServerName::try_from(name).ok()) else {
            return default;
        };
        keys.iter()
            .find(|key| {
                key.end_entity_cert()
                    .ok()
                    .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                    .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
            .cloned()
            .or(default)
    }
}

/// rustls asks the store for every handshake, so a reload takes effect on the next one.
#[derive(Debug)]
struct SniResolver(Arc<CertificateStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.choose(client_hello.server_name())
    }
}

/// ALPN protocol IDs (RFC 7301 registry) of the services behind the listeners.
pub const ALPN_IMAP: &[u8] = b"imap";
pub const ALPN_POP3: &[u8] = b"pop3";
pub const ALPN_WEB: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A listener's TLS settings over a certificate store, offering `alpn`. A client whose ALPN
/// list names none of them is refused in the handshake; one that sends no ALPN is served.
///
/// Each call builds its own configuration, resumption state included: a session ticket
/// issued for one service is then never accepted by another.
pub fn server_config(
    store: Arc<CertificateStore>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(store)));
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The mail listeners' TLS: IMAPS and IMAP STARTTLS offer only `imap`, POP3S and STLS only
/// `pop3`. Without this a browser that an attacker points at port 993 (ALPN `h2`/`http/1.1`)
/// would complete a handshake and have its request read as IMAP commands.
pub struct MailTls {
    pub imap: tokio_rustls::TlsAcceptor,
    pub pop3: tokio_rustls::TlsAcceptor,
}

impl MailTls {
    /// Both acceptors over the same certificates, so that a reload of `store` reaches them.
    pub fn new(store: &Arc<CertificateStore>) -> Result<Self, TlsError> {
        let acceptor =
            |alpn| server_config(store.clone(), &[alpn]).map(tokio_rustls::TlsAcceptor::from);
        Ok(Self {
            imap: acceptor(ALPN_IMAP)?,
            pop3: acceptor(ALPN_POP3)?,
        })
    }
}

/// A TLS client configuration for mailbox servers (mail and web) that trusts the system's CAs
/// and, when given, those of `ca_file`. A system store that cannot be read is not fatal when a CA
/// file is given: backends commonly use a private CA.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "a system CA certificate could not be read");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        for certificate in certificates(path, &read(path)?)? {
            roots
                .add(certificate)
                .map_err(|error| TlsError::BadCertificate {
                    path: path.to_path_buf(),
                    reason: error.to_string(),
                })?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// TLS client for IMAPS and POP3S backends.
#[derive(Clone)]
pub struct UpstreamConnector {
    connector: tokio_rustls::TlsConnector,
}

impl fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConnector").finish_non_exhaustive()
    }
}

impl UpstreamConnector {
    /// Trusts what [`client_config`] trusts.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_file)?)),
        })
    }

    /// Handshakes with `host` (a DNS name or an IP literal, checked against the certificate).
    pub async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host:?} is not a valid TLS server name"),
            )
        })?;
        self.connector.connect(name, stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn subject(key: &CertifiedKey) -> Vec<u8> {
        key.end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn sni_picks_the_matching_certificate_else_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = pair(dir.path(), "a", &["mail.example.com"]);
        let second = pair(dir.path(), "b", &["imap.example.org", "*.example.net"]);
        let store = CertificateStore::load(&[first, second]).unwrap();
        let keys = store.keys.load_full();
        let pick = |name: Option<&str>| subject(&store.choose(name).unwrap());
        assert_eq!(pick(None), subject(&keys[0]));
        assert_eq!(pick(Some("imap.example.org")), subject(&keys[1]));
        assert_eq!(pick(Some("x.example.net")), subject(&keys[1]));
        assert_eq!(pick(Some("mail.example.com")), subject(&keys[0]));
        assert_eq!(pick(Some("unknown.example")), subject(&keys[0]));
    }

    #[test]
    fn a_bad_reload_keeps_the_certificates_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let files = pair(dir.path(), "a", &["mail.example.com"]);
        let store = CertificateStore::load(std::slice::from_ref(&files)).unwrap();
        let before = subject(&store.choose(None).unwrap());
        std::fs::write(&files.cert, "not a certificate").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(subject(&store.choose(None).unwrap()), before);
        let replacement = pair(dir.path(), "a", &["mail.example.com"]);
        store.reload().unwrap();
        assert_ne!(subject(&store.choose(None).unwrap()), before);
        assert_eq!(replacement, files);
    }

    /// A handshake over an in-memory pipe, trusting `pki`'s CA and offering `alpn`: the
    /// protocol the server chose, or why it failed.
    async fn handshake(
        acceptor: &tokio_rustls::TlsAcceptor,
        pki: &mailproxy_testkit::Pki,
        alpn: &[&[u8]],
    ) -> Result<Option<Vec<u8>>, String> {
        let mut config = client_config(Some(&pki.ca())).unwrap();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) =
            tokio::join!(connector.connect(name, client), acceptor.accept(server));
        match (client, server) {
            (Ok(client), Ok(_)) => Ok(client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)),
            (client, server) => Err(format!(
                "client: {:?}, server: {:?}",
                client.err(),
                server.err()
            )),
        }
    }

    #[tokio::test]
    async fn mail_listeners_refuse_other_protocols_by_alpn() {
        let pki = mailproxy_testkit::Pki::new();
        let store = CertificateStore::load(&[CertificateFiles {
            cert: pki.cert(),
            key: pki.key(),
        }])
        .unwrap();
        let tls = MailTls::new(&store).unwrap();
        for (acceptor, own, other) in [
            (&tls.imap, ALPN_IMAP, ALPN_POP3),
            (&tls.pop3, ALPN_POP3, ALPN_IMAP),
        ] {
            assert_eq!(handshake(acceptor, &pki, &[]).await, Ok(None));
            assert_eq!(
                handshake(acceptor, &pki, &[b"h2", own]).await,
                Ok(Some(own.to_vec()))
            );
            for refused in [&ALPN_WEB[..], &[other]] {
                let error = handshake(acceptor, &pki, refused).await.unwrap_err();
                assert!(error.contains("NoApplicationProtocol"), "{error}");
            }
        }
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["a.example"]);
        let b = pair(dir.path(), "b", &["b.example"]);
        let mixed = CertificateFiles {
            cert: a.cert,
            key: b.key,
        };
        let error = CertificateStore::load(&[mixed]).unwrap_err().to_string();
        assert!(error.contains("does not match"), "{error}");
    }
}
