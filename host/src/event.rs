//! The normalized CRM event as the host stores and queues it: the serde
//! mirror of the WIT `crm-event` record (conversions live in
//! `plugins::world`).

use serde::{Deserialize, Serialize};

/// The person on the deal, as the CRM sent it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub contact_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    #[serde(default)]
    pub city: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub zip_code: Option<String>,
    #[serde(default)]
    pub country: Option<String>,
}

/// The commercial side of the deal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    pub name: Option<String>,
    pub value: Option<f64>,
    pub currency: Option<String>,
    pub closing_date: Option<String>,
}

/// The property the deal is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Property {
    pub id: Option<String>,
    pub address: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub zip_code: Option<String>,
    pub property_type: Option<String>,
    pub square_footage: Option<f64>,
}

/// A CRM deal change, normalized by a source plugin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_type: String,
    pub reference: String,
    pub status: String,
    pub customer: Customer,
    pub deal: Deal,
    pub property: Option<Property>,
    /// When the CRM says the deal reached `status`, unix seconds.
    #[serde(default)]
    pub occurred_at: Option<u64>,
    /// The Meta Lead Ads lead id, when the CRM carries one.
    #[serde(default)]
    pub lead_id: Option<String>,
    /// When the host accepted the webhook, unix seconds.
    pub received_at: u64,
}

impl Event {
    /// The status as compared for routing and dedupe: trimmed, lower-case,
    /// so "Committed" and "committed " are one transition.
    pub fn status_key(&self) -> String {
        normalize_status(&self.status)
    }
}

/// Trim and lower-case a deal status for comparison.
pub fn normalize_status(status: &str) -> String {
    status.trim().to_lowercase()
}
