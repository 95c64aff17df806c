//! The Schema Registry API of `watershed serve`, read over HTTP and with
//! Confluent's own Python client (confluent-kafka: its registry client,
//! AvroSerializer and AvroDeserializer), checked against the schema
//! directory as the registry crate loads it.

use reqwest::blocking::{Client, RequestBuilder};
use serde_json::{json, Value};
use watershed_schema::Registry;
use watershed_tests::{add_account, python, repo, Server};

const ACCOUNT: &str = "111111111111";

fn client() -> Client {
    Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap()
}

/// Send `req`; (status, JSON body, content type).
fn send(req: RequestBuilder) -> (u16, Value, String) {
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    let media = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), media)
}

#[test]
fn the_schema_registry_api_serves_the_schema_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, ACCOUNT);
    let server = Server::start(&data, &[]);
    let reg = Registry::load(&repo().join("schemas")).unwrap();
    let c = client();
    let get = |path: &str| send(c.get(format!("{}{path}", server.url)).bearer_auth(&token));
    let post = |path: &str, body: &Value| {
        send(c.post(format!("{}{path}", server.url)).bearer_auth(&token).json(body))
    };

    let names: Vec<&str> = reg.subjects().iter().map(|s| s.name.as_str()).collect();
    let (status, subjects, media) = get("/subjects");
    assert_eq!((status, media.as_str()), (200, "application/vnd.schemaregistry.v1+json"));
    assert_eq!(subjects, json!(names));
    assert_eq!(get("/subjects?subjectPrefix=identity.").1, json!(["identity.user_login"]));
    assert_eq!(get("/subjects?offset=1&limit=2").1, json!(names[1..3]));
    for s in reg.subjects() {
        let versions: Vec<u32> = s.versions.iter().map(|v| v.version).collect();
        assert_eq!(get(&format!("/subjects/{}/versions", s.name)).1, json!(versions));
        for v in &s.versions {
            let expected = json!({"subject": s.name, "version": v.version, "id": v.id, "schema": v.text});
            assert_eq!(
                get(&format!("/subjects/{}/versions/{}", s.name, v.version)),
                (200, expected, media.clone())
            );
            assert_eq!(get(&format!("/schemas/ids/{}", v.id)).1, json!({"schema": v.text}));
            assert_eq!(get(&format!("/schemas/ids/{}/subjects", v.id)).1, json!([s.name]));
            assert_eq!(
                get(&format!("/schemas/ids/{}/versions", v.id)).1,
                json!([{"subject": s.name, "version": v.version}])
            );
            let raw = get(&format!("/subjects/{}/versions/{}/schema", s.name, v.version)).1;
            assert_eq!(raw, serde_json::from_str::<Value>(&v.text).unwrap());
            // Looked up by its schema, spaced another way.
            let pretty =
                serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v.text).unwrap()).unwrap();
            let (status, found, _) = post(&format!("/subjects/{}", s.name), &json!({"schema": pretty}));
            assert_eq!((status, found["version"].as_u64()), (200, Some(u64::from(v.version))), "{found}");
        }
        let latest = get(&format!("/subjects/{}/versions/latest", s.name)).1;
        assert_eq!(latest["version"], json!(s.latest().version));
        assert_eq!(get(&format!("/subjects/{}/versions/-1", s.name)).1, latest);
        assert_eq!(
            get(&format!("/config/{}", s.name)).1,
            json!({"compatibilityLevel": s.config.compatibility.as_str()})
        );
    }
    assert_eq!(get("/schemas/types").1, json!(["AVRO"]));
    assert_eq!(get("/config").1, json!({"compatibilityLevel": "BACKWARD"}));
    assert_eq!(get("/mode").1, json!({"mode": "READONLY"}));

    // Compatibility of a candidate next version.
    let login = reg.subject("identity.user_login").unwrap();
    let mut schema: Value = serde_json::from_str(&login.latest().text).unwrap();
    schema["fields"].as_array_mut().unwrap().push(json!({"name": "added", "type": "long"}));
    let path = "/compatibility/subjects/identity.user_login/versions/latest";
    assert_eq!(post(path, &json!({"schema": schema.to_string()})).1, json!({"is_compatible": false}));
    let (_, verbose, _) = post(&format!("{path}?verbose=true"), &json!({"schema": schema.to_string()}));
    let messages = verbose["messages"].as_array().unwrap();
    assert!(messages.iter().any(|m| m.as_str().unwrap().contains("\"added\"")), "{verbose}");
    schema["fields"].as_array_mut().unwrap().last_mut().unwrap()["default"] = json!(0);
    assert_eq!(post(path, &json!({"schema": schema.to_string()})).1, json!({"is_compatible": true}));
    // BACKWARD_TRANSITIVE: against every version, v1's int `attempt`
    // cannot be read as the candidate's string.
    let field = schema["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "attempt").unwrap();
    field["type"] = json!("string");
    let (_, all, _) = post(
        "/compatibility/subjects/identity.user_login/versions?verbose=true",
        &json!({"schema": schema.to_string()}),
    );
    assert_eq!(all["is_compatible"], json!(false), "{all}");
    assert!(all["messages"].to_string().contains("with v1"), "{all}");

    // Errors, in Confluent's form.
    let refused =
        |(status, body, _): (u16, Value, String)| (status, body["error_code"].as_u64().unwrap_or(0));
    assert_eq!(refused(get("/subjects/nope/versions")), (404, 40401));
    assert_eq!(refused(get("/subjects/identity.user_login/versions/9")), (404, 40402));
    assert_eq!(refused(get("/subjects/identity.user_login/versions/0")), (422, 42202));
    assert_eq!(refused(get("/subjects/identity.user_login/versions/x")), (422, 42202));
    assert_eq!(refused(get("/schemas/ids/7")), (404, 40403));
    assert_eq!(
        refused(post("/subjects/identity.user_login", &json!({"schema": "{\"type\": \"int\"}"}))),
        (404, 40403)
    );
    for bad in [
        json!({"schema": "{"}),
        json!({"schema": "\"string\""}),
        json!({"no": "schema"}),
        json!({"schema": "{}", "schemaType": "PROTOBUF"}),
    ] {
        assert_eq!(refused(post(path, &bad)), (422, 42201), "{bad}");
    }
    let (status, body, _) =
        post("/subjects/identity.user_login/versions", &json!({"schema": login.latest().text}));
    assert_eq!((status, body["error_code"].as_u64()), (422, Some(42205)));
    assert!(body["message"].as_str().unwrap().contains("watershed schema check"), "{body}");
    for req in [
        c.delete(format!("{}/subjects/identity.user_login", server.url)),
        c.put(format!("{}/config", server.url)).json(&json!({"compatibility": "NONE"})),
        c.put(format!("{}/mode", server.url)).json(&json!({"mode": "READWRITE"})),
    ] {
        assert_eq!(refused(send(req.bearer_auth(&token))), (422, 42205));
    }

    // Credentials: none, a bad token, Basic with the account (or not).
    assert_eq!(refused(send(c.get(format!("{}/subjects", server.url)))), (401, 40101));
    assert_eq!(refused(send(c.get(format!("{}/subjects", server.url)).bearer_auth("ws_nope"))), (401, 40101));
    let basic = |user: &str| send(c.get(format!("{}/subjects", server.url)).basic_auth(user, Some(&token)));
    assert_eq!(basic(ACCOUNT).0, 200);
    assert_eq!(refused(basic("222222222222")), (401, 40101));

    // Confluent's Python client, serializer and deserializer.
    if let Some(py) = python() {
        let record = json!({
            "user_id": "u-1", "username": "ada", "ip_address": "10.0.0.1", "user_agent": "curl",
            "outcome": "LOCKED", "mfa": null, "session_id": null, "logged_in_at": 1_714_564_800_000_000_i64,
            "attempt": 3, "geo": null,
        });
        let out = std::process::Command::new(py)
            .arg(repo().join("tests/registry_check.py"))
            .args([&server.url, ACCOUNT, &token, "identity.user_login", &record.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
        for s in reg.subjects() {
            let got = &seen["subjects"][&s.name];
            let versions: Vec<u32> = s.versions.iter().map(|v| v.version).collect();
            assert_eq!(got["versions"], json!(versions), "{}", s.name);
            let l = s.latest();
            assert_eq!(
                got["latest"],
                json!({"id": l.id, "version": l.version, "schema": l.text}),
                "{}",
                s.name
            );
            assert_eq!(got["version_1_id"], json!(s.versions[0].id));
            assert_eq!(got["by_id_is_latest"], json!(true));
            assert_eq!(got["lookup_version"], json!(l.version));
            assert_eq!(got["compatibility"], json!(s.config.compatibility.as_str()));
            assert_eq!(got["optional_field_compatible"], json!(true), "{}", s.name);
            // A field without a default: old data cannot be read by it.
            let expected = !s.config.compatibility.checks_backward();
            assert_eq!(got["required_field_compatible"], json!(expected), "{}", s.name);
        }
        assert_eq!(seen["register"], json!({"http_status": 422, "error_code": 42205}));
        assert_eq!(seen["wrong_token"], json!({"http_status": 401}));
        assert_eq!(
            seen["framed"],
            json!({"magic": 0, "id": login.latest().id, "user_id": "u-1", "outcome": "LOCKED", "attempt": 3})
        );
    }
    assert!(server.stop().success());
}
