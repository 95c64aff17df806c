//! Sample events of the example subjects (`schemas/`): the reference mix
//! of the benchmarks and the demo. EventBridge-shaped, about 700 bytes,
//! four event types with two to four protected fields each. Generation is
//! deterministic for a seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Generates sample events.
#[derive(Debug)]
pub struct Samples {
    rng: ChaCha8Rng,
    n: u64,
    base: i64,
}

const FIRST: [&str; 8] = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken"];
const LAST: [&str; 8] = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"];
const CITIES: [&str; 6] = ["London", "Berlin", "Paris", "Madrid", "Dublin", "Oslo"];

impl Samples {
    /// A generator with `seed`; event times start at `base_secs` (Unix).
    #[must_use]
    pub fn new(seed: u64, base_secs: i64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), n: 0, base: base_secs }
    }

    fn time(&mut self) -> String {
        let t = self.base + i64::try_from(self.n / 50).unwrap_or(0) + self.rng.gen_range(0..3);
        chrono::DateTime::from_timestamp(t, self.rng.gen_range(0..1_000_000) * 1000)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// The next event (of a rotating type) for `account`, as one JSON line.
    pub fn event(&mut self, account: &str) -> String {
        self.n += 1;
        let n = self.n;
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            self.rng.gen::<u32>(),
            n & 0xffff,
            n % 4096,
            self.rng.gen_range(0..4096),
            self.rng.gen::<u64>() & 0xffff_ffff_ffff
        );
        let time = self.time();
        let customer = self.rng.gen_range(0..5000);
        let name = format!("{} {}", FIRST[self.rng.gen_range(0..8)], LAST[self.rng.gen_range(0..8)]);
        let city = CITIES[self.rng.gen_range(0..CITIES.len())];
        let (source, dt, detail) = match n % 4 {
            0 => (
                "com.example.payments",
                "PaymentAuthorized",
                format!(
                    r#"{{"payment_id":"pay_{n:010}","customer_id":"cus_{customer:06}","amount":"{}.{:02}","currency":"EUR","card":{{"pan":"4{:015}","holder_name":"{name}","brand":"VISA","expiry":"{:02}/{}"}},"merchant":{{"id":"mer_{:04}","name":"Example Books GmbH","mcc":5942,"country":"DE"}},"authorized_at":"{time}","risk_score":{:.4},"three_ds":{},"acquirer_ref":"ACQ-{:04}-{:04}","channel":"WEB"}}"#,
                    self.rng.gen_range(1..900),
                    self.rng.gen_range(0..100),
                    self.rng.gen_range(0..999_999_999_999_999u64),
                    self.rng.gen_range(1..13),
                    self.rng.gen_range(26..32),
                    self.rng.gen_range(0..200),
                    self.rng.gen::<f64>(),
                    self.rng.gen_bool(0.8),
                    self.rng.gen_range(0..10000),
                    self.rng.gen_range(0..10000),
                ),
            ),
            1 => (
                "com.example.shop",
                "OrderPlaced",
                format!(
                    r#"{{"order_id":"{id}","customer_id":"cus_{customer:06}","email":"{}.{}@example.com","shipping_address":{{"street":"{} Example Street","city":"{city}","postcode":"EC{}A {}BB","country":"GB"}},"items":[{{"sku":"SKU-{:05}","quantity":{},"unit_price":"12.50"}},{{"sku":"SKU-{:05}","quantity":1,"unit_price":"3.99"}}],"total":"28.99","placed_on":"{}","coupon":null,"tags":{{"channel":"web"}}}}"#,
                    FIRST[self.rng.gen_range(0..8)].to_lowercase(),
                    self.rng.gen_range(0..1000),
                    self.rng.gen_range(1..300),
                    self.rng.gen_range(1..10),
                    self.rng.gen_range(1..10),
                    self.rng.gen_range(0..50000),
                    self.rng.gen_range(1..3),
                    self.rng.gen_range(0..50000),
                    &time[..10],
                ),
            ),
            2 => (
                "com.example.identity",
                "UserLogin",
                format!(
                    r#"{{"user_id":"usr_{customer:06}","username":"user{customer}@example.com","ip_address":"203.0.{}.{}","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","outcome":"{}","mfa":"WEBAUTHN","session_id":"sess_{:016x}","logged_in_at":"{time}","attempt":{},"geo":{{"country":"GB","city":"{city}"}}}}"#,
                    self.rng.gen_range(0..256),
                    self.rng.gen_range(0..256),
                    ["SUCCESS", "FAILURE", "LOCKED"][self.rng.gen_range(0..3)],
                    self.rng.gen::<u64>(),
                    self.rng.gen_range(1..4),
                ),
            ),
            _ => (
                "aws.cloudtrail",
                "AWS API Call via CloudTrail",
                format!(
                    r#"{{"eventVersion":"1.08","userIdentity":{{"type":"AssumedRole","principalId":"AROA{customer:016}:session","arn":"arn:aws:sts::{account}:assumed-role/Deployer/session","accountId":"{account}","userName":"deployer-{}"}},"eventTime":"{time}","eventSource":"s3.amazonaws.com","eventName":"{}","awsRegion":"eu-west-1","sourceIPAddress":"198.51.100.{}","userAgent":"aws-cli/2.15.0","errorCode":null,"requestParameters":{{"bucketName":"logs-{}","key":"k/{n}"}},"readOnly":{},"eventID":"{id}"}}"#,
                    customer % 50,
                    ["GetObject", "PutObject", "DeleteObject", "ListBuckets"][self.rng.gen_range(0..4)],
                    self.rng.gen_range(0..256),
                    customer % 7,
                    self.rng.gen_bool(0.7),
                ),
            ),
        };
        format!(
            r#"{{"version":"0","id":"{id}","detail-type":"{dt}","source":"{source}","account":"{account}","time":"{time}","region":"eu-west-1","resources":[],"detail":{detail}}}"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_about_700_bytes() {
        let a: Vec<String> = (0..8)
            .map({
                let mut s = Samples::new(7, 1_714_564_800);
                move |_| s.event("111111111111")
            })
            .collect();
        let mut s = Samples::new(7, 1_714_564_800);
        assert_eq!(a[0], s.event("111111111111"));
        let avg = a.iter().map(String::len).sum::<usize>() / a.len();
        assert!((500..900).contains(&avg), "average {avg} bytes");
    }
}
