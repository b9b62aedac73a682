//! The webhook sink: `https://…` (or `http://…`). Batches of alerts are POSTed as a JSON
//! array (`Content-Type: application/json`), and a 2xx answer is the acknowledgement that
//! lets them leave the sink's spool (`spool.rs`); anything else is retried with backoff.
//!
//! TLS is rustls with ring, the one crypto provider in srcip. Server certificates are
//! verified against the system's trust store, or, with `--sink-ca FILE`, against the
//! certificates of that file only (an internal CA).

use std::{io, path::Path, sync::mpsc, time::Duration};

use anyhow::Context as _;

use super::SharedAlert;
use super::{
    SinkCounters, client_runtime,
    spool::{Spool, forward},
};
use crate::alerts::{Alert, host_name, json_object};

/// How long one POST, connecting included, may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a webhook sink posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: String,
}

impl WebhookTarget {
    /// `https://…` or `http://…`; `None` for other schemes.
    pub fn parse(url: &str) -> Option<Result<Self, String>> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return None;
        }
        Some(match reqwest::Url::parse(url) {
            Ok(parsed) if parsed.host_str().is_some() => Ok(Self {
                url: url.to_owned(),
            }),
            Ok(_) => Err(format!("{url}: a webhook URL needs a host")),
            Err(error) => Err(format!("{url} is not a URL: {error}")),
        })
    }
}

/// The HTTP client every webhook sink uses: `ca`, a PEM file, replaces the system's trust
/// store when given. Built at start, so that a bad file stops `srcip run` with a message.
pub fn client(ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    // reqwest leaves the provider to the program; an error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .user_agent(concat!("srcip/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("cannot read --sink-ca {}", ca.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--sink-ca {} holds no PEM certificate", ca.display()))?;
        builder = builder.tls_certs_only(certificates);
    }
    builder
        .build()
        .context("cannot set up HTTPS for the webhook sinks")
}

/// POSTs what arrives in `alerts` until the queue is closed, through `spool`.
pub(super) fn write_webhook(
    target: &WebhookTarget,
    client: &reqwest::Client,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
    spool: Spool,
) {
    let Some(runtime) = client_runtime(&target.url) else {
        return;
    };
    let host = host_name();
    let render = |alert: &Alert| json_object(alert, &host);
    let send = |messages: &[Vec<u8>]| -> io::Result<()> {
        let mut body = Vec::with_capacity(messages.iter().map(Vec::len).sum::<usize>() + 2);
        body.push(b'[');
        for (index, message) in messages.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(message);
        }
        body.push(b']');
        runtime.block_on(async {
            let response = client
                .post(&target.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(io::Error::other)?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(io::Error::other(format!("the receiver answered {status}")))
            }
        })
    };
    forward(&target.url, alerts, counters, spool, render, send);
}
