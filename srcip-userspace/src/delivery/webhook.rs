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
    spool::{SendError, Spool, forward},
};
use crate::alerts::{Alert, host_name, json_object};

/// How long one POST, connecting included, may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a webhook sink posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// The whole URL, which often holds a token: used to post, and shown nowhere.
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

    /// The sink's name wherever it shows (metrics labels, logs, `lost` lines, the spool's
    /// file name): scheme, host and port. A URL with more (a path, a query, credentials:
    /// where webhook services put their tokens) gets a digest of the whole URL besides,
    /// which tells two such sinks on one host apart and reveals nothing of the token.
    pub fn name(&self) -> String {
        let Ok(url) = reqwest::Url::parse(&self.url) else {
            // `parse` took it: never happens.
            return "webhook".to_owned();
        };
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or_default();
        let mut name = format!("{}://{host}:{port}", url.scheme());
        let more = url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some();
        if more {
            let digest = ring::digest::digest(&ring::digest::SHA256, self.url.as_bytes());
            let short: String = digest.as_ref()[..4]
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            name.push_str(&format!("#{short}"));
        }
        name
    }
}

/// A 4xx answer says the request itself is wrong (malformed, too large, not allowed), so
/// sending it again gets the same answer; but 408 (timed out), 425 (too early) and 429
/// (too many requests) ask for another try later.
fn refuses_for_good(status: reqwest::StatusCode) -> bool {
    status.is_client_error() && ![408, 425, 429].contains(&status.as_u16())
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
    let name = target.name();
    let Some(runtime) = client_runtime(&name) else {
        return;
    };
    let host = host_name();
    let render = |alert: &Alert| json_object(alert, &host);
    let send = |messages: &[Vec<u8>]| -> Result<(), SendError> {
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
                // reqwest's errors name the URL, token and all.
                .map_err(|error| io::Error::other(error.without_url()))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let answer = format!("the receiver answered {status}");
            if refuses_for_good(status) {
                let body = response.text().await.unwrap_or_default();
                let excerpt: String = body.trim().chars().take(200).collect();
                return Err(SendError::Refused(if excerpt.is_empty() {
                    answer
                } else {
                    format!("{answer}: {excerpt}")
                }));
            }
            Err(SendError::Retry(io::Error::other(answer)))
        })
    };
    forward(&name, alerts, counters, spool, render, send);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_is_named_by_scheme_host_and_port_and_a_digest_of_the_rest() {
        let name = |url: &str| WebhookTarget::parse(url).unwrap().unwrap().name();
        assert_eq!(
            name("https://hooks.example.net/"),
            "https://hooks.example.net:443"
        );
        assert_eq!(name("http://10.0.0.1:8080"), "http://10.0.0.1:8080");
        let with_token = name("https://user:pw@hooks.example.net/services/T0KEN?key=K3Y");
        assert!(
            with_token.starts_with("https://hooks.example.net:443#"),
            "{with_token}"
        );
        assert!(
            !with_token.contains("T0KEN")
                && !with_token.contains("K3Y")
                && !with_token.contains("pw")
        );
        assert_ne!(
            name("https://hooks.example.net/a"),
            name("https://hooks.example.net/b"),
            "two sinks on one host keep apart"
        );
    }
}
