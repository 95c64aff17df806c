//! `watershed keys forget|rotate|decrypt|seal`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Args, Subcommand};
use watershed_event::AccountId;
use watershed_hub::config::KeysConfig;
use watershed_hub::{HubConfig, Overrides};
use watershed_protect::{Access, Audited as _, Decryptor, Keyring, LocalKeyring, LocalMasterKey};

#[derive(Args, Debug)]
pub(crate) struct KeyringArgs {
    /// The hub's configuration file: its `data_dir` and `[keys]` (then
    /// WATERSHED_* variables, then flags), as `serve` reads them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The hub's data directory (default ./watershed-data); the keyring is
    /// `DATA_DIR/keyring`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The keyring directory, when it is not under the data directory.
    #[arg(long)]
    keyring: Option<PathBuf>,
}

impl KeyringArgs {
    /// The keyring directory and its `[keys]` settings.
    fn settings(&self) -> anyhow::Result<(PathBuf, KeysConfig)> {
        let overrides = Overrides { data_dir: self.data_dir.clone(), ..Overrides::default() };
        let config = HubConfig::load(self.config.as_deref(), std::env::vars().collect(), &overrides)?;
        let dir = self.keyring.clone().unwrap_or_else(|| config.data_dir.join("keyring"));
        Ok((dir, config.keys))
    }

    fn open(&self) -> anyhow::Result<LocalKeyring> {
        let (dir, keys) = self.settings()?;
        keys.open(&dir).with_context(|| format!("opening keyring {}", dir.display()))
    }
}

/// Who asks for an audited action, and why: both go to the keyring's
/// audit log, and neither may be blank.
#[derive(Args, Debug)]
pub(crate) struct AttributionArgs {
    /// Who is asking (a user or role name; recorded in the audit log).
    #[arg(long)]
    principal: String,
    /// Why (recorded in the audit log), such as an erasure request's or a
    /// case's number.
    #[arg(long)]
    purpose: String,
}

impl AttributionArgs {
    /// The attribution, refused before anything is done when a part of it
    /// is blank.
    fn access(self) -> anyhow::Result<Access> {
        let access = Access { principal: self.principal, purpose: self.purpose };
        access.check()?;
        Ok(access)
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCmd {
    /// Crypto-shred data subjects: delete every data key of (account,
    /// subject). Their ciphertexts become unreadable everywhere. Audited.
    ///
    /// Many subjects (an erasure job) go in one call, with `--subject`
    /// repeated or `--subjects-from`: one pass over the keyring and one
    /// fsync for all. Exits non-zero if any subject had no key.
    Forget {
        /// The member account.
        #[arg(long)]
        account: AccountId,
        /// A data subject's id (the value of its data-subject field).
        #[arg(long, required_unless_present = "subjects_from")]
        subject: Vec<String>,
        /// A file of data subject ids, one per line (`-`: stdin), each
        /// taken as it is; blank lines and a byte order mark before the
        /// first are skipped.
        #[arg(long, value_name = "FILE")]
        subjects_from: Option<PathBuf>,
        /// Report what would be erased (keys and subjects found, subjects
        /// with no key) and erase nothing. Audited, as it tells whose data
        /// the hub holds.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        by: AttributionArgs,
        #[command(flatten)]
        keyring: KeyringArgs,
    },
    /// Rotate the master key and start new data keys; old data keys stay
    /// available for decryption. Audited.
    Rotate {
        #[command(flatten)]
        by: AttributionArgs,
        #[command(flatten)]
        keyring: KeyringArgs,
    },
    /// Decrypt values read from the lake. Audited per call.
    ///
    /// With ciphertexts as arguments, prints each plaintext on its own line,
    /// byte for byte. With `-`, reads ciphertexts from stdin, one per line
    /// (such as a query's output of `_dead_letters.raw`; blank lines are
    /// skipped), and prints one JSON object per value, in order:
    /// `{"plaintext": …}`, `{"plaintext_base64": …}` for a refused event
    /// that was not UTF-8 as received, or `{"error": …}`, so plaintexts with
    /// line breaks stay one line each.
    Decrypt {
        #[command(flatten)]
        by: AttributionArgs,
        /// Ciphertexts (`wse1.…`), or `-` to read them from stdin.
        #[arg(required = true)]
        values: Vec<String>,
        /// Print each plaintext as one NDJSON line, to send again (`| watershed
        /// send -`): dead letters' `raw` events refused before a schema
        /// existed for them. An event is put on one line by taking out the
        /// whitespace outside its strings; a value that does not decrypt, or
        /// is not one JSON object, is named on stderr by its position (its
        /// line on stdin) and left out, and the command exits 1.
        #[arg(long)]
        events: bool,
        #[command(flatten)]
        keyring: KeyringArgs,
    },
    /// Seal the keyring's plaintext master keys with the AWS KMS key of
    /// `[keys]` (`master = "kms"`, `kms_key_id`): afterwards the keyring
    /// opens only with that KMS key. Run `keys rotate` next, so every data
    /// key is rewrapped under a master key never stored in plaintext.
    /// Audited.
    Seal {
        #[command(flatten)]
        by: AttributionArgs,
        #[command(flatten)]
        keyring: KeyringArgs,
    },
}

/// `keys decrypt --events`: each plaintext that is one JSON object as an
/// NDJSON line; the others named on stderr by `origins`.
fn print_events(
    results: &[Result<watershed_protect::Plaintext, watershed_protect::Error>],
    origins: &[String],
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut left_out = 0usize;
    for (r, origin) in results.iter().zip(origins) {
        let why = match r {
            Err(e) => e.to_string(),
            Ok(p) => match serde_json::from_slice::<serde_json::Value>(p.expose()) {
                Ok(serde_json::Value::Object(_)) => {
                    out.write_all(&crate::input::compact(p.expose()))?;
                    out.write_all(b"\n")?;
                    continue;
                }
                Ok(_) => "not a JSON object".to_owned(),
                Err(e) if p.expose_str().is_none() => format!("not UTF-8 ({e})"),
                Err(e) => format!("not JSON ({e})"),
            },
        };
        left_out += 1;
        eprintln!("watershed: {origin}: left out: {why}");
    }
    out.flush()?;
    if left_out > 0 {
        eprintln!("watershed: {left_out} of {} value(s) left out", results.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Keys and subjects of `out`, a subject named twice counted once.
fn distinct_erasures(out: &[Option<watershed_protect::Erasure>]) -> (usize, usize) {
    let by_subject: std::collections::HashMap<&str, usize> =
        out.iter().flatten().map(|e| (e.subject_ref.as_str(), e.key_ids.len())).collect();
    (by_subject.values().sum(), by_subject.len())
}

/// Where a subject id of an erasure job came from: the `--subject`
/// flags, numbered from 1 in order, or a line of `--subjects-from`.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Flag(usize),
    Line(usize),
}

/// The subject ids of an erasure job, each with where it came from.
struct Job {
    ids: Vec<String>,
    origins: Vec<Origin>,
    /// The `--subjects-from` file (`stdin` for `-`), for messages.
    source: String,
}

impl Job {
    /// The `--subject` flags' ids, then the `--subjects-from` file's.
    fn read(flags: Vec<String>, from: Option<PathBuf>) -> anyhow::Result<Self> {
        let origins = (1..=flags.len()).map(Origin::Flag).collect();
        let mut job = Self { ids: flags, origins, source: String::new() };
        if let Some(path) = from {
            for (id, line) in read_subjects(&path)? {
                job.ids.push(id);
                job.origins.push(Origin::Line(line));
            }
            job.source =
                if path == std::path::Path::new("-") { "stdin".into() } else { path.display().to_string() };
        }
        Ok(job)
    }

    /// Say which of the subjects had no data key (`out`, in order), by
    /// where each came from (never by its id: subject ids are personal
    /// data), with a hint when some of those begin or end with
    /// whitespace (a CSV export's padding; an id is taken as it is);
    /// failure if any.
    fn report_missing(&self, account: &AccountId, out: &[Option<watershed_protect::Erasure>]) -> ExitCode {
        let missing: Vec<usize> =
            out.iter().enumerate().filter(|(_, e)| e.is_none()).map(|(i, _)| i).collect();
        if missing.is_empty() {
            return ExitCode::SUCCESS;
        }
        let place = |i: usize| match self.origins[i] {
            Origin::Flag(n) => format!("--subject number {n}"),
            Origin::Line(n) => format!("line {n}"),
        };
        let shown: Vec<String> = missing.iter().take(20).map(|&i| place(i)).collect();
        let from_file = missing.iter().any(|&i| matches!(self.origins[i], Origin::Line(_)));
        eprintln!(
            "error: {} subject(s) of account {account} had no data key (never seen, or forgotten already): {}{}{}",
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() { ", …" } else { "" },
            if from_file { format!(" (lines of {})", self.source) } else { String::new() },
        );
        let padded = missing.iter().filter(|&&i| self.ids[i].trim() != self.ids[i]).count();
        if padded > 0 {
            eprintln!(
                "hint: {padded} of them begin or end with whitespace, which is taken as part of the id; \
                 check the list for padding"
            );
        }
        ExitCode::FAILURE
    }
}

/// Subject ids, one per line, from `path` (`-`: stdin), each with its
/// line number; a leading byte order mark (as Windows tools write UTF-8
/// files) and blank lines are skipped.
fn read_subjects(path: &std::path::Path) -> anyhow::Result<Vec<(String, usize)>> {
    let text = if path == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading subjects from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading subjects from {}", path.display()))?
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    // Ids are taken as they are (no trimming), without a CRLF's CR.
    Ok(text
        .lines()
        .enumerate()
        .map(|(n, l)| (l.strip_suffix('\r').unwrap_or(l), n + 1))
        .filter(|(l, _)| !l.is_empty())
        .map(|(l, n)| (l.to_owned(), n))
        .collect())
}

pub(crate) fn run(cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Forget { account, subject, subjects_from, dry_run, by, keyring } => {
            let by = by.access()?;
            let job = Job::read(subject, subjects_from)?;
            let subjects = &job.ids;
            anyhow::ensure!(!subjects.is_empty(), "no data subjects to forget");
            let kr = keyring.open()?;
            let log = watershed_protect::Audited::audit_log(&kr).path().to_owned();
            let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
            if dry_run {
                let found = kr.subject_keys(&account, &refs, &by)?;
                let (keys, distinct) = distinct_erasures(&found);
                out!(
                    "dry run: would erase {keys} data key(s) of {distinct} subject(s) of account {account}; \
                     nothing was erased"
                );
                return Ok(job.report_missing(&account, &found));
            }
            if let [one] = &subjects[..] {
                let erasure = kr.forget(&account, one, &by)?;
                out!(
                    "erased {} data key(s) of account {account}, subject ref {}; logged to {}",
                    erasure.key_ids.len(),
                    erasure.subject_ref,
                    log.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let out = kr.forget_subjects(&account, &refs, &by)?;
            let (keys, distinct) = distinct_erasures(&out);
            out!(
                "erased {keys} data key(s) of {distinct} subject(s) of account {account}; logged to {}",
                log.display()
            );
            Ok(job.report_missing(&account, &out))
        }
        KeysCmd::Rotate { by, keyring } => {
            let by = by.access()?;
            let kr = keyring.open()?;
            let id = kr.rotate(&by)?;
            out!("rotated: new master key {id}; existing data keys rewrapped, new data keys for new events");
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Seal { by, keyring } => {
            let by = by.access()?;
            let (dir, keys) = keyring.settings()?;
            anyhow::ensure!(
                dir.join("master.json").exists(),
                "no keyring in {}: there is nothing to seal (`serve` with keys.master = \"kms\" creates \
                 a sealed one)",
                dir.display()
            );
            let sealer = keys.sealer()?;
            let n = LocalMasterKey::seal(&dir, &*sealer)
                .with_context(|| format!("sealing the master keys in {}", dir.display()))?;
            // The keyring must open sealed before this reports success.
            let kr = keys.open(&dir).with_context(|| format!("opening keyring {}", dir.display()))?;
            let kms_key = keys.kms_key_id.unwrap_or_default();
            if n == 0 {
                out!("{}: the master keys are sealed already", dir.join("master.json").display());
                return Ok(ExitCode::SUCCESS);
            }
            kr.audit_log().record(
                "seal",
                &by,
                &serde_json::json!({"sealed_by": kms_key, "master_keys_sealed": n}),
            )?;
            out!(
                "sealed {n} master key(s) in {} with KMS key {kms_key}; now run `watershed keys rotate` with \
                 the same settings to rewrap every data key under a new master key",
                dir.join("master.json").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Decrypt { by, values, events, keyring } => {
            let by = by.access()?;
            let from_stdin = values == ["-"];
            // Each value with where it came from, for messages.
            let (values, origins): (Vec<String>, Vec<String>) = if from_stdin {
                let mut lines = Vec::new();
                for (n, line) in std::io::stdin().lines().enumerate() {
                    let line = line.context("reading ciphertexts from stdin")?;
                    let line = line.trim();
                    if !line.is_empty() {
                        lines.push((line.to_owned(), format!("line {}", n + 1)));
                    }
                }
                anyhow::ensure!(!lines.is_empty(), "no ciphertexts on stdin");
                lines.into_iter().unzip()
            } else {
                let origins = (1..=values.len()).map(|n| format!("value {n}")).collect();
                (values, origins)
            };
            let kr = keyring.open()?;
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let results = Decryptor::new(&kr).decrypt(&by, &refs)?;
            if events {
                return print_events(&results, &origins);
            }
            let mut failed = 0usize;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for r in &results {
                if r.is_err() {
                    failed += 1;
                }
                match (r, from_stdin) {
                    (Ok(p), false) => {
                        out.write_all(p.expose())?;
                        out.write_all(b"\n")?;
                    }
                    (Err(e), false) => eprintln!("error: {e}"),
                    (Ok(p), true) => {
                        let line = match p.expose_str() {
                            Some(text) => serde_json::json!({ "plaintext": text }),
                            None => serde_json::json!({ "plaintext_base64": STANDARD.encode(p.expose()) }),
                        };
                        writeln!(out, "{line}")?;
                    }
                    (Err(e), true) => writeln!(out, "{}", serde_json::json!({ "error": e.to_string() }))?,
                }
            }
            out.flush()?;
            if from_stdin && failed > 0 {
                eprintln!("{failed} of {} value(s) could not be decrypted", results.len());
            }
            Ok(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}
