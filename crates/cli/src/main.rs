//! `watershed`: the one binary. It parses arguments and calls the library
//! crates; no pipeline logic lives here.

mod keys;
mod schema;

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
    /// Check or list a schema directory.
    #[command(subcommand)]
    Schema(schema::SchemaCmd),
    /// Manage protection keys: crypto-shred a data subject, rotate, decrypt.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
}

/// Default data directory of the embedded hub.
pub(crate) fn default_data_dir() -> PathBuf {
    PathBuf::from("watershed-data")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WATERSHED_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Schema(c) => schema::run(c),
        Command::Keys(c) => keys::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
