//! Avro schema-resolution compatibility, reporting every incompatibility.
//!
//! [`check`] asks whether a *reader* schema can read data written with a
//! *writer* schema under the rules of the Avro specification: matching
//! record names (or aliases), fields matched by name or alias with defaults
//! for the ones the writer lacks, the promotions int→long→float→double and
//! string↔bytes, enum symbols (unless the reader has a default symbol),
//! union branches, fixed sizes, and identical logical types. Unlike a
//! first-error check it walks the whole tree, so a user sees every problem
//! in one run.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};

use crate::node::{collect_names, resolve};

/// Which way an evolution is being checked, for phrasing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The new schema reads old data (reader = new, writer = old).
    Backward,
    /// The old schema reads new data (reader = old, writer = new).
    Forward,
}

/// One reason a reader cannot read a writer's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    /// Dotted field path, such as `customer.address.zip`; empty for the root.
    pub path: String,
    /// What changed, phrased from old to new.
    pub message: String,
}

impl std::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field \"{}\" {}", self.path, self.message)
        }
    }
}

/// Every incompatibility that stops `reader` from reading `writer` data.
/// An empty list means compatible.
#[must_use]
pub fn check(reader: &Schema, writer: &Schema, direction: Direction) -> Vec<Incompatibility> {
    let mut rn = HashMap::new();
    collect_names(reader, None, &mut rn);
    let mut wn = HashMap::new();
    collect_names(writer, None, &mut wn);
    let mut c = Checker { rn, wn, direction, out: Vec::new(), seen: Vec::new() };
    c.schema(reader, writer, "");
    c.out
}

/// Check `new` against `earlier` versions (oldest first) under `mode`:
/// the previous version only, or all of them for transitive modes. Returns
/// each problem with the index in `earlier` of the version it is against.
#[must_use]
pub fn check_evolution(
    mode: crate::Compatibility,
    new: &Schema,
    earlier: &[&Schema],
) -> Vec<(usize, Incompatibility)> {
    let first = if mode.is_transitive() { 0 } else { earlier.len().saturating_sub(1) };
    let mut out = Vec::new();
    for (i, old) in earlier.iter().enumerate().skip(first).rev() {
        let mut found = Vec::new();
        if mode.checks_backward() {
            found.extend(check(new, old, Direction::Backward));
        }
        if mode.checks_forward() {
            for inc in check(old, new, Direction::Forward) {
                if !found.contains(&inc) {
                    found.push(inc);
                }
            }
        }
        out.extend(found.into_iter().map(|inc| (i, inc)));
    }
    out
}

struct Checker<'a> {
    rn: HashMap<String, &'a Schema>,
    wn: HashMap<String, &'a Schema>,
    direction: Direction,
    out: Vec<Incompatibility>,
    /// (reader name, writer name) pairs under check, to stop on recursion.
    seen: Vec<(String, String)>,
}

fn type_name(s: &Schema) -> String {
    match s {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int => "int".into(),
        Schema::Long => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes => "bytes".into(),
        Schema::String => "string".into(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(u) => {
            format!("union[{}]", u.variants().iter().map(type_name).collect::<Vec<_>>().join(","))
        }
        Schema::Record(r) => format!("record {}", r.name.name),
        Schema::Enum(e) => format!("enum {}", e.name.name),
        Schema::Fixed(f) => format!("fixed {}({})", f.name.name, f.size),
        Schema::Decimal(d) => format!("decimal({},{})", d.precision, d.scale),
        Schema::BigDecimal => "big-decimal".into(),
        Schema::Uuid => "uuid".into(),
        Schema::Date => "date".into(),
        Schema::TimeMillis => "time-millis".into(),
        Schema::TimeMicros => "time-micros".into(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        Schema::TimestampNanos => "timestamp-nanos".into(),
        Schema::LocalTimestampMillis => "local-timestamp-millis".into(),
        Schema::LocalTimestampMicros => "local-timestamp-micros".into(),
        Schema::LocalTimestampNanos => "local-timestamp-nanos".into(),
        Schema::Duration => "duration".into(),
        Schema::Ref { name } => name.name.clone(),
    }
}

/// Whether a reader record/enum/fixed named `rname` with `raliases` matches
/// a writer named `wname` (unqualified names, or a reader alias).
fn names_match(rname: &Name, raliases: Option<&Vec<apache_avro::schema::Alias>>, wname: &Name) -> bool {
    rname.name == wname.name
        || raliases
            .into_iter()
            .flatten()
            .any(|a| a.name() == wname.name || a.fullname(None) == wname.fullname(None))
}

impl<'a> Checker<'a> {
    fn push(&mut self, path: &str, message: String) {
        self.out.push(Incompatibility { path: path.to_owned(), message });
    }

    /// `old→new` spelling of a reader/writer pair.
    fn changed(&self, reader: &str, writer: &str) -> String {
        match self.direction {
            Direction::Backward => format!("changed {writer}→{reader}"),
            Direction::Forward => format!("changed {reader}→{writer}"),
        }
    }

    fn schema(&mut self, reader: &'a Schema, writer: &'a Schema, path: &str) {
        let r = resolve(reader, &self.rn);
        let w = resolve(writer, &self.wn);
        match (r, w) {
            // Writer union: every branch the writer may use must be readable.
            (_, Schema::Union(wu)) => {
                if let Schema::Union(ru) = r {
                    for wb in wu.variants() {
                        if !ru.variants().iter().any(|rb| self.readable(rb, wb)) {
                            let msg = match self.direction {
                                Direction::Backward => {
                                    format!("union branch {} removed", type_name(wb))
                                }
                                Direction::Forward => format!(
                                    "union branch {} added, which the old schema cannot read",
                                    type_name(wb)
                                ),
                            };
                            self.push(path, msg);
                        }
                    }
                    // Report nested problems of the best-matching branches.
                    for wb in wu.variants() {
                        if let Some(rb) =
                            ru.variants().iter().find(|rb| same_shape(rb, wb, &self.rn, &self.wn))
                        {
                            self.schema(rb, wb, path);
                        }
                    }
                } else {
                    let bad: Vec<_> = wu.variants().iter().filter(|wb| !self.readable(r, wb)).collect();
                    if !bad.is_empty() {
                        let what = bad.iter().map(|b| type_name(b)).collect::<Vec<_>>().join(", ");
                        let msg = match self.direction {
                            Direction::Backward => format!(
                                "changed {}→{}: old values of type {what} cannot be read",
                                type_name(w),
                                type_name(r)
                            ),
                            Direction::Forward => format!(
                                "changed {}→{}: new values of type {what} cannot be read by the old schema",
                                type_name(r),
                                type_name(w)
                            ),
                        };
                        self.push(path, msg);
                    } else if let Some(wb) =
                        wu.variants().iter().find(|wb| same_shape(r, wb, &self.rn, &self.wn))
                    {
                        self.schema(r, wb, path);
                    }
                }
            }
            // Reader union, writer not: some branch must read it.
            (Schema::Union(ru), _) => {
                if let Some(rb) = ru.variants().iter().find(|rb| same_shape(rb, w, &self.rn, &self.wn)) {
                    self.schema(rb, w, path);
                } else if !ru.variants().iter().any(|rb| self.readable(rb, w)) {
                    let msg = self.changed(&type_name(r), &type_name(w));
                    self.push(path, msg);
                }
            }
            (Schema::Record(rr), Schema::Record(wr)) => {
                if !names_match(&rr.name, rr.aliases.as_ref(), &wr.name) {
                    let msg = format!(
                        "{}: record name differs (add an alias to the reader)",
                        self.changed(&rr.name.fullname(None), &wr.name.fullname(None))
                    );
                    self.push(path, msg);
                    return;
                }
                let key = (rr.name.fullname(None), wr.name.fullname(None));
                if self.seen.contains(&key) {
                    return;
                }
                self.seen.push(key);
                for rf in &rr.fields {
                    let fpath = if path.is_empty() { rf.name.clone() } else { format!("{path}.{}", rf.name) };
                    let wf = wr.fields.iter().find(|wf| wf.name == rf.name).or_else(|| {
                        rf.aliases.iter().flatten().find_map(|a| wr.fields.iter().find(|wf| &wf.name == a))
                    });
                    match wf {
                        Some(wf) => self.schema(&rf.schema, &wf.schema, &fpath),
                        None if rf.default.is_some() => {}
                        None => {
                            let msg = match self.direction {
                                Direction::Backward => {
                                    "added without a default: old data has no value for it".to_owned()
                                }
                                Direction::Forward => {
                                    "removed, and the old schema has no default for it".to_owned()
                                }
                            };
                            self.push(&fpath, msg);
                        }
                    }
                }
                self.seen.pop();
            }
            (Schema::Enum(re), Schema::Enum(we)) => {
                if !names_match(&re.name, re.aliases.as_ref(), &we.name) {
                    let msg = format!(
                        "{}: enum name differs (add an alias to the reader)",
                        self.changed(&re.name.fullname(None), &we.name.fullname(None))
                    );
                    self.push(path, msg);
                    return;
                }
                if re.default.is_none() {
                    for s in we.symbols.iter().filter(|s| !re.symbols.contains(s)) {
                        let msg = match self.direction {
                            Direction::Backward => {
                                format!("enum symbol \"{s}\" removed, and the new enum has no default symbol")
                            }
                            Direction::Forward => format!(
                                "enum symbol \"{s}\" added, and the old enum has no default symbol to read it as"
                            ),
                        };
                        self.push(path, msg);
                    }
                }
            }
            (Schema::Fixed(rf), Schema::Fixed(wf)) => {
                if !names_match(&rf.name, rf.aliases.as_ref(), &wf.name) || rf.size != wf.size {
                    let msg = self.changed(&type_name(r), &type_name(w));
                    self.push(path, msg);
                }
            }
            (Schema::Array(ra), Schema::Array(wa)) => {
                self.schema(&ra.items, &wa.items, &format!("{path}[]"));
            }
            (Schema::Map(rm), Schema::Map(wm)) => {
                self.schema(&rm.types, &wm.types, &format!("{path}{{}}"));
            }
            (Schema::Decimal(rd), Schema::Decimal(wd)) => {
                if rd.precision != wd.precision || rd.scale != wd.scale {
                    let msg = self.changed(&type_name(r), &type_name(w));
                    self.push(path, msg);
                }
            }
            _ => {
                if !primitive_readable(r, w) {
                    let msg = self.changed(&type_name(r), &type_name(w));
                    self.push(path, msg);
                }
            }
        }
    }

    /// Whether `reader` can read `writer` at all (used to pick union branches).
    fn readable(&self, reader: &'a Schema, writer: &'a Schema) -> bool {
        let mut sub = Checker {
            rn: self.rn.clone(),
            wn: self.wn.clone(),
            direction: self.direction,
            out: Vec::new(),
            seen: self.seen.clone(),
        };
        sub.schema(reader, writer, "");
        sub.out.is_empty()
    }
}

/// Whether two schemas are the same kind of thing (for pairing union
/// branches before reporting nested problems).
fn same_shape(r: &Schema, w: &Schema, rn: &HashMap<String, &Schema>, wn: &HashMap<String, &Schema>) -> bool {
    let r = resolve(r, rn);
    let w = resolve(w, wn);
    match (r, w) {
        (Schema::Record(a), Schema::Record(b)) => names_match(&a.name, a.aliases.as_ref(), &b.name),
        (Schema::Enum(a), Schema::Enum(b)) => names_match(&a.name, a.aliases.as_ref(), &b.name),
        (Schema::Fixed(a), Schema::Fixed(b)) => names_match(&a.name, a.aliases.as_ref(), &b.name),
        (Schema::Array(_), Schema::Array(_)) | (Schema::Map(_), Schema::Map(_)) => true,
        _ => false,
    }
}

/// Primitive and logical-type resolution, with the spec's promotions.
fn primitive_readable(r: &Schema, w: &Schema) -> bool {
    use Schema as S;
    matches!(
        (w, r),
        (S::Null, S::Null)
            | (S::Boolean, S::Boolean)
            | (S::Int, S::Int | S::Long | S::Float | S::Double)
            | (S::Long, S::Long | S::Float | S::Double)
            | (S::Float, S::Float | S::Double)
            | (S::Double, S::Double)
            | (S::String | S::Uuid, S::String | S::Bytes | S::Uuid)
            | (S::Bytes, S::Bytes | S::String)
            | (S::Date, S::Date)
            | (S::TimeMillis, S::TimeMillis)
            | (S::TimeMicros, S::TimeMicros)
            | (S::TimestampMillis, S::TimestampMillis)
            | (S::TimestampMicros, S::TimestampMicros)
            | (S::TimestampNanos, S::TimestampNanos)
            | (S::LocalTimestampMillis, S::LocalTimestampMillis)
            | (S::LocalTimestampMicros, S::LocalTimestampMicros)
            | (S::LocalTimestampNanos, S::LocalTimestampNanos)
            | (S::Duration, S::Duration)
            | (S::BigDecimal, S::BigDecimal)
    )
}
