//! `watershed schema check|list`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use watershed_schema::{Error, Registry};

#[derive(Subcommand, Debug)]
pub(crate) enum SchemaCmd {
    /// Check every subject: Avro validity, attributes, and compatibility of
    /// each version with its predecessors. Exits 1 listing every problem.
    Check {
        /// The schema directory.
        #[arg(default_value = "schemas")]
        dir: PathBuf,
    },
    /// List subjects, versions, global ids and protected fields.
    List {
        /// The schema directory.
        #[arg(default_value = "schemas")]
        dir: PathBuf,
    },
}

pub(crate) fn run(cmd: SchemaCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SchemaCmd::Check { dir } => match Registry::load(&dir) {
            Ok(reg) => {
                let versions: usize = reg.subjects().iter().map(|s| s.versions.len()).sum();
                let protected: usize = reg.subjects().iter().map(|s| s.latest().protect.actions.len()).sum();
                out!(
                    "ok: {} subjects, {versions} versions, {protected} protected fields in {}",
                    reg.subjects().len(),
                    dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(Error::Invalid { problems }) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                eprintln!("{} problem(s) in {}", problems.len(), dir.display());
                Ok(ExitCode::FAILURE)
            }
            Err(e) => Err(e.into()),
        },
        SchemaCmd::List { dir } => {
            let reg = Registry::load(&dir)?;
            for s in reg.subjects() {
                out!(
                    "{}  table={}  compatibility={}  route=({:?}, {:?})",
                    s.name,
                    s.table,
                    s.config.compatibility,
                    s.config.source,
                    s.config.detail_type
                );
                for v in &s.versions {
                    out!("  v{}  id={}  {}", v.version, v.id, v.path.display());
                }
                let latest = s.latest();
                if let Some((_, name)) = &latest.protect.data_subject {
                    out!("  data subject: {name}");
                }
                for a in &latest.protect.actions {
                    out!("  protect {:<9} {}", a.action.as_str(), a.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
