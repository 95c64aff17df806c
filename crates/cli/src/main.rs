//! `watershed`: the one binary. It parses arguments and calls the library
//! crates; no pipeline logic lives here.

/// `println!` that returns an error instead of panicking when stdout is
/// closed (`watershed schema list | head`): the command stops there, and
/// `main` exits quietly.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::on_stdout)?;
    }};
}

mod bench;
mod demo;
mod input;
mod keys;
mod logging;
mod schema;
mod send;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Watershed: a multi-account event ingestion hub that validates, protects
/// and lands events as partitioned Parquet.
#[derive(Parser, Debug)]
#[command(name = "watershed", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub: HTTP ingest, WAL, validation, protection, Parquet lake.
    Serve(serve::ConfigArgs),
    /// Post NDJSON events to a hub in batches.
    Send(send::SendArgs),
    /// Start a hub on a scratch directory, send generated events from three
    /// accounts, stop it, and show what landed in the lake.
    Demo(demo::DemoArgs),
    /// Benchmark the reference workload end to end against pyarrow, DuckDB
    /// and the arrow-json→Parquet floor, on one and two cores.
    Bench(bench::BenchArgs),
    /// Manage account credentials.
    #[command(subcommand)]
    Accounts(serve::AccountsCmd),
    /// Inspect the lake, merge its small files, delete what is past its retention, or print its catalog DDL.
    #[command(subcommand)]
    Lake(serve::LakeCmd),
    /// Check or list a schema directory.
    #[command(subcommand)]
    Schema(schema::SchemaCmd),
    /// Manage protection keys: crypto-shred data subjects, decrypt, rotate, seal with AWS KMS;
    /// each audited, naming who asks and why.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
}

/// mimalloc keeps freed pages for reuse: with glibc's allocator, Arrow
/// builders growing and dropping per request cost a page fault storm
/// (about a third of the hub's CPU time in profiles).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option index of `purge_delay` (mimalloc 3, `mimalloc.h`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc 3's default purge delay, used to recognise the option.
const MI_DEFAULT_PURGE_DELAY: std::ffi::c_long = 1000;
/// How long freed memory stays mapped before mimalloc returns it.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Keep freed memory mapped for [`PURGE_DELAY_MS`] instead of mimalloc's
/// one second. Under sustained load the hub frees and reallocates
/// multi-megabyte buffers (Parquet pages, column chunks) continuously; with
/// a short delay each reuse faulted in freshly zeroed 2 MiB pages (up to a
/// tenth of the hub's CPU time in profiles). Memory is still returned when idle, and
/// stays bounded by the memory budget. `MIMALLOC_PURGE_DELAY` in the
/// environment wins.
#[allow(unsafe_code)]
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_get`/`mi_option_set` read and write one global
    // option slot of the allocator; any option index and value are valid
    // inputs. The index is checked by its default value first, so a
    // different mimalloc layout leaves every option alone.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

/// Default data directory of the embedded hub.
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("watershed-data")
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // The server logs its work; the other commands print their results
    // and log only problems. WATERSHED_LOG overrides either.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    match logging::Logging::from_env(default_level) {
        Ok(logging) => logging.init(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = match cli.command {
        Command::Serve(a) => rt.block_on(serve::serve(a)),
        Command::Send(a) => rt.block_on(send::send(a)),
        Command::Demo(a) => rt.block_on(demo::demo(a)),
        Command::Bench(a) => bench::bench(a),
        Command::Accounts(c) => serve::accounts(c),
        Command::Lake(c) => rt.block_on(serve::lake(c)),
        Command::Schema(c) => schema::run(c),
        Command::Keys(c) => keys::run(c),
    };
    match result {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): stop as SIGPIPE would
        // stop a C tool, without an error message.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref)
                    .is_some_and(|i| i.is::<StdoutClosed>())
            }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// A write to stdout failed because nobody reads it any more (as opposed
/// to a broken pipe on a socket).
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// `out!`'s error: a broken pipe marked as stdout's.
fn on_stdout(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

/// An error and its causes on one line, each cause once. The library
/// errors name their cause in their own message (`{path}: {source}`, so
/// that a log line of the error alone is complete) and also return it as
/// their source; a cause whose text already ends the line is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn a_cause_is_reported_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        // A library error that names its source and returns it.
        #[derive(Debug)]
        struct Named(std::io::Error);
        impl std::fmt::Display for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "/srv/schemas: {}", self.0)
            }
        }
        impl std::error::Error for Named {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Named(io())).context("starting the hub");
        assert_eq!(report(&e), "starting the hub: /srv/schemas: No such file or directory");
        // Context over a cause that does not repeat it keeps both.
        let e = anyhow::Error::new(io()).context("reading events.ndjson");
        assert_eq!(report(&e), "reading events.ndjson: No such file or directory");
    }
}
