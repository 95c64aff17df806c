//! The AWS KMS master key against a real KMS API server: moto, started on
//! a free loopback port from the test virtualenv (`tests/run.sh` makes it
//! and sets `WATERSHED_TEST_PYTHON`). Data keys are generated and
//! unwrapped by KMS, bound to their encryption context, survive a reopen
//! of the keyring, and are erased by `forget`.
#![cfg(feature = "kms")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use watershed_event::AccountId;
use watershed_protect::{EnvelopeKeyring, Error, Keyring, KmsMasterKey, MasterKey};

/// A moto server on a loopback port, stopped on drop.
struct Moto {
    child: Child,
    url: String,
    python: PathBuf,
}

impl Moto {
    /// Start moto, or `None` (said loudly) when the test is told to skip.
    fn start() -> Option<Self> {
        let python = match std::env::var_os("WATERSHED_TEST_PYTHON") {
            Some(p) => PathBuf::from(p),
            None if std::env::var("WATERSHED_TEST_SKIP_MOTO").as_deref() == Ok("1") => {
                eprintln!("SKIPPED: KMS against moto (WATERSHED_TEST_SKIP_MOTO=1)");
                return None;
            }
            None => panic!(
                "WATERSHED_TEST_PYTHON is not set: run the tests through tests/run.sh, which makes the \
                 virtualenv with moto, or set WATERSHED_TEST_SKIP_MOTO=1 to skip the KMS test loudly"
            ),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto with {}: {e}", python.display()));
        let moto = Self { child, url: format!("http://127.0.0.1:{port}"), python };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on port {port} within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// A new symmetric KMS key's id (created with boto3, moto's client).
    fn create_key(&self) -> String {
        let script = format!(
            "import boto3; k = boto3.client('kms', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='testing', aws_secret_access_key='testing'); \
             print(k.create_key(Description='watershed test')['KeyMetadata']['KeyId'])",
            self.url
        );
        let out = Command::new(&self.python).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "CreateKey: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn master(&self, key_id: &str) -> KmsMasterKey {
        KmsMasterKey::new(key_id, "us-east-1", Some(self.url.clone())).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn data_keys_are_wrapped_by_kms_and_erased_by_forget() {
    // The SDK's default credential chain reads these first; no instance
    // metadata lookups.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let Some(moto) = Moto::start() else { return };
    let key_id = moto.create_key();

    // Wrapping is bound to the context: another context cannot unwrap.
    let master = moto.master(&key_id);
    let (plain, wrapped) = master.generate(b"data:111111111111").unwrap();
    assert_eq!(master.unwrap(&wrapped, b"data:111111111111").unwrap().expose(), plain.expose());
    let e = master.unwrap(&wrapped, b"data:222222222222").unwrap_err();
    assert!(matches!(e, Error::Kms(ref m) if m.starts_with("Decrypt")), "{e}");
    let rewrapped = master.wrap(&plain, b"token:1").unwrap();
    assert_eq!(master.unwrap(&rewrapped, b"token:1").unwrap().expose(), plain.expose());

    // A keyring over KMS: encrypt under two subjects' keys.
    let dir = tempfile::tempdir().unwrap();
    let account = AccountId::new("111111111111").unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let (mut buf, mut alice, mut bob) = (Vec::new(), Vec::new(), Vec::new());
    {
        let kr = EnvelopeKeyring::open(dir.path(), moto.master(&key_id)).unwrap();
        kr.data_cipher(&account, Some("alice")).unwrap().encrypt_into(b"Ada", &mut rng, &mut buf, &mut alice);
        kr.data_cipher(&account, Some("bob")).unwrap().encrypt_into(b"Bob", &mut rng, &mut buf, &mut bob);
        kr.sync().unwrap();
    }
    let (alice, bob) = (String::from_utf8(alice).unwrap(), String::from_utf8(bob).unwrap());
    let decrypt = |kr: &EnvelopeKeyring<KmsMasterKey>, value: &str| {
        let parsed = watershed_protect::cipher::parse(value)?;
        kr.cipher_by_id(&parsed.key_id)?.decrypt(&parsed)
    };

    // Reopened (a restart): the keys unwrap through KMS Decrypt.
    let kr = EnvelopeKeyring::open(dir.path(), moto.master(&key_id)).unwrap();
    assert_eq!(decrypt(&kr, &alice).unwrap(), b"Ada");
    assert_eq!(decrypt(&kr, &bob).unwrap(), b"Bob");
    kr.forget(&account, "alice").unwrap();
    assert!(matches!(decrypt(&kr, &alice), Err(Error::KeyErased { .. })));
    assert_eq!(decrypt(&kr, &bob).unwrap(), b"Bob", "other subjects stay readable");

    // A keyring whose KMS key does not exist cannot start, and says why.
    let e = EnvelopeKeyring::open(&dir.path().join("other"), moto.master("no-such-key")).unwrap_err();
    assert!(e.to_string().contains("no-such-key"), "{e}");
    // Nor one whose KMS cannot be reached.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable =
        KmsMasterKey::new(&key_id, "us-east-1", Some(format!("http://127.0.0.1:{closed}"))).unwrap();
    let e = EnvelopeKeyring::open(&dir.path().join("third"), unreachable).unwrap_err();
    assert!(e.to_string().contains("Encrypt: dispatch failure"), "{e}");
}
