//! A source plugin for the tests: busy for `x-spin-ms` milliseconds, then
//! answers an event whose reference is `x-deal` and whose event type says
//! it came from here (so a test can tell its code from another plugin's).

// The generated export glue takes a parameter per flattened field.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "source", path: "../../../wit" });

use crm::plugin::types::{Customer, Deal, Header};

struct SlowSource;

fn header<'a>(headers: &'a [Header], name: &str) -> &'a str {
    headers.iter().find(|h| h.name == name).map(|h| h.value.as_str()).unwrap_or("")
}

impl Guest for SlowSource {
    fn parse(request: IncomingRequest) -> Result<Vec<CrmEvent>, ParseError> {
        let headers = request.headers;
        let ms: u64 = header(&headers, "x-spin-ms").parse().unwrap_or(0);
        let start = std::time::Instant::now();
        while start.elapsed().as_millis() < u128::from(ms) {
            std::hint::black_box(());
        }
        let customer = Customer {
            contact_id: None,
            first_name: None,
            last_name: None,
            email: None,
            phone: None,
            city: None,
            state: None,
            zip_code: None,
            country: None,
        };
        Ok(vec![CrmEvent {
            event_type: "slow-source".into(),
            reference: header(&headers, "x-deal").into(),
            status: "Qualified".into(),
            customer,
            deal: Deal { name: None, value: None, currency: None, closing_date: None },
            property: None,
            occurred_at: None,
            lead_id: None,
            received_at: 0,
        }])
    }
}

export!(SlowSource);
