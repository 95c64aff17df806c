//! Every refusal names where the problem is: the JSONPath a violation
//! carries, read by an independent RFC 9535 implementation
//! (`serde_json_path`), selects exactly the offending value (or, for an
//! unknown field, the offending key's member) in the refused payload.
//!
//! Random payload schemas and valid events of them (`support`), then one
//! fault put at a random place: a value of the wrong type or shape there,
//! or an unknown field in a record, under map keys and field names with
//! quotes, backslashes, dots, brackets, spaces, control characters and
//! non-ASCII text.

mod support;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value as Json};
use serde_json_path::{JsonPath, PathElement};
use support::{avro_json, random_record, registry, Gen, Ty};
use watershed_schema::{validate_json, Limits, Tape, UnknownFields};

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Name(String),
    Index(usize),
}

/// Where a fault can go.
enum Spot {
    /// A value, of this type.
    Value(Ty),
    /// A record's object, which an unknown field can join.
    Record,
}

/// Every place in `json` (a value of `ty`), with the steps to it.
fn spots(ty: &Ty, json: &Json, at: &[Step], out: &mut Vec<(Vec<Step>, Spot)>) {
    if json.is_null() {
        return;
    }
    out.push((at.to_vec(), Spot::Value(ty.clone())));
    let step = |s: Step| {
        let mut v = at.to_vec();
        v.push(s);
        v
    };
    match (ty, json) {
        (Ty::Array(item), Json::Array(items)) => {
            for (i, v) in items.iter().enumerate() {
                spots(item, v, &step(Step::Index(i)), out);
            }
        }
        (Ty::Map(value), Json::Object(entries)) => {
            for (k, v) in entries {
                spots(value, v, &step(Step::Name(k.clone())), out);
            }
        }
        (Ty::Record(_, fields), Json::Object(entries)) => {
            out.push((at.to_vec(), Spot::Record));
            for f in fields {
                if let Some(v) = entries.get(&f.name) {
                    spots(&f.ty, v, &step(Step::Name(f.name.clone())), out);
                }
            }
        }
        _ => {}
    }
}

/// A value `ty` refuses (never null: nullable fields take that).
fn wrong(ty: &Ty) -> Json {
    match ty {
        Ty::Uuid => json!("not-a-uuid"),
        Ty::Bool | Ty::Str | Ty::Fixed(..) | Ty::Array(_) | Ty::Map(_) | Ty::Record(..) => json!(1),
        Ty::Int => json!(1_i64 << 40),
        Ty::Bytes => json!("not base64!"),
        Ty::Decimal(..) => json!(true),
        Ty::Enum(..) => json!("NO_SUCH_SYMBOL"),
        Ty::Long
        | Ty::Float
        | Ty::Double
        | Ty::Date
        | Ty::TimeMillis
        | Ty::TimeMicros
        | Ty::TsMillis
        | Ty::TsMicros => json!("x"),
    }
}

fn at_mut<'j>(json: &'j mut Json, steps: &[Step]) -> &'j mut Json {
    steps.iter().fold(json, |j, s| match s {
        Step::Name(k) => &mut j[k.as_str()],
        Step::Index(i) => &mut j[*i],
    })
}

/// Keys of unknown fields: none is an Avro name, and each needs care in
/// a path.
const ODD_KEYS: [&str; 9] = ["a.b", "x'y", "sp ace", "1st", "]", "back\\slash", "new\nline", "é", "$"];

fn case(seed: u64) {
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(seed), names: 0, decimals: true };
    let ty = random_record(&mut g);
    let (mut event, _) = g.value(&ty);
    let schema = avro_json(&ty, false).to_string();
    let reg = registry(&[&schema], &format!("schema {schema}"));
    let node = &reg.subjects()[0].versions[0].node;
    let validate = |j: &Json| {
        let mut tape = Tape::new();
        validate_json(node, j.to_string().as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape)
    };
    validate(&event)
        .unwrap_or_else(|e| panic!("a valid event refused: {e}\nseed {seed}\nschema {schema}\n{event}"));

    let mut places = Vec::new();
    spots(&ty, &event, &[], &mut places);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let (mut steps, spot) = places.swap_remove(rng.gen_range(0..places.len()));
    match spot {
        Spot::Value(t) => *at_mut(&mut event, &steps) = wrong(&t),
        Spot::Record => {
            let key = ODD_KEYS[rng.gen_range(0..ODD_KEYS.len())];
            at_mut(&mut event, &steps)[key] = json!(rng.gen_range(0..9));
            steps.push(Step::Name(key.to_owned()));
        }
    }
    let say = format!("seed {seed}\nschema {schema}\nevent {event}\nfault at {steps:?}");
    let v = validate(&event).expect_err(&format!("a fault was accepted\n{say}"));
    let path = JsonPath::parse(&v.path).unwrap_or_else(|e| panic!("{v}: not RFC 9535: {e}\n{say}"));
    let found = path
        .query_located(&event)
        .exactly_one()
        .unwrap_or_else(|e| panic!("{v}: does not select one node: {e}\n{say}"));
    let location: Vec<Step> = found
        .location()
        .iter()
        .map(|e| match e {
            PathElement::Name(n) => Step::Name((*n).to_owned()),
            PathElement::Index(i) => Step::Index(*i),
        })
        .collect();
    assert_eq!(location, steps, "{v}\n{say}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_refusal_points_at_the_offending_value(seed in any::<u64>()) {
        case(seed);
    }
}
