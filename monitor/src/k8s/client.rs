//! The one API request `--k8s-pod-names` makes: list this node's pods, over HTTPS verified
//! against the service account's CA, with its bearer token (re-read for every request: the
//! kubelet rotates projected tokens). One connection per request: at one request per 30 s a
//! pooled connection would save nothing and could go stale.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    header::{ACCEPT, AUTHORIZATION, HOST},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};

use crate::k8s::settings::K8sSettings;

/// A whole request (connect, TLS, response) gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response read. Pods come as metadata only (about 1-2 KiB each), so even a node at
/// the 110-pod default limit many times over stays far below it; a runaway answer must not
/// grow the daemon.
const MAX_BODY: usize = 16 << 20;
/// Ask for metadata only (PartialObjectMetadataList, Kubernetes 1.15+): a fraction of the full
/// pod specs. A server that does not know it answers with the plain PodList.
const ACCEPT_METADATA: &str =
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";

pub struct K8sClient {
    settings: K8sSettings,
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

impl K8sClient {
    /// Loads the CA and checks the token can be read, so a wrong path fails at start.
    pub fn new(settings: K8sSettings) -> Result<Self, String> {
        let ca = settings.ca_file.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.ca_file)
            .and_then(|certs| certs.collect())
            .map_err(|e| {
                format!(
                    "--k8s-ca-file {ca}: cannot read a PEM certificate from it ({e}); mount the \
                     service account's token (automountServiceAccountToken) or point \
                     --k8s-ca-file at the cluster's CA"
                )
            })?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "--k8s-ca-file {ca}: no usable CA certificate in it; point --k8s-ca-file at the \
                 cluster's CA (PEM)"
            ));
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(settings.host.clone()).map_err(|e| {
            format!(
                "API server host {:?} is neither a DNS name nor an IP address: {e}",
                settings.host
            )
        })?;
        read_token(&settings)?;
        Ok(Self {
            settings,
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    pub fn settings(&self) -> &K8sSettings {
        &self.settings
    }

    /// The body of this node's pod list.
    pub async fn list_pods(&self) -> Result<Bytes, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request())
            .await
            .map_err(|_| {
                format!(
                    "https://{} did not answer within {} s",
                    self.settings.authority,
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
    }

    async fn request(&self) -> Result<Bytes, String> {
        let s = &self.settings;
        let token = read_token(s)?;
        let at = |e: &dyn std::fmt::Display| format!("https://{}: {e}", s.authority);
        let tcp = TcpStream::connect(&s.authority).await.map_err(|e| at(&e))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| at(&format!("TLS: {e} (is --k8s-ca-file the cluster's CA?)")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| at(&e))?;
        // Drives the connection; it ends when `sender` is dropped at the end of this request.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::get(s.pods_path.as_str())
            .header(HOST, s.authority.as_str())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(ACCEPT, ACCEPT_METADATA)
            .body(Empty::<Bytes>::new())
            .map_err(|e| at(&e))?;
        let response = sender.send_request(request).await.map_err(|e| at(&e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| at(&format!("reading the pod list: {e}")))?
            .to_bytes();
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::UNAUTHORIZED => Err(at(&format!(
                "401 Unauthorized: the token in {} was refused",
                s.token_file.display()
            ))),
            StatusCode::FORBIDDEN => Err(at(&format!(
                "403 Forbidden: the service account may not list pods; apply \
                 deploy/kubernetes/pod-names (a ClusterRole with get/list/watch on pods) ({})",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ))),
            other => Err(at(&format!(
                "{other} for {}: {}",
                s.pods_path,
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ))),
        }
    }
}

fn read_token(s: &K8sSettings) -> Result<String, String> {
    let token = std::fs::read_to_string(&s.token_file).map_err(|e| {
        format!(
            "--k8s-token-file {}: {e}; mount the service account token \
             (automountServiceAccountToken: true) or point --k8s-token-file at one",
            s.token_file.display()
        )
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!(
            "--k8s-token-file {}: empty",
            s.token_file.display()
        ));
    }
    Ok(token.to_owned())
}
