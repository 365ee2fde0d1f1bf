//! The site's connection to the coordinator: one channel, requests signed with the site's name
//! and token in metadata.

use std::time::Duration;

use medfl_proto::convert::{SITE_METADATA, TOKEN_METADATA};
use medfl_proto::v1::site_service_client::SiteServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::{SiteConfig, SiteError};

/// Largest message accepted from the coordinator (chunks are at most 16 MiB).
const MAX_MESSAGE: usize = 32 << 20;

/// A connected, identified client.
#[derive(Clone)]
pub struct Client {
    /// The generated client.
    pub site: SiteServiceClient<Channel>,
    name: MetadataValue<tonic::metadata::Ascii>,
    token: MetadataValue<tonic::metadata::Ascii>,
}

impl Client {
    /// Connects to the coordinator of `cfg`: mutual TLS with the site's kit for an `https` URL.
    pub async fn connect(cfg: &SiteConfig, token: &str) -> Result<Self, SiteError> {
        let (url, name) = (cfg.coordinator.as_str(), cfg.name.as_str());
        let connect_err = |message: String| SiteError::Connect {
            url: url.to_string(),
            message,
        };
        let mut endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|e| connect_err(e.to_string()))?;
        if let (Some(ca), Some(cert), Some(key)) = (&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key) {
            let host = endpoint.uri().host().unwrap_or_default().to_string();
            let tls = medfl_pki::client_tls(ca, cert, key, &host)
                .map_err(|e| SiteError::Config(format!("TLS: {e}")))?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| SiteError::Config(format!("TLS: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_err(format!("{e}: {}", source_chain(&e))))?;
        let site = SiteServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let value = |v: &str| {
            v.parse()
                .map_err(|_| SiteError::Config(format!("`{v}` cannot travel in gRPC metadata")))
        };
        Ok(Self {
            site,
            name: value(name)?,
            token: value(token)?,
        })
    }

    /// Wraps `msg` in a request carrying the site's identity.
    pub fn authed<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(SITE_METADATA, self.name.clone());
        req.metadata_mut()
            .insert(TOKEN_METADATA, self.token.clone());
        req
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}
