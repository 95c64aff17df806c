//! `watershed send`: post events (NDJSON, a JSON array or JSON objects one
//! after another; plain, gzip or zstd) to a hub in batches, with retries,
//! backoff and a progress bar.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::input::{blank, Events, Shape};

#[derive(Args, Debug)]
pub(crate) struct SendArgs {
    /// File of events, or - for stdin: NDJSON, a JSON array, or JSON
    /// objects one after another (as `jq .` prints them); plain, gzip or
    /// zstd.
    input: PathBuf,
    /// The hub's base URL (its `/v1/events` endpoint is taken as it is).
    #[arg(long, default_value = "http://127.0.0.1:8787")]
    url: String,
    /// The account's bearer token. A flag's value shows in the process
    /// list: prefer `--token-file` or the `WATERSHED_TOKEN` variable (used
    /// when neither flag is given).
    #[arg(long)]
    token: Option<String>,
    /// A file holding the account's bearer token alone (a trailing line
    /// break is ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// PEM file of the certificate authorities to trust for an https://
    /// hub, besides the system's (for a hub, or the TLS terminator in
    /// front of it, whose certificate a private CA signed).
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Retries of a request after its first attempt, on 503, 5xx and
    /// connection errors, with backoff (0: none).
    #[arg(long, default_value_t = 10)]
    retries: u32,
    /// Collector name sent as provenance.
    #[arg(long)]
    collector: Option<String>,
    /// Batches in flight at once (the hub commits concurrent requests in
    /// one WAL write and fsync).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How request bodies travel: zstd (about a tenth of the bytes on
    /// EventBridge-shaped events), gzip (for a proxy in front of the hub
    /// that knows no zstd) or none.
    #[arg(long, value_enum, default_value_t = Compress::Zstd)]
    compress: Compress,
}

/// How `send` compresses request bodies (`Content-Encoding`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compress {
    /// As read.
    None,
    /// zstd, level 1: fast, and most of the gain.
    Zstd,
    /// gzip, fast level: for what in between knows no zstd.
    Gzip,
}

impl Compress {
    /// `body` as it is sent, and its `Content-Encoding`.
    fn encode(self, body: &Bytes) -> anyhow::Result<(Bytes, Option<&'static str>)> {
        Ok(match self {
            Self::None => (body.clone(), None),
            Self::Zstd => {
                (Bytes::from(zstd::bulk::compress(body, 1).context("compressing a batch")?), Some("zstd"))
            }
            Self::Gzip => {
                use std::io::Write as _;
                let mut gz = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 4),
                    flate2::Compression::fast(),
                );
                gz.write_all(body).context("compressing a batch")?;
                (Bytes::from(gz.finish().context("compressing a batch")?), Some("gzip"))
            }
        })
    }
}

/// The bearer token: the one line of `--token-file`, else `given`
/// (`--token`, else `WATERSHED_TOKEN`).
fn token(given: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let Some(path) = file else {
        return given.map(str::to_owned).context("no token: pass --token-file, --token or WATERSHED_TOKEN");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", path.display());
    anyhow::ensure!(
        !token.chars().any(char::is_whitespace),
        "the token file {} must hold the token alone, on one line (it holds spaces or several lines)",
        path.display()
    );
    Ok(token.to_owned())
}

/// Totals of a send.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    pub(crate) duplicates: u64,
}

pub(crate) async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    use futures::StreamExt as _;
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let url = events_url(&args.url)?;
    let client = client(args.ca_cert.as_deref())?;
    let from_env = std::env::var("WATERSHED_TOKEN").ok();
    let token = token(args.token.as_deref().or(from_env.as_deref()), args.token_file.as_deref())?;
    let raw: Box<dyn Read> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?,
        )
    };
    let total_bytes = std::fs::metadata(&args.input).map(|m| m.len()).unwrap_or(0);
    let bar = if total_bytes > 0 { ProgressBar::new(total_bytes) } else { ProgressBar::new_spinner() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg}")
            .expect("valid template"),
    );
    // The bar counts the input's bytes as read, compressed or not.
    let (reader, coding) =
        decompressed(bar.wrap_read(raw)).with_context(|| format!("reading {}", args.input.display()))?;
    let (shape, events) = Events::of(reader).with_context(|| format!("reading {}", args.input.display()))?;
    if shape != Shape::Lines {
        bar.suspend(|| eprintln!("reading {} as {}", args.input.display(), shape.describe()));
    }
    let mut totals = Totals::default();
    let batches = Batches {
        events,
        size: args.batch,
        next_index: 0,
        input: match coding {
            Some(c) => format!("{} ({c})", args.input.display()),
            None => args.input.display().to_string(),
        },
    };
    // Up to `--concurrency` batches in flight; answers are taken in the
    // order of the input, so rejects are reported in order and a failure
    // names the first batch that was not sent.
    let (client, url, token, args) = (&client, url.as_str(), token.as_str(), &args);
    let mut answers = futures::stream::iter(batches)
        .map(|batch| async move {
            let Batch { first, events, body } = batch?;
            let resp =
                post(client, url, token, args.collector.as_deref(), body, args.retries, args.compress).await;
            anyhow::Ok((first, events, resp))
        })
        .buffered(args.concurrency);
    let mut sent = 0;
    while let Some(answer) = answers.next().await {
        // A batch that could not be read (a damaged compressed file, an
        // I/O error) stops the send; every batch before it was answered.
        let (first, events, resp) = answer.with_context(|| {
            format!(
                "stopped after sending {sent} events (accepted {}, rejected {}, duplicates {})",
                totals.accepted, totals.rejected, totals.duplicates
            )
        })?;
        sent = first + events;
        if let Some(refused) = resp.as_ref().err().and_then(|e| e.downcast_ref::<Unauthorized>()) {
            anyhow::bail!(
                "{refused}. Events {first}..{} were not sent (the {first} before them were: accepted {}, \
                 rejected {}{})",
                first + events,
                totals.accepted,
                totals.rejected,
                if args.concurrency > 1 { "; later batches may have been sent too" } else { "" }
            );
        }
        let resp = resp.with_context(|| {
            format!(
                "events {first}..{} were not all sent (the {first} before them were: accepted {}, \
                 rejected {}{}); sending the file again is safe, the hub answers what it already has \
                 as duplicates",
                first + events,
                totals.accepted,
                totals.rejected,
                if args.concurrency > 1 { "; later batches may have been sent too" } else { "" }
            )
        })?;
        let (accepted, duplicates) =
            (resp["accepted"].as_u64().unwrap_or(0), resp["duplicates"].as_u64().unwrap_or(0));
        let rejected = resp["rejected"].as_array().map_or(0, Vec::len);
        totals.accepted += accepted;
        totals.duplicates += duplicates;
        for r in resp["rejected"].as_array().into_iter().flatten() {
            totals.rejected += 1;
            bar.suspend(|| {
                eprintln!(
                    "rejected event {} (id {}): {} at {}: {}",
                    first + r["index"].as_u64().unwrap_or(0) as usize,
                    r["id"].as_str().unwrap_or("?"),
                    r["reason"].as_str().unwrap_or("?"),
                    r["path"].as_str().unwrap_or("$"),
                    r["detail"].as_str().unwrap_or("")
                );
            });
        }
        bar.set_message(format!("accepted {} rejected {}", totals.accepted, totals.rejected));
        // Every event sent is accepted, a duplicate or rejected: an answer
        // that accounts for fewer (or more) is not one to trust.
        let answered = accepted + duplicates + rejected as u64;
        if answered != events as u64 {
            anyhow::bail!(
                "the hub answered for {answered} of events {first}..{} ({events} sent: accepted {accepted}, \
                 duplicates {duplicates}, rejected {rejected}); the others may not be stored. Sending the \
                 file again is safe, the hub answers what it already has as duplicates",
                first + events
            );
        }
    }
    bar.finish_and_clear();
    out!("accepted {} rejected {} duplicates {}", totals.accepted, totals.rejected, totals.duplicates);
    Ok(if totals.rejected > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The ingest endpoint of the hub at `base` (`http://host:port`, with or
/// without a path prefix; the endpoint's own URL is taken as it is).
fn events_url(base: &str) -> anyhow::Result<String> {
    let parsed =
        reqwest::Url::parse(base).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    let Some(mut url) = parsed else {
        anyhow::bail!("--url {base:?} is not an http:// or https:// URL (such as http://127.0.0.1:8787)");
    };
    if url.query().is_some() || url.fragment().is_some() {
        anyhow::bail!("--url {base:?}: give the hub's base URL, without a query or fragment");
    }
    let path = url.path().trim_end_matches('/').to_owned();
    let endpoint = if path.ends_with("/v1/events") { path } else { format!("{path}/v1/events") };
    url.set_path(&endpoint);
    Ok(url.to_string())
}

/// The HTTP client: HTTPS trusts the system's root certificates and those
/// of `ca_cert`.
fn client(ca_cert: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("--ca-cert {}: no PEM certificate in it", path.display()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("setting up the HTTP client")
}

/// The gzip member header and the zstd frame magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// `input` decompressed when it starts as a gzip or zstd stream does (as
/// `.ndjson.gz` exports and `zstd`-compressed logs do; concatenated
/// members or frames are read through), and the coding found. NDJSON
/// cannot start with either magic number, so nothing else is mistaken
/// for one.
fn decompressed(mut input: impl Read + 'static) -> std::io::Result<(Box<dyn Read>, Option<&'static str>)> {
    let mut head = Vec::with_capacity(ZSTD_MAGIC.len());
    (&mut input).take(ZSTD_MAGIC.len() as u64).read_to_end(&mut head)?;
    let (is_gzip, is_zstd) = (head.starts_with(&GZIP_MAGIC), head.starts_with(&ZSTD_MAGIC));
    let whole = std::io::Cursor::new(head).chain(input);
    Ok(if is_gzip {
        (Box::new(flate2::read::MultiGzDecoder::new(whole)), Some("gzip"))
    } else if is_zstd {
        (Box::new(zstd::stream::read::Decoder::new(whole)?), Some("zstd"))
    } else {
        (Box::new(whole), None)
    })
}

/// One request's worth of NDJSON.
struct Batch {
    /// Index of its first event in the input.
    first: usize,
    /// Its events.
    events: usize,
    body: Bytes,
}

/// The input's batches of up to `size` events, read as they are needed.
/// Events are bytes: an NDJSON line that is not UTF-8 is the hub's to
/// reject (`malformed`, by its index), not a reason to stop the send.
struct Batches<E> {
    events: E,
    size: usize,
    next_index: usize,
    /// The input's name, for errors.
    input: String,
}

impl<E: Iterator<Item = anyhow::Result<Vec<u8>>>> Iterator for Batches<E> {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut body = Vec::new();
        let mut events = 0usize;
        while events < self.size.max(1) {
            let event = match self.events.next().transpose() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => return Some(Err(e.context(format!("reading {}", self.input)))),
            };
            body.extend_from_slice(&event);
            body.push(b'\n');
            events += 1;
        }
        if events == 0 {
            return None;
        }
        let first = self.next_index;
        self.next_index += events;
        Some(Ok(Batch { first, events, body: Bytes::from(body) }))
    }
}

/// POST one NDJSON batch and return the hub's answer, `accepted`,
/// `duplicates` and `rejected` (indexes counted from the start of `body`).
/// A batch the hub finds over its body limit or its event count limit
/// (413) is split in halves at a line boundary and each half sent on its
/// own, so any file can be sent whatever `--batch` and the hub's
/// `limits.max_body_bytes` and `limits.max_batch_events`; a single event
/// over the byte limit is reported among the rejects, `too_large`, and not
/// sent. Transient failures are retried (see
/// [`post_once`]). Each request's body is compressed as `compress` says.
pub(crate) async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    collector: Option<&str>,
    body: Bytes,
    retries: u32,
    compress: Compress,
) -> anyhow::Result<Value> {
    let mut accepted = 0u64;
    let mut duplicates = 0u64;
    let mut rejected = Vec::new();
    // (index of the part's first event in `body`, the part), next on top.
    let mut parts = vec![(0usize, body)];
    while let Some((base, part)) = parts.pop() {
        let (wire, encoding) = compress.encode(&part)?;
        match post_once(client, url, token, collector, (&wire, encoding), retries).await? {
            Answer::Done(r) => {
                accepted += r["accepted"].as_u64().unwrap_or(0);
                duplicates += r["duplicates"].as_u64().unwrap_or(0);
                for mut x in r["rejected"].as_array().cloned().unwrap_or_default() {
                    let at = x["index"].as_u64().unwrap_or(0) + base as u64;
                    x["index"] = Value::from(at);
                    rejected.push(x);
                }
            }
            Answer::TooLarge(why) => {
                let lines = part.split(|&b| b == b'\n').filter(|l| !blank(l)).count();
                if lines <= 1 {
                    // One event over the hub's body limit cannot be sent in
                    // any batch: it is reported as rejected here, as the
                    // hub rejects an event over its event limit, and the
                    // events around it are sent.
                    rejected.push(serde_json::json!({
                        "index": base,
                        "id": event_id(&part),
                        "reason": "too_large",
                        "path": "$",
                        "detail": format!(
                            "the event alone ({} bytes) is over the hub's body limit{why}; it was not sent, \
                             so it is not in _dead_letters",
                            part.len()
                        ),
                    }));
                    continue;
                }
                let (first, second, first_events) = halves(&part, lines / 2);
                parts.push((base + first_events, second));
                parts.push((base, first));
            }
        }
    }
    Ok(serde_json::json!({ "accepted": accepted, "duplicates": duplicates, "rejected": rejected }))
}

/// The `id` of an event that is not sent, for its report (`None` when it
/// has none or is not a JSON object).
fn event_id(event: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(event).ok()?.get("id")?.as_str().map(String::from)
}

/// The rustls error under `e`, if a TLS handshake failed. rustls's errors
/// reach reqwest inside `io::Error`s (nested ones), whose `source` skips
/// what they wrap: those are opened with `get_ref`.
fn tls_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match c.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

/// An error and its causes on one line, a cause already at the end of
/// the line left out ("error sending request for url (…): client error
/// (Connect): tcp connect error: Connection refused (os error 111)").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// Split NDJSON `body` after its `events`-th non-blank line: the two
/// parts and the number of events in the first.
fn halves(body: &Bytes, events: usize) -> (Bytes, Bytes, usize) {
    let mut seen = 0;
    let mut at = body.len();
    let mut start = 0;
    for line in body.split_inclusive(|&b| b == b'\n') {
        if seen == events {
            at = start;
            break;
        }
        if !blank(line) {
            seen += 1;
        }
        start += line.len();
    }
    (body.slice(..at), body.slice(at..), seen)
}

/// What the hub answered a batch.
enum Answer {
    /// 200: the per-event results.
    Done(Value),
    /// 413: the body is over the hub's limit (the limit, as the hub's
    /// message gives it, for the error).
    TooLarge(String),
}

/// The hub refused the token (401): every batch would be, so the send
/// stops, saying so first.
#[derive(Debug)]
struct Unauthorized(String);

impl std::fmt::Display for Unauthorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the hub refused the token (401 {}); give the account's token with --token-file, --token or \
             WATERSHED_TOKEN",
            self.0
        )
    }
}

impl std::error::Error for Unauthorized {}

/// POST one batch (its body as sent, and its `Content-Encoding`),
/// retrying transient failures with exponential backoff (honouring
/// `Retry-After`).
async fn post_once(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    collector: Option<&str>,
    (body, encoding): (&Bytes, Option<&str>),
    retries: u32,
) -> anyhow::Result<Answer> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/x-ndjson")
            .body(body.clone());
        if let Some(c) = collector {
            req = req.header("x-watershed-collector", c);
        }
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let transient = match req.send().await {
            Ok(r) if r.status().is_success() => return Ok(Answer::Done(r.json().await?)),
            Ok(r) if r.status().as_u16() == 413 => {
                let text = r.text().await.unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(|m| format!(" ({m})")))
                    .unwrap_or_default();
                return Ok(Answer::TooLarge(message));
            }
            Ok(r) if r.status().as_u16() == 503 || r.status().is_server_error() => {
                if let Some(s) =
                    r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
                {
                    delay = delay.max(Duration::from_secs(s));
                }
                let status = r.status();
                // The hub says why (`busy`, `starting`, `unavailable`).
                let why = serde_json::from_str::<Value>(&r.text().await.unwrap_or_default())
                    .ok()
                    .and_then(|v| v["message"].as_str().map(|m| format!(": {m}")))
                    .unwrap_or_default();
                format!("{status}{why}")
            }
            Ok(r) if r.status().as_u16() == 401 => {
                let text = r.text().await.unwrap_or_default();
                let why = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| Some(format!("{}: {}", v["error"].as_str()?, v["message"].as_str()?)))
                    .unwrap_or(text);
                return Err(Unauthorized(why).into());
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                anyhow::bail!("the hub refused the batch: {status}: {text}");
            }
            // A request that cannot be built fails the same way every time.
            Err(e) if e.is_builder() => anyhow::bail!("cannot build the request: {}", with_causes(&e)),
            Err(e) => {
                // So does a TLS handshake the hub's certificate fails (or
                // one with a server that does not speak TLS).
                if let Some(tls) = tls_error(&e) {
                    let hint = match tls {
                        rustls::Error::InvalidCertificate(_) => {
                            " (for a hub whose certificate a private CA signed, pass --ca-cert with that CA)"
                        }
                        rustls::Error::InvalidMessage(_) => {
                            " (the port does not speak TLS: a hub without [tls] serves plain http://)"
                        }
                        _ => "",
                    };
                    anyhow::bail!("TLS with the hub failed: {}{hint}", with_causes(&e));
                }
                with_causes(&e)
            }
        };
        if attempt > retries {
            let s = if attempt == 1 { "" } else { "s" };
            anyhow::bail!("giving up after {attempt} attempt{s}: {transient}");
        }
        tracing::warn!(attempt, error = %transient, delay_ms = watershed_event::millis(delay), "retrying batch");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{decompressed, events_url, halves, token, with_causes, Batches, Events};

    #[test]
    fn a_token_file_holds_the_token_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        assert_eq!(token(Some("wsh_a"), None).unwrap(), "wsh_a");
        for text in ["wsh_b", "wsh_b\n", "wsh_b\r\n"] {
            assert_eq!(token(None, Some(&file("t", text))).unwrap(), "wsh_b", "{text:?}");
        }
        for (text, says) in [
            ("", "is empty"),
            ("\n", "is empty"),
            ("wsh_b\n\n", "alone, on one line"),
            ("id 1f wsh_b\n", "alone, on one line"),
        ] {
            let e = token(None, Some(&file("t", text))).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let e = token(None, Some(&dir.path().join("missing"))).unwrap_err();
        assert!(e.to_string().starts_with("reading the token file"), "{e}");
        assert!(token(None, None).unwrap_err().to_string().contains("--token-file"));
    }

    #[test]
    fn the_url_is_the_hubs_base_or_its_endpoint() {
        for (given, url) in [
            ("http://127.0.0.1:8787", "http://127.0.0.1:8787/v1/events"),
            ("http://127.0.0.1:8787/", "http://127.0.0.1:8787/v1/events"),
            ("https://hub.example/ingest/", "https://hub.example/ingest/v1/events"),
            ("http://127.0.0.1:8787/v1/events", "http://127.0.0.1:8787/v1/events"),
            ("http://127.0.0.1:8787/v1/events/", "http://127.0.0.1:8787/v1/events"),
        ] {
            assert_eq!(events_url(given).unwrap(), url, "{given}");
        }
        for (bad, says) in [
            ("127.0.0.1:8787", "not an http:// or https:// URL"),
            ("localhost", "not an http:// or https:// URL"),
            ("ftp://hub", "not an http:// or https:// URL"),
            ("http://hub:8787/?x=1", "without a query"),
        ] {
            let e = events_url(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn halves_split_at_line_boundaries_counting_events() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let body = b("a\n \nb\nc\n");
        assert_eq!(halves(&body, 1), (b("a\n"), b(" \nb\nc\n"), 1));
        assert_eq!(halves(&body, 2), (b("a\n \nb\n"), b("c\n"), 2));
        assert_eq!(halves(&b("a\nb"), 1), (b("a\n"), b("b"), 1));
    }

    fn batches(input: &'static [u8], size: usize) -> Batches<Events> {
        let (_, events) = Events::of(Box::new(input)).unwrap();
        Batches { events, size, next_index: 0, input: "events.ndjson".into() }
    }

    fn bodies(input: &'static [u8], size: usize) -> Vec<Bytes> {
        batches(input, size).map(|b| b.unwrap().body).collect()
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// Whatever the lines (blank ones, CRLF endings, a byte order
        /// mark, no final line break) and the batch size, the batches hold
        /// every non-blank line once, in order, at most `size` events
        /// each, numbered from where the last stopped; and a batch split
        /// in halves after any of its events is the same bytes, the first
        /// half holding that many events.
        #[test]
        fn batches_and_halves_keep_every_event_in_order(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    3 => "[a-z0-9 ]{0,12}".prop_map(|s| format!("{{\"e\":\"{s}\"}}")),
                    1 => proptest::prop_oneof![
                        proptest::strategy::Just(String::new()),
                        proptest::strategy::Just(" ".to_owned()),
                        proptest::strategy::Just("\t\r".to_owned()),
                    ],
                ],
                0..40,
            ),
            crlf in proptest::prelude::any::<bool>(),
            bom in proptest::prelude::any::<bool>(),
            trailing in proptest::prelude::any::<bool>(),
            size in 1usize..8,
        ) {
            use proptest::prelude::*;
            let end = if crlf { "\r\n" } else { "\n" };
            let mut input = if bom { watershed_hub::body::BOM.to_vec() } else { Vec::new() };
            input.extend_from_slice(lines.join(end).as_bytes());
            if trailing && !lines.is_empty() {
                input.extend_from_slice(end.as_bytes());
            }
            let events: Vec<String> = lines.iter().filter(|l| !super::blank(l.as_bytes())).cloned().collect();
            let (_, events_in) = Events::of(Box::new(std::io::Cursor::new(input))).unwrap();
            let batches: Vec<super::Batch> =
                Batches { events: events_in, size, next_index: 0, input: "events.ndjson".into() }
                    .map(|b| b.unwrap())
                    .collect();
            let mut got = Vec::new();
            let mut next = 0;
            for b in &batches {
                prop_assert_eq!(b.first, next);
                prop_assert!(b.events >= 1 && b.events <= size);
                let text = std::str::from_utf8(&b.body).unwrap();
                let mine: Vec<String> = text
                    .split('\n')
                    .map(|l| l.trim_end_matches('\r').to_owned())
                    .filter(|l| !super::blank(l.as_bytes()))
                    .collect();
                prop_assert_eq!(mine.len(), b.events);
                got.extend(mine);
                next += b.events;
                for n in 1..b.events {
                    let (one, two, counted) = halves(&b.body, n);
                    prop_assert_eq!(counted, n);
                    prop_assert_eq!([&one[..], &two[..]].concat(), b.body.to_vec());
                    let in_one = one.split(|&c| c == b'\n').filter(|l| !super::blank(l)).count();
                    prop_assert_eq!(in_one, n);
                }
            }
            prop_assert_eq!(got, events);
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_event() {
        assert_eq!(bodies(b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}\n", 1), [&b"{\"a\":1}\n"[..], b"{\"b\":2}\n"]);
        // Behind it, a JSON array is still recognised.
        assert_eq!(bodies(b"\xEF\xBB\xBF[{\"a\":1},\n {\"b\": 2}]\n", 10), [&b"{\"a\":1}\n{\"b\":2}\n"[..]]);
        // Only the input's first bytes: later, it is the event's own.
        assert_eq!(bodies(b"{}\n\xEF\xBB\xBF{}\n", 5), [&b"{}\n\xEF\xBB\xBF{}\n"[..]]);
    }

    /// gzip and zstd input is read decompressed, concatenated members
    /// and frames included; anything else is read as it is.
    #[test]
    fn compressed_input_is_recognised_by_its_magic_number() {
        use std::io::{Read as _, Write as _};
        let read = |input: Vec<u8>| {
            let (mut r, coding) = decompressed(std::io::Cursor::new(input)).unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| (String::from_utf8(out).unwrap(), coding))
        };
        let gzip = |text: &str| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(text.as_bytes()).unwrap();
            gz.finish().unwrap()
        };
        let events = "{\"id\":\"a\"}\n{\"id\":\"b\"}\n";
        let mut two_members = gzip("{\"id\":\"a\"}\n");
        two_members.extend(gzip("{\"id\":\"b\"}\n"));
        assert_eq!(read(two_members).unwrap(), (events.to_owned(), Some("gzip")));
        let mut two_frames = zstd::encode_all(&b"{\"id\":\"a\"}\n"[..], 3).unwrap();
        two_frames.extend(zstd::encode_all(&b"{\"id\":\"b\"}\n"[..], 3).unwrap());
        assert_eq!(read(two_frames).unwrap(), (events.to_owned(), Some("zstd")));
        for plain in ["", "{", events, "\u{feff}{}\n"] {
            assert_eq!(read(plain.as_bytes().to_vec()).unwrap(), (plain.to_owned(), None));
        }
        // A damaged stream is an error, not events.
        let mut cut = gzip(events);
        cut.truncate(cut.len() - 9);
        assert!(read(cut).is_err());
    }

    #[test]
    fn a_transient_error_names_its_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error, &'static str);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.1)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(
            with_causes(&Outer(refused(), "error sending request")),
            "error sending request: Connection refused"
        );
        assert_eq!(
            with_causes(&Outer(refused(), "tcp connect: Connection refused")),
            "tcp connect: Connection refused"
        );
    }
}
