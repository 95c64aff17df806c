//! The compatibility table: evolution cases, each with its expected verdict
//! under each of the seven modes. Two-version cases give (backward,
//! forward) and the seven verdicts follow from them; three-version chains
//! spell out all seven because transitive modes differ there.

use apache_avro::Schema;
use watershed_schema::compat::check_evolution;
use watershed_schema::Compatibility::{self, *};

fn rec(fields: &str) -> String {
    format!(r#"{{"type":"record","name":"R","namespace":"t","fields":[{fields}]}}"#)
}

fn f(name: &str, ty: &str) -> String {
    format!(r#"{{"name":"{name}","type":{ty}}}"#)
}

fn fd(name: &str, ty: &str, default: &str) -> String {
    format!(r#"{{"name":"{name}","type":{ty},"default":{default}}}"#)
}

fn one(name: &str, ty: &str) -> String {
    rec(&f(name, ty))
}

fn nested(inner_fields: &str) -> String {
    rec(&f("n", &format!(r#"{{"type":"record","name":"N","fields":[{inner_fields}]}}"#)))
}

fn en(name: &str, symbols: &str, extra: &str) -> String {
    one("e", &format!(r#"{{"type":"enum","name":"{name}","symbols":[{symbols}]{extra}}}"#))
}

fn parse(s: &str) -> Schema {
    Schema::parse_str(s).unwrap_or_else(|e| panic!("test schema does not parse: {e}\n{s}"))
}

/// All modes pass or fail over a version chain.
fn verdict(mode: Compatibility, chain: &[Schema]) -> bool {
    (1..chain.len()).all(|i| {
        let earlier: Vec<&Schema> = chain[..i].iter().collect();
        check_evolution(mode, &chain[i], &earlier).is_empty()
    })
}

fn two(bw: bool, fw: bool) -> [bool; 7] {
    [true, bw, bw, fw, fw, bw && fw, bw && fw]
}

const MODES: [Compatibility; 7] =
    [None, Backward, BackwardTransitive, Forward, ForwardTransitive, Full, FullTransitive];

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<(&'static str, Vec<String>, [bool; 7])> {
    let int = r#""int""#;
    let long = r#""long""#;
    let string = r#""string""#;
    let r = |a: &str| one("a", a);
    vec![
        ("identical", vec![r(int), r(int)], two(true, true)),
        ("add field with default", vec![r(int), rec(&[f("a", int), fd("b", string, r#""x""#)].join(","))], two(true, true)),
        ("add field without default", vec![r(int), rec(&[f("a", int), f("b", string)].join(","))], two(false, true)),
        ("remove field that had a default", vec![rec(&[f("a", int), fd("b", string, r#""x""#)].join(",")), r(int)], two(true, true)),
        ("remove field without default", vec![rec(&[f("a", int), f("b", string)].join(",")), r(int)], two(true, false)),
        ("int to long", vec![r(int), r(long)], two(true, false)),
        ("long to int", vec![r(long), r(int)], two(false, true)),
        ("int to float", vec![r(int), r(r#""float""#)], two(true, false)),
        ("int to double", vec![r(int), r(r#""double""#)], two(true, false)),
        ("long to float", vec![r(long), r(r#""float""#)], two(true, false)),
        ("long to double", vec![r(long), r(r#""double""#)], two(true, false)),
        ("float to double", vec![r(r#""float""#), r(r#""double""#)], two(true, false)),
        ("double to float", vec![r(r#""double""#), r(r#""float""#)], two(false, true)),
        ("string to bytes", vec![r(string), r(r#""bytes""#)], two(true, true)),
        ("bytes to string", vec![r(r#""bytes""#), r(string)], two(true, true)),
        ("double to string", vec![r(r#""double""#), r(string)], two(false, false)),
        ("string to int", vec![r(string), r(int)], two(false, false)),
        ("boolean to int", vec![r(r#""boolean""#), r(int)], two(false, false)),
        ("int to string", vec![r(int), r(string)], two(false, false)),
        ("make optional", vec![r(string), r(r#"["null","string"]"#)], two(true, false)),
        ("make required", vec![r(r#"["null","string"]"#), r(string)], two(false, true)),
        ("union widening", vec![r(r#"["null","int"]"#), r(r#"["null","int","string"]"#)], two(true, false)),
        ("union narrowing", vec![r(r#"["int","string"]"#), r(r#"["int"]"#)], two(false, true)),
        ("union branch promoted", vec![r(r#"["null","int"]"#), r(r#"["null","long"]"#)], two(true, false)),
        ("union reordered", vec![r(r#"["null","int","string"]"#), r(r#"["string","null","int"]"#)], two(true, true)),
        ("enum symbol added", vec![en("E", r#""A","B""#, ""), en("E", r#""A","B","C""#, "")], two(true, false)),
        ("enum symbol removed", vec![en("E", r#""A","B","C""#, ""), en("E", r#""A","B""#, "")], two(false, true)),
        ("enum symbol added, old has default", vec![en("E", r#""A","B""#, r#","default":"A""#), en("E", r#""A","B","C""#, r#","default":"A""#)], two(true, true)),
        ("enum symbol removed, new has default", vec![en("E", r#""A","B","C""#, r#","default":"A""#), en("E", r#""A","B""#, r#","default":"A""#)], two(true, true)),
        ("enum renamed", vec![en("E", r#""A""#, ""), en("F", r#""A""#, "")], two(false, false)),
        ("enum renamed with alias", vec![en("E", r#""A""#, ""), en("F", r#""A""#, r#","aliases":["E"]"#)], two(true, false)),
        ("record renamed", vec![r(int), r#"{"type":"record","name":"S","namespace":"t","fields":[{"name":"a","type":"int"}]}"#.into()], two(false, false)),
        ("record renamed with alias", vec![r(int), r#"{"type":"record","name":"S","namespace":"t","aliases":["R"],"fields":[{"name":"a","type":"int"}]}"#.into()], two(true, false)),
        ("field renamed with alias", vec![r(int), r#"{"type":"record","name":"R","namespace":"t","fields":[{"name":"b","type":"int","aliases":["a"]}]}"#.into()], two(true, false)),
        ("field renamed without alias", vec![r(int), one("b", int)], two(false, false)),
        ("nested field added with default", vec![nested(&f("x", int)), nested(&[f("x", int), fd("y", int, "0")].join(","))], two(true, true)),
        ("nested field int to string", vec![nested(&f("x", int)), nested(&f("x", string))], two(false, false)),
        ("nested field added without default", vec![nested(&f("x", int)), nested(&[f("x", int), f("y", int)].join(","))], two(false, true)),
        ("array items int to long", vec![r(r#"{"type":"array","items":"int"}"#), r(r#"{"type":"array","items":"long"}"#)], two(true, false)),
        ("array items string to int", vec![r(r#"{"type":"array","items":"string"}"#), r(r#"{"type":"array","items":"int"}"#)], two(false, false)),
        ("map values int to long", vec![r(r#"{"type":"map","values":"int"}"#), r(r#"{"type":"map","values":"long"}"#)], two(true, false)),
        ("map to array", vec![r(r#"{"type":"map","values":"int"}"#), r(r#"{"type":"array","items":"int"}"#)], two(false, false)),
        ("fixed size changed", vec![r(r#"{"type":"fixed","name":"F","size":8}"#), r(r#"{"type":"fixed","name":"F","size":16}"#)], two(false, false)),
        ("decimal precision changed", vec![r(r#"{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}"#), r(r#"{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}"#)], two(false, false)),
        ("timestamp millis to micros", vec![r(r#"{"type":"long","logicalType":"timestamp-millis"}"#), r(r#"{"type":"long","logicalType":"timestamp-micros"}"#)], two(false, false)),
        ("string to uuid", vec![r(string), r(r#"{"type":"string","logicalType":"uuid"}"#)], two(true, true)),
        ("array of records gains required field", vec![
            r(r#"{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"x","type":"int"}]}}"#),
            r(r#"{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"x","type":"int"},{"name":"y","type":"int"}]}}"#),
        ], two(false, true)),
        ("add optional field with null default", vec![r(int), rec(&[f("a", int), fd("o", r#"["null","string"]"#, "null")].join(","))], two(true, true)),
        ("remove optional field with null default", vec![rec(&[f("a", int), fd("o", r#"["null","string"]"#, "null")].join(",")), r(int)], two(true, true)),
        ("default value changed", vec![rec(&fd("a", int, "1")), rec(&fd("a", int, "2"))], two(true, true)),
        ("optional nested record gains required field", vec![
            r(r#"["null",{"type":"record","name":"N","fields":[{"name":"x","type":"int"}]}]"#),
            r(r#"["null",{"type":"record","name":"N","fields":[{"name":"x","type":"int"},{"name":"y","type":"int"}]}]"#),
        ], two(false, true)),
        // Three-version chains: transitive modes differ from the others.
        ("removed then re-added with another type", vec![r(int), rec(""), rec(&fd("a", string, r#""x""#))],
            // NONE  B     BT     F      FT     FULL   FULLT
            [true, true, false, false, false, false, false]),
        ("default given then field removed", vec![r(string), rec(&fd("a", string, r#""d""#)), rec("")],
            [true, true, true, true, false, true, false]),
        ("three compatible steps", vec![r(int), rec(&[f("a", int), fd("b", string, r#""x""#)].join(",")), rec(&[f("a", int), fd("b", string, r#""x""#), fd("c", int, "0")].join(","))],
            [true, true, true, true, true, true, true]),
    ]
}

#[test]
fn compatibility_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, chain, expected) in &cases {
        let chain: Vec<Schema> = chain.iter().map(|s| parse(s)).collect();
        for (mode, want) in MODES.iter().zip(expected) {
            let got = verdict(*mode, &chain);
            if got != *want {
                failures.push(format!("{name}: {mode} expected {want}, got {got}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} wrong verdicts:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn messages_name_field_and_change() {
    let old = parse(&one("total", r#""double""#));
    let new = parse(&one("total", r#""string""#));
    let found = check_evolution(Backward, &new, &[&old]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1.to_string(), "field \"total\" changed double→string");
    let found = check_evolution(Forward, &parse(&one("a", r#""long""#)), &[&parse(&one("a", r#""int""#))]);
    assert_eq!(found[0].1.to_string(), "field \"a\" changed int→long");
}

#[test]
fn every_problem_is_reported() {
    let old = parse(&rec(&[f("a", r#""int""#), f("b", r#""string""#), f("c", r#""double""#)].join(",")));
    let new =
        parse(&rec(
            &[f("a", r#""string""#), f("b", r#""int""#), f("c", r#""double""#), f("d", r#""int""#)].join(",")
        ));
    let found = check_evolution(Backward, &new, &[&old]);
    let paths: Vec<&str> = found.iter().map(|(_, i)| i.path.as_str()).collect();
    assert_eq!(paths, ["a", "b", "d"], "{found:?}");
}
