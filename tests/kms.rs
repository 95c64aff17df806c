//! AWS KMS against a real KMS API server: moto, started on a free
//! loopback port from the test virtualenv (`tests/run.sh` makes it and
//! sets `WATERSHED_TEST_PYTHON`; `WATERSHED_TEST_SKIP_MOTO=1` skips these
//! tests loudly).
//!
//! - KMS as a keyring's master key: data keys generated and unwrapped by
//!   KMS, bound to their encryption context, erased by `forget`.
//! - KMS sealing the local master keys (`[keys] master = "kms"`): the
//!   keyring on disk holds no plaintext key and opens only with KMS; a
//!   plaintext keyring is sealed in place by `watershed keys seal`.
//! - `watershed serve` and `watershed keys` with those settings, end to end.

use std::path::Path;
use std::process::{Command, Output};

use rand::SeedableRng;
use serde_json::Value;
use watershed_event::AccountId;
use watershed_protect::{
    Access, EnvelopeKeyring, Error, Keyring, KmsMasterKey, LocalKeyring, LocalMasterKey, MasterKey,
};
use watershed_tests::{
    add_account, bin, detail_strings, free_port, ndjson, payment, post, read_table, repo, Moto, Server,
    REGION,
};

const ACCOUNT: &str = "111111111111";

/// An attribution for audited calls.
fn by() -> Access {
    Access { principal: "ops".into(), purpose: "test".into() }
}

/// Point this process's AWS SDK at moto's test credentials.
fn aws_env_here() {
    for (k, v) in Moto::aws_env() {
        std::env::set_var(k, v);
    }
}

fn kms_key(moto: &Moto, key_id: &str) -> KmsMasterKey {
    KmsMasterKey::new(key_id, Some(REGION.into()), Some(moto.url.clone())).unwrap()
}

fn decrypt<M: MasterKey>(kr: &EnvelopeKeyring<M>, value: &str) -> watershed_protect::Result<Vec<u8>> {
    let parsed = watershed_protect::cipher::parse(value)?;
    kr.cipher_by_id(&parsed.key_id)?.decrypt(&parsed)
}

/// `subject`'s value encrypted under its data key in `kr`, made durable.
fn encrypt<M: MasterKey>(kr: &EnvelopeKeyring<M>, subject: &str, plain: &[u8]) -> String {
    let account = AccountId::new(ACCOUNT).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    kr.data_cipher(&account, Some(subject)).unwrap().encrypt_into(plain, &mut rng, &mut buf, &mut out);
    kr.sync().unwrap();
    String::from_utf8(out).unwrap()
}

/// The records of `dir/master.json`.
fn master_records(dir: &Path) -> Vec<Value> {
    let file: Value = serde_json::from_slice(&std::fs::read(dir.join("master.json")).unwrap()).unwrap();
    file["keys"].as_array().unwrap().clone()
}

#[test]
fn data_keys_are_wrapped_by_kms_and_erased_by_forget() {
    let Some(moto) = Moto::start() else { return };
    aws_env_here();
    let key_id = moto.create_key();

    // Wrapping is bound to the context: another context cannot unwrap.
    let master = kms_key(&moto, &key_id);
    let (plain, wrapped) = master.generate(b"data:111111111111").unwrap();
    assert_eq!(master.unwrap(&wrapped, b"data:111111111111").unwrap().expose(), plain.expose());
    let e = master.unwrap(&wrapped, b"data:222222222222").unwrap_err();
    assert!(matches!(e, Error::Kms(ref m) if m.starts_with("Decrypt")), "{e}");
    let rewrapped = master.wrap(&plain, b"token:1").unwrap();
    assert_eq!(master.unwrap(&rewrapped, b"token:1").unwrap().expose(), plain.expose());

    // A keyring over KMS: encrypt under two subjects' keys.
    let dir = tempfile::tempdir().unwrap();
    let account = AccountId::new(ACCOUNT).unwrap();
    let (alice, bob) = {
        let kr = EnvelopeKeyring::open(dir.path(), kms_key(&moto, &key_id)).unwrap();
        (encrypt(&kr, "alice", b"Ada"), encrypt(&kr, "bob", b"Bob"))
    };

    // Reopened (a restart): the keys unwrap through KMS Decrypt.
    let kr = EnvelopeKeyring::open(dir.path(), kms_key(&moto, &key_id)).unwrap();
    assert_eq!(decrypt(&kr, &alice).unwrap(), b"Ada");
    assert_eq!(decrypt(&kr, &bob).unwrap(), b"Bob");
    kr.forget(&account, "alice", &by()).unwrap();
    assert!(matches!(decrypt(&kr, &alice), Err(Error::KeyErased { .. })));
    assert_eq!(decrypt(&kr, &bob).unwrap(), b"Bob", "other subjects stay readable");

    // A keyring whose KMS key does not exist cannot start, and says why.
    let e = EnvelopeKeyring::open(&dir.path().join("other"), kms_key(&moto, "no-such-key")).unwrap_err();
    assert!(e.to_string().contains("no-such-key"), "{e}");
    // Nor one whose KMS cannot be reached.
    let closed = free_port();
    let unreachable =
        KmsMasterKey::new(&key_id, Some(REGION.into()), Some(format!("http://127.0.0.1:{closed}"))).unwrap();
    let e = EnvelopeKeyring::open(&dir.path().join("third"), unreachable).unwrap_err();
    assert!(e.to_string().contains("Encrypt: dispatch failure"), "{e}");
}

#[test]
fn master_keys_sealed_by_kms_open_only_with_it() {
    let Some(moto) = Moto::start() else { return };
    aws_env_here();
    let key_id = moto.create_key();
    let kms = || Box::new(kms_key(&moto, &key_id)) as Box<dyn MasterKey>;
    let dir = tempfile::tempdir().unwrap();
    let sealed = dir.path().join("sealed");

    // Created sealed: the file holds KMS ciphertexts, no key.
    let ada = encrypt(&LocalKeyring::open_sealed(&sealed, kms()).unwrap(), "alice", b"Ada");
    let records = master_records(&sealed);
    assert_eq!(records.len(), 1);
    assert!(records[0].get("key").is_none() && records[0]["sealed"]["blob"].is_string(), "{records:?}");

    // Reopened (a restart) with KMS: the data keys unwrap locally.
    let kr = LocalKeyring::open_sealed(&sealed, kms()).unwrap();
    assert_eq!(decrypt(&kr, &ada).unwrap(), b"Ada");
    // Rotation adds a sealed master key and rewraps the data keys.
    kr.rotate(&by()).unwrap();
    drop(kr);
    let records = master_records(&sealed);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.get("key").is_none()), "{records:?}");
    let kr = LocalKeyring::open_sealed(&sealed, kms()).unwrap();
    assert_eq!(decrypt(&kr, &ada).unwrap(), b"Ada");
    drop(kr);

    // Without KMS it does not open, and says what it needs.
    let e = LocalKeyring::open_local(&sealed).unwrap_err();
    assert!(matches!(e, Error::Sealed { ref by, .. } if by.contains(&key_id)), "{e}");
    assert!(e.to_string().contains("sealed by KMS key"), "{e}");
    // Nor when KMS cannot be reached.
    let closed =
        KmsMasterKey::new(&key_id, Some(REGION.into()), Some(format!("http://127.0.0.1:{}", free_port())));
    let e = LocalKeyring::open_sealed(&sealed, Box::new(closed.unwrap())).unwrap_err();
    assert!(e.to_string().contains("Decrypt: dispatch failure"), "{e}");

    // A plaintext keyring is refused by a sealed open, then sealed in place.
    let plain = dir.path().join("plain");
    let bob = encrypt(&LocalKeyring::open_local(&plain).unwrap(), "bob", b"Bob");
    let e = LocalKeyring::open_sealed(&plain, kms()).unwrap_err();
    assert!(matches!(e, Error::NotSealed { .. }), "{e}");
    assert_eq!(LocalMasterKey::seal(&plain, &kms_key(&moto, &key_id)).unwrap(), 1);
    assert!(master_records(&plain).iter().all(|r| r.get("key").is_none()));
    assert!(!plain.join("master.json.plain").exists(), "the replaced plaintext file is wiped and removed");
    assert_eq!(LocalMasterKey::seal(&plain, &kms_key(&moto, &key_id)).unwrap(), 0, "sealed once");
    let kr = LocalKeyring::open_sealed(&plain, kms()).unwrap();
    assert_eq!(decrypt(&kr, &bob).unwrap(), b"Bob", "what was written before sealing stays readable");
    assert!(matches!(LocalKeyring::open_local(&plain), Err(Error::Sealed { .. })));
}

/// Run `watershed ARGS` with `env`, failing the test if it takes over two
/// minutes (a `serve` that should refuse to start but does not).
fn watershed(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(repo())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watershed runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("watershed {args:?} still running after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Post a payment of alice's, Ada Lovelace's card.
fn land_a_payment(server: &Server, token: &str, id: &str) {
    let body = ndjson(&[payment(id, None, "alice", "4111111111111111", "Ada Lovelace")]);
    let (status, resp, _) = post(&server.url, Some(token), body, &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(1)), "{resp}");
}

/// A hub in `data`, started with `env`, that took one payment and stopped:
/// the account's token and the payment's encrypted card holder.
fn hub_with_a_payment(data: &Path, env: &[(&str, &str)]) -> (String, String) {
    let token = add_account(data, ACCOUNT);
    let server = Server::start(data, env);
    land_a_payment(&server, &token, "p-1");
    assert!(server.stop().success());
    (token, holders(data).pop().unwrap())
}

/// `watershed keys decrypt` of `value` with the keyring of `data`.
fn cli_decrypt(data: &Path, value: &str, env: &[(&str, &str)]) -> Output {
    let data = data.to_str().unwrap();
    let args =
        ["keys", "decrypt", "--principal", "auditor", "--purpose", "case-9", "--data-dir", data, value];
    watershed(&args, env)
}

/// The encrypted card holders of the lake's payments.
fn holders(data: &Path) -> Vec<String> {
    read_table(&data.join("lake"), "payments")
        .iter()
        .flat_map(|(_, b)| detail_strings(b, &["card", "holder_name"]))
        .map(Option::unwrap)
        .collect()
}

#[test]
fn serve_and_keys_with_a_kms_sealed_keyring() {
    let Some(moto) = Moto::start() else { return };
    let key_id = moto.create_key();
    let aws = Moto::aws_env();
    let mut kms: Vec<(&str, &str)> = vec![
        ("WATERSHED_KEYS__MASTER", "kms"),
        ("WATERSHED_KEYS__KMS_KEY_ID", &key_id),
        ("WATERSHED_KEYS__KMS_ENDPOINT", &moto.url),
    ];
    kms.extend(aws);
    let dir = tempfile::tempdir().unwrap();

    // A hub whose keyring is sealed from the start.
    let data = dir.path().join("sealed");
    let data_s = data.to_str().unwrap();
    let (_, holder) = hub_with_a_payment(&data, &kms);
    assert!(master_records(&data.join("keyring")).iter().all(|r| r.get("key").is_none()));
    let out = cli_decrypt(&data, &holder, &kms);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ada Lovelace");
    // Without the KMS settings neither the CLI nor the hub opens it, and
    // both say which settings it needs.
    let needs = format!("set keys.master = \"kms\" and keys.kms_key_id = \"{key_id}\"");
    let out = cli_decrypt(&data, &holder, &aws);
    assert!(!out.status.success() && stderr(&out).contains(&needs), "{}", stderr(&out));
    let serve = ["serve", "--listen", "127.0.0.1:0", "--schemas", "schemas", "--data-dir", data_s];
    let out = watershed(&serve, &aws);
    assert!(!out.status.success() && stderr(&out).contains(&needs), "{}", stderr(&out));
    // Nor with KMS unreachable; and a KMS master needs its key id.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut unreachable = kms.clone();
    unreachable[2].1 = &closed;
    let out = watershed(&serve, &unreachable);
    assert!(!out.status.success() && stderr(&out).contains("dispatch failure"), "{}", stderr(&out));
    let out = watershed(&serve, &[("WATERSHED_KEYS__MASTER", "kms")]);
    assert!(!out.status.success() && stderr(&out).contains("keys.kms_key_id"), "{}", stderr(&out));

    // A plaintext keyring, sealed in place, then rotated.
    let data = dir.path().join("plain");
    let data_s = data.to_str().unwrap();
    let (token, holder) = hub_with_a_payment(&data, &aws);
    let seal = ["keys", "seal", "--principal", "ops", "--purpose", "CHG-7", "--data-dir", data_s];
    let out = watershed(&seal, &aws);
    assert!(!out.status.success() && stderr(&out).contains("keys.master"), "{}", stderr(&out));
    let out = watershed(&seal, &kms);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sealed 1 master key(s)"));
    let out = watershed(&seal, &kms);
    assert!(String::from_utf8_lossy(&out.stdout).contains("sealed already"), "{out:?}");
    let out = watershed(
        &["keys", "rotate", "--principal", "ops", "--purpose", "CHG-7", "--data-dir", data_s],
        &kms,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let records = master_records(&data.join("keyring"));
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.get("key").is_none()), "{records:?}");
    let audit = std::fs::read_to_string(data.join("keyring/audit.log")).unwrap();
    assert!(audit.contains(r#""action":"seal""#) && audit.contains(r#""action":"rotate""#), "{audit}");
    let attributed = |l: &&str| l.contains(r#""principal":"ops""#) && l.contains(r#""purpose":"CHG-7""#);
    assert!(audit.lines().filter(attributed).count() >= 2, "seal and rotate name who and why: {audit}");
    let out = cli_decrypt(&data, &holder, &kms);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ada Lovelace");
    let out = cli_decrypt(&data, &holder, &aws);
    assert!(stderr(&out).contains("sealed by KMS key"), "{}", stderr(&out));
    // The hub runs on with the sealed keyring.
    let server = Server::start(&data, &kms);
    land_a_payment(&server, &token, "p-2");
    assert!(server.stop().success());
    assert_eq!(holders(&data).len(), 2);
}
