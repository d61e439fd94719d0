//! The client side of `GET /admin/checklist`: `klaviyo-proxy checklist` and
//! `preflight --from-traffic` read a running proxy's report through here.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Light, Report};

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nothing answered at the admin URL (exit code 2).
    #[error("{url}: unreachable: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        reason: String,
    },
    /// Something answered, but not with a checklist.
    #[error("{url}: {reason}")]
    Invalid {
        /// The URL asked.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// Reads `ADMIN/admin/checklist` (plain HTTP: the admin listener is loopback).
pub async fn fetch(admin: &str, timeout: Duration) -> Result<Report, FetchError> {
    let url = format!("{}/admin/checklist", admin.trim_end_matches('/'));
    let unreachable = |reason: String| FetchError::Unreachable { url: url.clone(), reason };
    let invalid = |reason: String| FetchError::Invalid { url: url.clone(), reason };
    let uri: http::Uri = url.parse().map_err(|e| invalid(format!("not a URL: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = match tokio::time::timeout(timeout, client.get(uri)).await {
        Err(_) => return Err(unreachable(format!("no answer within {} ms", timeout.as_millis()))),
        Ok(Err(e)) => return Err(unreachable(crate::preflight::error_chain(&e))),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    let body = match tokio::time::timeout(timeout, resp.into_body().collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => return Err(unreachable("the answer could not be read".into())),
    };
    if !status.is_success() {
        return Err(invalid(format!("answered {}", status.as_u16())));
    }
    serde_json::from_slice(&body).map_err(|e| invalid(format!("not a checklist report: {e}")))
}

/// The exit code of `klaviyo-proxy checklist`: 0 when nothing is red, 1 otherwise.
pub fn exit_code(report: &Report) -> i32 {
    i32::from(report.light == Light::Red)
}

fn mark(light: Light) -> &'static str {
    match light {
        Light::Green => "ok",
        Light::Amber => "WARN",
        Light::Red => "FAIL",
        Light::Grey => "-",
    }
}

/// The report as a table for people: one block per account, then health and alerts.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let row = |out: &mut String, title: &str, light: Light, summary: &str| {
        let _ = writeln!(out, "  {:<26} {:<5} {:<5} {}", title, light.as_str(), mark(light), summary);
    };
    if report.accounts.is_empty() {
        let _ = writeln!(out, "no traffic yet (uptime {} s)\n", report.uptime_seconds);
    }
    for account in &report.accounts {
        let _ =
            writeln!(out, "account {} ({} requests): {}", account.account, account.requests, account.light.as_str());
        for item in &account.items {
            row(&mut out, &item.title, item.light, &item.summary);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "health");
    for item in &report.health {
        row(&mut out, &item.title, item.light, &item.summary);
    }
    let _ = writeln!(out, "\nalerts (config/alerts.yml)");
    for alert in &report.alerts {
        let _ = writeln!(out, "  {:<26} {:<2} {:<8} {}", alert.name, alert.severity, alert.state, alert.detail);
    }
    let _ = writeln!(
        out,
        "\nchecklist {} (over {} s of traffic)",
        match report.light {
            Light::Red => "RED",
            Light::Amber => "amber",
            Light::Green => "green",
            Light::Grey => "grey (no traffic)",
        },
        report.uptime_seconds
    );
    out
}
