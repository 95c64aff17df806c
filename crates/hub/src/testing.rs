//! What the hub's own tests share: a data directory's configuration, an
//! account's token, and a valid event.

use std::path::Path;

use crate::config::{HubConfig, Overrides};

/// The embedded defaults over `data_dir`, on a free loopback port, with
/// the repository's schemas.
pub(crate) fn config(data_dir: &Path) -> HubConfig {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        // Cargo sets the crate's directory when it runs the tests; the
        // compile-time value can name another checkout that shared the
        // target directory.
        schemas: Some(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_owned(), Into::into)
                .join("../../schemas"),
        ),
        data_dir: Some(data_dir.to_owned()),
    };
    HubConfig::load(None, Vec::new(), &overrides).expect("the defaults load")
}

/// A token for account 123456789012 in `data_dir`.
pub(crate) fn token(data_dir: &Path) -> String {
    let account = watershed_event::AccountId::new("123456789012").expect("an account id");
    crate::accounts::Accounts::add(data_dir, &account).expect("the token is stored").0
}

/// A valid `identity.user_login` event with id `id`.
pub(crate) fn login(id: &str) -> String {
    format!(
        r#"{{"version":"0","id":"{id}","detail-type":"UserLogin","source":"com.example.identity","time":"2024-05-01T12:00:01Z","region":"eu-west-1","resources":[],"detail":{{"user_id":"usr_001965","username":"ada@example.com","ip_address":"203.0.113.9","user_agent":"curl/8","outcome":"SUCCESS","mfa":"WEBAUTHN","session_id":"sess_0ba92b48381dde4a","logged_in_at":"2024-05-01T12:00:01Z","attempt":1,"geo":{{"country":"GB","city":"London"}}}}}}"#
    )
}
