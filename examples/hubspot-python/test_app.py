"""Unit tests for the HubSpot mapping (plain Python, no WIT bindings needed).

Run from this folder:  .venv/bin/python -m unittest -v
"""

import json
import unittest

import mapping
from mapping import InvalidField, Malformed, MissingField, Unauthenticated, Unavailable

SECRET = "client-secret-1"
URL = "https://crm.example.com/api/v1/webhook/hubspot"
NOW = 1_700_000_000_000

# A batch as HubSpot sends it: a stage change, a creation, and two events
# this source leaves out (another property, another object type).
BATCH = [
    {"objectId": 1246965, "propertyName": "dealstage", "propertyValue": "closedwon", "changeSource": "CRM",
     "eventId": 3816279340, "subscriptionId": 25, "portalId": 33, "appId": 1160452, "occurredAt": 1699999990000,
     "subscriptionType": "deal.propertyChange", "attemptNumber": 0},
    {"objectId": 1246978, "changeSource": "CRM", "eventId": 3816279480, "subscriptionId": 22, "portalId": 33,
     "appId": 1160452, "occurredAt": 1699999995000, "subscriptionType": "deal.creation", "attemptNumber": 0},
    {"objectId": 1246965, "propertyName": "amount", "propertyValue": "500", "subscriptionType": "deal.propertyChange",
     "occurredAt": 1699999990000},
    {"objectId": 512, "subscriptionType": "contact.creation", "occurredAt": 1699999990000},
]

# The API's answers, shaped as HubSpot's CRM API documents them.
DEALS = {"status": "COMPLETE", "results": [
    {"id": "1246965", "properties": {"dealname": "Grand Cypress", "amount": "12500000", "deal_currency_code": "usd",
                                     "closedate": "2026-03-15T00:00:00Z", "dealstage": "closedwon",
                                     "hs_object_id": "1246965"}, "archived": False},
    {"id": "1246978", "properties": {"dealname": "Harbor View", "amount": "", "dealstage": "qualifiedtobuy",
                                     "closedate": "1773532800000"}, "archived": False},
]}
ASSOCIATIONS = {"status": "COMPLETE", "results": [
    {"from": {"id": "1246965"}, "to": [{"toObjectId": 987, "associationTypes": [
        {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}]}]},
]}
CONTACTS = {"status": "COMPLETE", "results": [
    {"id": "987", "properties": {"email": "john.doe@example.com", "firstname": "John", "lastname": "Doe",
                                 "phone": "+1 (234) 567-890", "city": "Austin", "state": "TX", "zip": "78701",
                                 "country": "US", "meta_lead_id": "1234567890123456"}},
]}


def signed_headers(body, timestamp=NOW, secret=SECRET, url=URL):
    return {
        "x-hubspot-signature-v3": mapping.signature(secret, "POST", url, body, timestamp),
        "x-hubspot-request-timestamp": str(timestamp),
    }


class Signature(unittest.TestCase):
    def test_a_known_vector(self):
        # Computed independently: printf 'POST<url><body><ts>' | openssl dgst -sha256 -hmac <secret> -binary | base64
        body = b'[{"objectId":1}]'
        self.assertEqual(
            mapping.signature(SECRET, "POST", URL, body, 1700000000000),
            "z/i4u4RRkAgmKUzYOTOjXcFVF58aeUig1JUKdn/0U5c=",
        )

    def test_hubspot_decodes_listed_escapes_in_the_uri(self):
        self.assertEqual(mapping.signed_uri("https://x.com/hook%3Fa%3Db%2Cc?q=%2f%40"), "https://x.com/hook?a%3Db,c?q=/@")

    def test_a_signed_request_passes(self):
        body = json.dumps(BATCH).encode()
        mapping.verify_signature(SECRET, "POST", URL, signed_headers(body), body, NOW + 1000)

    def test_a_bad_signature_is_refused(self):
        body = json.dumps(BATCH).encode()
        for headers in (
            signed_headers(body, secret="someone-else"),
            signed_headers(body + b" "),
            signed_headers(body, url=URL + "?x=1"),
            {"x-hubspot-request-timestamp": str(NOW)},
        ):
            with self.assertRaises(Unauthenticated):
                mapping.verify_signature(SECRET, "POST", URL, headers, body, NOW)

    def test_a_stale_timestamp_is_refused_even_when_signed(self):
        body = b"[]"
        six_minutes_ago = NOW - 6 * 60 * 1000
        with self.assertRaises(Unauthenticated) as caught:
            mapping.verify_signature(SECRET, "POST", URL, signed_headers(body, six_minutes_ago), body, NOW)
        self.assertIn("more than 5 minutes", caught.exception.reason)
        four_minutes_ago = NOW - 4 * 60 * 1000
        mapping.verify_signature(SECRET, "POST", URL, signed_headers(body, four_minutes_ago), body, NOW)


class Batch(unittest.TestCase):
    def test_deal_stage_events_are_picked_out(self):
        changes = mapping.deal_changes(json.dumps(BATCH).encode())
        self.assertEqual(changes, [
            {"deal_id": "1246965", "event_type": "deal.propertyChange", "stage": "closedwon",
             "occurred_at_ms": 1699999990000},
            {"deal_id": "1246978", "event_type": "deal.creation", "stage": None, "occurred_at_ms": 1699999995000},
        ])

    def test_events_come_out_in_the_order_they_happened(self):
        later = dict(BATCH[0], propertyValue="closedwon", occurredAt=2000)
        earlier = dict(BATCH[0], propertyValue="qualifiedtobuy", occurredAt=1000)
        changes = mapping.deal_changes(json.dumps([later, earlier]).encode())
        self.assertEqual([c["stage"] for c in changes], ["qualifiedtobuy", "closedwon"])

    def test_bad_batches_name_the_field(self):
        with self.assertRaises(Malformed):
            mapping.deal_changes(b"deals")
        with self.assertRaises(Malformed):
            mapping.deal_changes(b"[" * 200 + b"]" * 200)
        with self.assertRaises(MissingField) as caught:
            mapping.deal_changes(b'[{"objectId": 1}]')
        self.assertEqual(caught.exception.field, "[0].subscriptionType")
        with self.assertRaises(MissingField) as caught:
            mapping.deal_changes(b'[{"subscriptionType": "deal.creation"}]')
        self.assertEqual(caught.exception.field, "[0].objectId")
        with self.assertRaises(InvalidField) as caught:
            mapping.deal_changes(b'[{"subscriptionType": "deal.propertyChange", "objectId": 1, "propertyName": "dealstage"}]')
        self.assertEqual(caught.exception.field, "[0].propertyValue")

    def test_requests_read_in_batches(self):
        path, body = mapping.deals_request(["1", "2", "1"])
        self.assertEqual(path, "/crm/v3/objects/deals/batch/read")
        self.assertEqual(body["inputs"], [{"id": "1"}, {"id": "2"}])
        self.assertIn("dealstage", body["properties"])
        path, body = mapping.associations_request(["1"])
        self.assertEqual(path, "/crm/v4/associations/deals/contacts/batch/read")
        path, body = mapping.contacts_request(["987"], ["meta_lead_id"])
        self.assertEqual(path, "/crm/v3/objects/contacts/batch/read")
        self.assertEqual(body["properties"][-1], "meta_lead_id")


class Events(unittest.TestCase):
    def events(self, stage_map=None, lead_id_property=None):
        changes = mapping.deal_changes(json.dumps(BATCH).encode())
        return mapping.build_events(
            changes,
            mapping.objects_by_id(DEALS, "deals"),
            mapping.contacts_of(ASSOCIATIONS),
            mapping.objects_by_id(CONTACTS, "contacts"),
            mapping.parse_stage_map(stage_map),
            lead_id_property,
        )

    def test_enriched_events(self):
        won, created = self.events()
        self.assertEqual((won["reference"], won["status"], won["event_type"]), ("1246965", "Committed", "deal.propertyChange"))
        self.assertEqual(won["occurred_at"], 1699999990)
        self.assertEqual(won["customer"], {
            "contact_id": "987", "first_name": "John", "last_name": "Doe", "email": "john.doe@example.com",
            "phone": "+1 (234) 567-890", "city": "Austin", "state": "TX", "zip_code": "78701", "country": "US",
        })
        self.assertEqual(won["deal"], {"name": "Grand Cypress", "value": 12500000.0, "currency": "USD",
                                       "closing_date": "2026-03-15"})
        # The creation's stage comes from the deal; its closedate was epoch ms.
        self.assertEqual((created["status"], created["deal"]["closing_date"]), ("Qualified", "2026-03-15"))
        self.assertEqual(created["deal"]["value"], None)
        self.assertEqual(created["customer"]["email"], None, "no contact associated")
        self.assertIsNone(won["lead_id"])

    def test_the_stage_map_is_configuration(self):
        won, created = self.events("closedwon=Won, qualifiedtobuy=Lead")
        self.assertEqual((won["status"], created["status"]), ("Won", "Lead"))
        won, _ = self.events("contractsent=Committed")
        self.assertEqual(won["status"], "closedwon", "an unmapped stage passes through as sent")
        with self.assertRaises(Unavailable):
            mapping.parse_stage_map("closedwon")

    def test_a_lead_id_property_is_read_when_configured(self):
        won, _ = self.events(lead_id_property="meta_lead_id")
        self.assertEqual(won["lead_id"], "1234567890123456")

    def test_a_deal_hubspot_no_longer_has_is_left_out(self):
        changes = mapping.deal_changes(json.dumps(BATCH).encode())
        only_one = {"1246978": mapping.objects_by_id(DEALS, "deals")["1246978"]}
        events = mapping.build_events(changes, only_one, {}, {}, mapping.parse_stage_map(None))
        self.assertEqual([e["reference"] for e in events], ["1246978"])

    def test_an_answer_without_results_is_unavailable(self):
        with self.assertRaises(Unavailable):
            mapping.objects_by_id({"message": "internal error"}, "deals")


if __name__ == "__main__":
    unittest.main()
