//! A source plugin for the tests: busy for `x-spin-ms` milliseconds, then
//! answers an event whose reference is `x-deal` and whose event type says
//! it came from here (so a test can tell its code from another plugin's).

wit_bindgen::generate!({ world: "source", path: "../../../wit" });

use crm::plugin::types::{Customer, Deal};

struct SlowSource;

fn header<'a>(headers: &'a [Header], name: &str) -> &'a str {
    headers.iter().find(|h| h.name == name).map(|h| h.value.as_str()).unwrap_or("")
}

impl Guest for SlowSource {
    fn parse(headers: Vec<Header>, _body: Vec<u8>) -> Result<CrmEvent, ParseError> {
        let ms: u64 = header(&headers, "x-spin-ms").parse().unwrap_or(0);
        let start = std::time::Instant::now();
        while start.elapsed().as_millis() < u128::from(ms) {
            std::hint::black_box(());
        }
        Ok(CrmEvent {
            event_type: "slow-source".into(),
            reference: header(&headers, "x-deal").into(),
            status: "Qualified".into(),
            customer: Customer { contact_id: None, first_name: None, last_name: None, email: None, phone: None },
            deal: Deal { name: None, value: None, currency: None, closing_date: None },
            property: None,
            received_at: 0,
        })
    }
}

export!(SlowSource);
