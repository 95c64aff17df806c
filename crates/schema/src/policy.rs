//! The protection policy of one schema version, derived from its field
//! attributes: which field paths get which action, and where the data
//! subject is. The protect crate applies it to a [`crate::Tape`].

use crate::node::{Kind, Node, Protect};

/// A path from the root record to a field, as field indices through
/// records. Arrays and maps on the way are crossed implicitly: an action
/// under an array applies to every item.
pub type FieldPath = Vec<usize>;

/// One protected field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldAction {
    /// Where the field is.
    pub path: FieldPath,
    /// The dotted name, for messages and docs (`card.number`).
    pub name: String,
    /// What to do with it.
    pub action: Protect,
}

/// Every protected field of a schema, plus its data-subject field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProtectPlan {
    /// Protected fields, in schema order.
    pub actions: Vec<FieldAction>,
    /// The field naming the data subject, if the schema marks one. It is
    /// never under an array or map, so each event has at most one subject.
    pub data_subject: Option<(FieldPath, String)>,
}

impl ProtectPlan {
    /// Whether any field needs a key (tokenize or encrypt).
    #[must_use]
    pub fn needs_keys(&self) -> bool {
        self.actions.iter().any(|a| matches!(a.action, Protect::Tokenize | Protect::Encrypt))
    }
}

/// Derive the plan, pushing a message for each problem (more than one
/// data subject, or one under an array or map).
pub(crate) fn plan(root: &Node, problems: &mut Vec<String>) -> ProtectPlan {
    let mut plan = ProtectPlan::default();
    walk(root, &mut Vec::new(), "", false, &mut plan, problems);
    plan
}

fn walk(
    node: &Node,
    path: &mut FieldPath,
    name: &str,
    repeated: bool,
    plan: &mut ProtectPlan,
    problems: &mut Vec<String>,
) {
    match &node.kind {
        Kind::Record(r) => {
            for (i, f) in r.fields.iter().enumerate() {
                path.push(i);
                let fname = if name.is_empty() { f.name.clone() } else { format!("{name}.{}", f.name) };
                if let Some(action) = f.protect {
                    plan.actions.push(FieldAction { path: path.clone(), name: fname.clone(), action });
                }
                if f.data_subject {
                    if repeated {
                        problems.push(format!(
                            "field \"{fname}\": the data subject cannot be inside an array or map (an event has one subject)"
                        ));
                    } else if let Some((_, other)) = &plan.data_subject {
                        problems.push(format!(
                            "field \"{fname}\": a second data subject (\"{other}\" is already one); mark exactly one field"
                        ));
                    } else {
                        plan.data_subject = Some((path.clone(), fname.clone()));
                    }
                }
                // A redacted subtree is gone: nothing below it matters.
                if f.protect != Some(Protect::Redact) {
                    walk(&f.node, path, &fname, repeated, plan, problems);
                }
                path.pop();
            }
        }
        Kind::Array(item) => walk(item, path, &format!("{name}[]"), true, plan, problems),
        Kind::Map(value) => walk(value, path, &format!("{name}{{}}"), true, plan, problems),
        _ => {}
    }
}
