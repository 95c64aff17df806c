//! The schema registry: loads `schemas/<subject>/{subject.toml,vN.avsc}`,
//! compiles every version, checks each one against its predecessors under
//! the subject's compatibility mode, assigns stable global ids, and resolves
//! `(source, detail_type[, version])` to a schema.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use sha2::{Digest, Sha256};
use watershed_event::Reason;

use crate::compat;
use crate::error::{Error, Result};
use crate::node::{compile, Kind, Node};
use crate::policy::{plan, ProtectPlan};
use crate::subject::{default_table_name, is_valid_table_name, SchemaVersion, SubjectConfig};
use crate::validate::Violation;

/// A global schema id, as carried by the Confluent wire format.
pub type SchemaId = u32;

/// One version of a subject.
#[derive(Debug, Clone)]
pub struct Version {
    /// The version number (`v3.avsc` is 3).
    pub version: SchemaVersion,
    /// The global id: derived from the schema text, so it is the same on
    /// every hub and every restart.
    pub id: SchemaId,
    /// The file it came from.
    pub path: PathBuf,
    /// The parsed Avro schema.
    pub avro: Schema,
    /// The schema text as written (normalised JSON).
    pub text: String,
    /// The compiled payload type (a record).
    pub node: Node,
    /// Its protection policy.
    pub protect: ProtectPlan,
}

/// A subject: one event type, one lake table, many versions.
#[derive(Debug, Clone)]
pub struct SubjectEntry {
    /// The subject name (its directory).
    pub name: String,
    /// Its `subject.toml`.
    pub config: SubjectConfig,
    /// The lake table.
    pub table: String,
    /// Versions in ascending order; the last is the latest.
    pub versions: Vec<Version>,
}

impl SubjectEntry {
    /// The latest version.
    #[must_use]
    pub fn latest(&self) -> &Version {
        self.versions.last().expect("a loaded subject has at least one version")
    }

    /// A version by number.
    #[must_use]
    pub fn version(&self, v: SchemaVersion) -> Option<&Version> {
        self.versions.iter().find(|x| x.version == v)
    }

    /// The version whose schema is `text` (the same JSON,
    /// whatever its spacing and key order), if any.
    #[must_use]
    pub fn find(&self, text: &str) -> Option<&Version> {
        let want: serde_json::Value = serde_json::from_str(text).ok()?;
        self.versions
            .iter()
            .rev()
            .find(|v| serde_json::from_str::<serde_json::Value>(&v.text).is_ok_and(|have| have == want))
    }

    /// Check schema text `text` as this subject's next version would be
    /// checked when the hub starts with it: the schema rules of `schema
    /// check`, then compatibility under the subject's mode, against
    /// `against` alone (in the mode's directions) or, when `None`, against
    /// the versions the mode names. Returns the incompatibilities (none:
    /// compatible).
    ///
    /// # Errors
    /// What is wrong with the schema itself, when it is not one the hub
    /// could load.
    pub fn check_candidate(
        &self,
        text: &str,
        against: Option<&Version>,
    ) -> std::result::Result<Vec<String>, Vec<String>> {
        let next = self.latest().version + 1;
        let path = PathBuf::from(format!("{}/v{next}.avsc", self.name));
        let mut invalid = Vec::new();
        let Some(new) = compile_version(next, &path, text, &mut invalid) else {
            return Err(invalid);
        };
        let mode = self.config.compatibility;
        let earlier: &[Version] = match against {
            Some(v) => std::slice::from_ref(v),
            None => &self.versions,
        };
        let schemas: Vec<&Schema> = earlier.iter().map(|v| &v.avro).collect();
        // One version: checked in the mode's directions, as the last one.
        let found = compat::check_evolution(mode, &new.avro, &schemas);
        let mut problems = Vec::new();
        incompatibilities(mode, &new, earlier, &found, &mut problems);
        Ok(problems)
    }
}

/// A loaded, checked schema directory.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    subjects: Vec<SubjectEntry>,
    /// source → detail type → subject index (looked up without allocating).
    /// Looked up per event: keyed with ahash, not SipHash.
    by_source: HashMap<String, HashMap<String, usize, ahash::RandomState>, ahash::RandomState>,
    by_id: HashMap<SchemaId, (usize, usize)>,
}

impl Registry {
    /// Load and check every subject under `dir`.
    ///
    /// # Errors
    /// [`Error::Dir`] when the directory cannot be read, [`Error::Io`]
    /// for a file in it, and [`Error::Invalid`] listing every problem found (bad TOML, bad Avro,
    /// unsupported types, bad attributes, incompatible evolutions, routing
    /// and id clashes), each prefixed with its file.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut problems = Vec::new();
        let mut subjects = Vec::new();
        let mut entries: Vec<PathBuf> = read_dir(dir)
            .map_err(|e| match e {
                Error::Io { path, source } => Error::Dir { path, source },
                e => e,
            })?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for sdir in entries {
            if let Some(s) = load_subject(&sdir, &mut problems)? {
                subjects.push(s);
            }
        }
        if subjects.is_empty() && problems.is_empty() {
            problems.push(format!(
                "{}: no subjects (expected <subject>/subject.toml and v1.avsc)",
                dir.display()
            ));
        }
        let mut reg = Registry { subjects, ..Registry::default() };
        reg.index(&mut problems);
        if problems.is_empty() {
            Ok(reg)
        } else {
            Err(Error::Invalid { problems })
        }
    }

    fn index(&mut self, problems: &mut Vec<String>) {
        let mut tables: HashMap<&str, &str> = HashMap::new();
        for (si, s) in self.subjects.iter().enumerate() {
            let (source, dt) = (&s.config.source, &s.config.detail_type);
            let types = self.by_source.entry(source.clone()).or_default();
            if let Some(&other) = types.get(dt) {
                problems.push(format!(
                    "{}: source {source:?} and detail_type {dt:?} already route to subject {}",
                    s.name, self.subjects[other].name
                ));
            } else {
                types.insert(dt.clone(), si);
            }
            if let Some(other) = tables.insert(&s.table, &s.name) {
                problems.push(format!("{}: table {:?} is already used by subject {other}", s.name, s.table));
            }
            for (vi, v) in s.versions.iter().enumerate() {
                match self.by_id.get(&v.id) {
                    Some(&(os, ov)) if self.subjects[os].versions[ov].text != v.text => {
                        problems.push(format!(
                            "{}: schema id {} clashes with {}; change the schema's doc to resolve",
                            v.path.display(),
                            v.id,
                            self.subjects[os].versions[ov].path.display()
                        ))
                    }
                    Some(_) => {}
                    None => {
                        self.by_id.insert(v.id, (si, vi));
                    }
                }
            }
        }
    }

    /// Every subject, sorted by name.
    #[must_use]
    pub fn subjects(&self) -> &[SubjectEntry] {
        &self.subjects
    }

    /// A subject by name.
    #[must_use]
    pub fn subject(&self, name: &str) -> Option<&SubjectEntry> {
        self.subjects.iter().find(|s| s.name == name)
    }

    /// Resolve an event's route to its subject and schema version (the
    /// latest unless `version` names one).
    ///
    /// # Errors
    /// `unknown_subject` when no subject has this route, `unknown_version`
    /// when the subject lacks the version.
    pub fn resolve(
        &self,
        source: &str,
        detail_type: &str,
        version: Option<SchemaVersion>,
    ) -> Result<(&SubjectEntry, &Version), Violation> {
        let Some(si) = self.route(source, detail_type) else {
            return Err(Violation::new(
                Reason::UnknownSubject,
                format!("no subject for source {source:?} and detail-type {detail_type:?}"),
            ));
        };
        self.resolve_index(si, version)
    }

    /// The subject index for a route (use with [`Registry::resolve_index`]).
    #[must_use]
    pub fn route(&self, source: &str, detail_type: &str) -> Option<usize> {
        self.by_source.get(source)?.get(detail_type).copied()
    }

    /// Resolve a subject by index (from [`Registry::route`]).
    ///
    /// # Errors
    /// `unknown_version` when the subject lacks the version.
    pub fn resolve_index(
        &self,
        subject: usize,
        version: Option<SchemaVersion>,
    ) -> Result<(&SubjectEntry, &Version), Violation> {
        let s = &self.subjects[subject];
        match version {
            None => Ok((s, s.latest())),
            Some(v) => s.version(v).map(|x| (s, x)).ok_or_else(|| {
                Violation::new(
                    Reason::UnknownVersion,
                    format!("subject {} has no version {v} (latest is {})", s.name, s.latest().version),
                )
            }),
        }
    }

    /// A schema by global id.
    #[must_use]
    pub fn by_id(&self, id: SchemaId) -> Option<(&SubjectEntry, &Version)> {
        self.by_id.get(&id).map(|&(s, v)| (&self.subjects[s], &self.subjects[s].versions[v]))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io { path: dir.to_owned(), source };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        out.push(e.map_err(io)?.path());
    }
    Ok(out)
}

fn load_subject(sdir: &Path, problems: &mut Vec<String>) -> Result<Option<SubjectEntry>> {
    let name = sdir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let toml_path = sdir.join("subject.toml");
    let text = match std::fs::read_to_string(&toml_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problems.push(format!("{}: missing subject.toml (needs source and detail_type)", sdir.display()));
            return Ok(None);
        }
        Err(source) => return Err(Error::Io { path: toml_path, source }),
    };
    let config: SubjectConfig = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("{}: {}", toml_path.display(), e.message()));
            return Ok(None);
        }
    };
    let table = config.table.clone().unwrap_or_else(|| default_table_name(&name));
    if !is_valid_table_name(&table) {
        problems.push(format!(
            "{}: table {table:?} must be 1-128 characters of [a-z0-9_], not starting with '_'",
            toml_path.display()
        ));
    }
    let mut files: BTreeMap<SchemaVersion, PathBuf> = BTreeMap::new();
    for p in read_dir(sdir)? {
        let fname = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if fname == "subject.toml" {
            continue;
        }
        match fname.strip_prefix('v').and_then(|r| r.strip_suffix(".avsc")).map(str::parse::<u32>) {
            Some(Ok(v)) if v > 0 => {
                files.insert(v, p);
            }
            _ => problems
                .push(format!("{}: unexpected file; versions are named v1.avsc, v2.avsc, ...", p.display())),
        }
    }
    if files.is_empty() {
        problems.push(format!("{}: no versions (expected v1.avsc)", sdir.display()));
        return Ok(None);
    }
    let mut versions: Vec<Version> = Vec::new();
    for (expected, (&v, path)) in (1u32..).zip(&files) {
        if v != expected {
            problems
                .push(format!("{}: versions must be consecutive; expected v{expected}.avsc", path.display()));
        }
        if let Some(version) = load_version(v, path, problems)? {
            check_evolution(&config, &version, &versions, problems);
            versions.push(version);
        }
    }
    if versions.is_empty() {
        return Ok(None);
    }
    Ok(Some(SubjectEntry { name, config, table, versions }))
}

fn load_version(v: SchemaVersion, path: &Path, problems: &mut Vec<String>) -> Result<Option<Version>> {
    let raw = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    Ok(compile_version(v, path, &raw, problems))
}

/// Compile schema text `raw` as version `v` (from `path`, which prefixes
/// every problem), or add what is wrong with it to `problems`.
fn compile_version(v: SchemaVersion, path: &Path, raw: &str, problems: &mut Vec<String>) -> Option<Version> {
    let json: serde_json::Value = match serde_json::from_str(raw) {
        Ok(j) => j,
        Err(e) => {
            problems.push(format!("{}: not JSON: {e}", path.display()));
            return None;
        }
    };
    // apache-avro panics on some names it cannot parse (a record named
    // "user-login"): they are refused here first, naming where they are.
    let mut names = Vec::new();
    bad_names(&json, "$", &mut names);
    if !names.is_empty() {
        problems.extend(names.into_iter().map(|p| format!("{}: {p}", path.display())));
        return None;
    }
    let parsed = match std::panic::catch_unwind(|| Schema::parse(&json)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => {
            Err(format!("the Avro parser gave up on it ({})", watershed_event::panic_message(&*panic)))
        }
    };
    let avro = match parsed {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("{}: not a valid Avro schema: {e}", path.display()));
            return None;
        }
    };
    let mut local = Vec::new();
    let node = compile(&avro, &mut local);
    if !matches!(node.kind, Kind::Record(_)) || node.nullable {
        local.push("the payload schema must be a record".into());
    }
    let protect = plan(&node, &mut local);
    let failed = !local.is_empty();
    problems.extend(local.into_iter().map(|p| format!("{}: {p}", path.display())));
    if failed {
        return None;
    }
    let text = json.to_string();
    let digest = Sha256::digest(text.as_bytes());
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff;
    Some(Version { version: v, id: id.max(1), path: path.to_owned(), avro, text, node, protect })
}

/// Whether `name` is an Avro name, or a full name (names joined by dots).
fn is_avro_fullname(name: &str) -> bool {
    name.split('.').all(|part| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
    })
}

/// The names in schema JSON `v` (at JSON path `path`) that are not Avro
/// names: of named types and fields, their aliases, and references to
/// named types. Other attributes are left alone (a schema may carry any).
fn bad_names(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];
    fn check(what: &str, at: &str, name: &Value, out: &mut Vec<String>) {
        if let Some(n) = name.as_str() {
            if !is_avro_fullname(n) {
                out.push(format!(
                    "{at}: {what} {n:?} is not an Avro name (letters, digits and _, not starting with a digit; \
                     dots only between the parts of a full name)"
                ));
            }
        }
    }
    match v {
        Value::String(t) if !PRIMITIVES.contains(&t.as_str()) => check("the type", path, v, out),
        Value::Array(branches) => {
            for (i, b) in branches.iter().enumerate() {
                bad_names(b, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(o) => {
            let ty = o.get("type");
            let named = matches!(ty.and_then(Value::as_str), Some("record" | "error" | "enum" | "fixed"));
            if named {
                if let Some(n) = o.get("name") {
                    check("the name", &format!("{path}.name"), n, out);
                }
            }
            if named || o.contains_key("fields") {
                for (i, a) in o.get("aliases").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    check("the alias", &format!("{path}.aliases[{i}]"), a, out);
                }
            }
            match ty {
                Some(Value::String(t)) if matches!(t.as_str(), "record" | "error") => {
                    let fields = o.get("fields").and_then(Value::as_array);
                    for (i, f) in fields.into_iter().flatten().enumerate() {
                        let at = format!("{path}.fields[{i}]");
                        if let Some(n) = f.get("name") {
                            check("the field name", &format!("{at}.name"), n, out);
                        }
                        for (j, a) in
                            f.get("aliases").and_then(Value::as_array).into_iter().flatten().enumerate()
                        {
                            check("the alias", &format!("{at}.aliases[{j}]"), a, out);
                        }
                        if let Some(t) = f.get("type") {
                            bad_names(t, &format!("{at}.type"), out);
                        }
                    }
                }
                Some(Value::String(t)) if t == "array" => {
                    if let Some(items) = o.get("items") {
                        bad_names(items, &format!("{path}.items"), out);
                    }
                }
                Some(Value::String(t)) if t == "map" => {
                    if let Some(values) = o.get("values") {
                        bad_names(values, &format!("{path}.values"), out);
                    }
                }
                Some(Value::String(t)) if matches!(t.as_str(), "enum" | "fixed") => {}
                Some(t) => bad_names(t, &format!("{path}.type"), out),
                None => {}
            }
        }
        _ => {}
    }
}

fn check_evolution(config: &SubjectConfig, new: &Version, earlier: &[Version], problems: &mut Vec<String>) {
    let mode = config.compatibility;
    let schemas: Vec<&Schema> = earlier.iter().map(|v| &v.avro).collect();
    incompatibilities(mode, new, earlier, &compat::check_evolution(mode, &new.avro, &schemas), problems);
}

/// Add `found` (incompatibilities of `new` with versions in `earlier`, by
/// index) and the protected fields `new` would leave unprotected for
/// `earlier`'s events to `problems`.
fn incompatibilities(
    mode: crate::Compatibility,
    new: &Version,
    earlier: &[Version],
    found: &[(usize, compat::Incompatibility)],
    problems: &mut Vec<String>,
) {
    for (i, inc) in found {
        let i = *i;
        problems.push(format!(
            "{}: {inc}: not {mode}-compatible with v{}",
            new.path.display(),
            earlier[i].version
        ));
    }
    for old in earlier {
        let mut fields = Vec::new();
        crate::node::unprotected_defaults(&new.node, &old.node, "", &mut fields);
        for f in fields {
            problems.push(format!(
                "{}: field \"{f}\" holds protected values and has a non-null default, but v{} has no such \
                 field: v{}'s events would be written with the default unprotected; give it a null default \
                 (type [\"null\", ...], \"default\": null)",
                new.path.display(),
                old.version,
                old.version
            ));
        }
    }
}
