"""Unit tests for the HubSpot mapping (plain Python, no WIT bindings needed).

Run from this folder:  .venv/bin/python -m unittest -v
"""

import json
import os
import unittest

import mapping
from mapping import InvalidField, Malformed, MissingField, parse_webhook

HERE = os.path.dirname(os.path.abspath(__file__))
PAYLOADS = os.path.join(HERE, "..", "payloads")


def load(name):
    with open(os.path.join(PAYLOADS, name), "rb") as f:
        return f.read()


QUALIFIED = load("hubspot-qualified.json")
CLOSEDWON = load("hubspot-closedwon.json")


def edit(raw, fn):
    """The qualified payload with `fn(doc)` applied, as bytes."""
    doc = json.loads(raw)
    fn(doc)
    return json.dumps(doc, ensure_ascii=False).encode()


class ParsesSamples(unittest.TestCase):
    def test_qualified_sample(self):
        e = parse_webhook([], QUALIFIED)
        self.assertEqual(e["reference"], "hubspot-deal-1234567")
        self.assertEqual(e["status"], "Qualified")
        self.assertEqual(e["event_type"], "deal.propertyChange")
        self.assertEqual(e["received_at"], 0)
        self.assertEqual(
            e["customer"],
            {
                "contact_id": "987",
                "first_name": "John",
                "last_name": "Doe",
                "email": "john.doe@example.com",
                "phone": "+1234567890",
            },
        )
        self.assertEqual(
            e["deal"],
            {
                "name": "The Grand Cypress Acquisition",
                "value": 12500000.0,
                "currency": "USD",
                "closing_date": "2026-03-15",
            },
        )
        self.assertIsInstance(e["deal"]["value"], float)
        self.assertEqual(
            e["property"],
            {
                "id": "PROP-101122",
                "address": "4509 Ocean View Dr, Suite 200",
                "city": "Coastal City",
                "state": "CA",
                "zip_code": "90210",
                "property_type": "Commercial Office",
                "square_footage": 15000.0,
            },
        )
        self.assertIsInstance(e["property"]["square_footage"], float)

    def test_closedwon_sample_is_committed(self):
        e = parse_webhook([], CLOSEDWON)
        self.assertEqual(e["status"], "Committed")
        self.assertEqual(e["reference"], "hubspot-deal-1234567")

    def test_same_deal_same_reference_across_stages(self):
        self.assertEqual(parse_webhook([], QUALIFIED)["reference"], parse_webhook([], CLOSEDWON)["reference"])


class Stages(unittest.TestCase):
    def stage(self, value):
        body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("dealstage", value))
        return parse_webhook([], body)["status"]

    def test_mapped_stages(self):
        self.assertEqual(self.stage("qualifiedtobuy"), "Qualified")
        self.assertEqual(self.stage("contractsent"), "Committed")
        self.assertEqual(self.stage("closedwon"), "Committed")

    def test_mapping_ignores_case_and_spaces(self):
        self.assertEqual(self.stage(" ClosedWon "), "Committed")

    def test_other_stages_pass_through(self):
        self.assertEqual(self.stage("appointmentscheduled"), "appointmentscheduled")
        self.assertEqual(self.stage("closedlost"), "closedlost")
        self.assertEqual(self.stage("  custom-stage-7 "), "custom-stage-7")

    def test_missing_stage(self):
        body = edit(QUALIFIED, lambda d: d["properties"].pop("dealstage"))
        with self.assertRaises(MissingField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "properties.dealstage")

    def test_missing_properties_is_missing_stage(self):
        body = edit(QUALIFIED, lambda d: d.pop("properties"))
        with self.assertRaises(MissingField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "properties.dealstage")

    def test_blank_or_non_string_stage(self):
        for bad in ["", "  ", 3, True, {}]:
            body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("dealstage", bad))
            with self.assertRaises(InvalidField, msg=repr(bad)) as c:
                parse_webhook([], body)
            self.assertEqual(c.exception.field, "properties.dealstage")

    def test_properties_not_an_object(self):
        body = edit(QUALIFIED, lambda d: d.__setitem__("properties", []))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual((c.exception.field, c.exception.expected), ("properties", "a JSON object"))


class Reference(unittest.TestCase):
    def ref(self, value):
        return parse_webhook([], edit(QUALIFIED, lambda d: d.__setitem__("objectId", value)))["reference"]

    def test_integer_and_string_ids(self):
        self.assertEqual(self.ref(42), "hubspot-deal-42")
        self.assertEqual(self.ref(" 42 "), "hubspot-deal-42")
        self.assertEqual(self.ref(42.0), "hubspot-deal-42")
        self.assertEqual(self.ref(12345678901234567890), "hubspot-deal-12345678901234567890")

    def test_missing_object_id(self):
        for fn in (lambda d: d.pop("objectId"), lambda d: d.__setitem__("objectId", None)):
            with self.assertRaises(MissingField) as c:
                parse_webhook([], edit(QUALIFIED, fn))
            self.assertEqual(c.exception.field, "objectId")

    def test_bad_object_id(self):
        for bad in [True, 1.5, "", "  ", [], {}]:
            with self.assertRaises(InvalidField, msg=repr(bad)) as c:
                self.ref(bad)
            self.assertEqual(c.exception.field, "objectId")


class EventType(unittest.TestCase):
    def test_body_wins_over_header(self):
        e = parse_webhook([("x-hubspot-event", "deal.creation")], QUALIFIED)
        self.assertEqual(e["event_type"], "deal.propertyChange")

    def test_header_when_body_has_none(self):
        body = edit(QUALIFIED, lambda d: d.pop("eventType"))
        self.assertEqual(parse_webhook([("X-HubSpot-Event", " deal.creation ")], body)["event_type"], "deal.creation")

    def test_default(self):
        body = edit(QUALIFIED, lambda d: d.pop("eventType"))
        self.assertEqual(parse_webhook([("x-other", "v")], body)["event_type"], "deal.propertyChange")
        body = edit(QUALIFIED, lambda d: d.__setitem__("eventType", ""))
        self.assertEqual(parse_webhook([], body)["event_type"], "deal.propertyChange")

    def test_non_string_event_type(self):
        body = edit(QUALIFIED, lambda d: d.__setitem__("eventType", 7))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "eventType")


class Amount(unittest.TestCase):
    def amount(self, value):
        return parse_webhook([], edit(QUALIFIED, lambda d: d["properties"].__setitem__("amount", value)))["deal"]["value"]

    def test_numeric_strings_and_numbers(self):
        self.assertEqual(self.amount("12500000.00"), 12500000.0)
        self.assertEqual(self.amount(" 99.5 "), 99.5)
        self.assertEqual(self.amount(1000), 1000.0)
        self.assertEqual(self.amount("0"), 0.0)

    def test_absent_or_blank_is_none(self):
        self.assertIsNone(self.amount(None))
        self.assertIsNone(self.amount(""))
        body = edit(QUALIFIED, lambda d: d["properties"].pop("amount"))
        self.assertIsNone(parse_webhook([], body)["deal"]["value"])

    def test_invalid_amount(self):
        for bad in ["lots", "12,500", "1_000", "NaN", "inf", True, [], {}]:
            with self.assertRaises(InvalidField, msg=repr(bad)) as c:
                self.amount(bad)
            self.assertEqual((c.exception.field, c.exception.expected), ("properties.amount", "a number"))

    def test_negative_amount(self):
        with self.assertRaises(InvalidField) as c:
            self.amount("-5")
        self.assertEqual((c.exception.field, c.exception.expected), ("properties.amount", "a non-negative number"))


class OtherFields(unittest.TestCase):
    def test_currency_is_upper_cased_and_checked(self):
        body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("deal_currency_code", " eur "))
        self.assertEqual(parse_webhook([], body)["deal"]["currency"], "EUR")
        body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("deal_currency_code", "dollars"))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "properties.deal_currency_code")

    def test_closedate_epoch_millis_becomes_iso_date(self):
        for v in ["1773532800000", 1773532800000]:
            body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("closedate", v))
            self.assertEqual(parse_webhook([], body)["deal"]["closing_date"], "2026-03-15")

    def test_closedate_string_kept_as_sent(self):
        body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("closedate", "2026-03-15T00:00:00Z"))
        self.assertEqual(parse_webhook([], body)["deal"]["closing_date"], "2026-03-15T00:00:00Z")

    def test_only_required_fields(self):
        body = b'{"objectId": 5, "properties": {"dealstage": "closedwon"}}'
        e = parse_webhook([], body)
        self.assertEqual(e["reference"], "hubspot-deal-5")
        self.assertEqual(e["status"], "Committed")
        self.assertTrue(all(v is None for v in e["customer"].values()))
        self.assertTrue(all(v is None for v in e["deal"].values()))
        self.assertIsNone(e["property"])

    def test_blank_strings_are_none(self):
        body = edit(QUALIFIED, lambda d: d["contact"].__setitem__("email", ""))
        self.assertIsNone(parse_webhook([], body)["customer"]["email"])

    def test_mobilephone_fallback(self):
        def fn(d):
            d["contact"].pop("phone")
            d["contact"]["mobilephone"] = "+1 555 0100"

        self.assertEqual(parse_webhook([], edit(QUALIFIED, fn))["customer"]["phone"], "+1 555 0100")

    def test_numeric_zip_kept_as_written(self):
        body = edit(QUALIFIED, lambda d: d["property"].__setitem__("zip", 90210))
        self.assertEqual(parse_webhook([], body)["property"]["zip_code"], "90210")

    def test_square_feet_string_and_invalid(self):
        body = edit(QUALIFIED, lambda d: d["property"].__setitem__("square_feet", "1500.5"))
        self.assertEqual(parse_webhook([], body)["property"]["square_footage"], 1500.5)
        body = edit(QUALIFIED, lambda d: d["property"].__setitem__("square_feet", "big"))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "property.square_feet")

    def test_wrong_type_string_field_names_path(self):
        body = edit(QUALIFIED, lambda d: d["contact"].__setitem__("email", ["a@b.c"]))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual((c.exception.field, c.exception.expected), ("contact.email", "a string"))

    def test_contact_not_an_object(self):
        body = edit(QUALIFIED, lambda d: d.__setitem__("contact", "John"))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "contact")

    def test_null_property_is_none(self):
        body = edit(QUALIFIED, lambda d: d.__setitem__("property", None))
        self.assertIsNone(parse_webhook([], body)["property"])

    def test_other_object_types_are_refused(self):
        body = edit(QUALIFIED, lambda d: d.__setitem__("objectType", "contact"))
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], body)
        self.assertEqual(c.exception.field, "objectType")
        body = edit(QUALIFIED, lambda d: d.pop("objectType"))
        self.assertEqual(parse_webhook([], body)["reference"], "hubspot-deal-1234567")


class Malformed_(unittest.TestCase):
    def test_not_json(self):
        for bad in [b"deal=1", b"", b"\xff\xfe\x00", b"{", b'{"objectId": NaN}']:
            with self.assertRaises(Malformed, msg=repr(bad)) as c:
                parse_webhook([], bad)
            self.assertIn("not valid JSON", c.exception.message)

    def test_not_an_object(self):
        with self.assertRaises(InvalidField) as c:
            parse_webhook([], b"[1, 2]")
        self.assertEqual((c.exception.field, c.exception.expected), ("body", "a JSON object"))

    def test_deeply_nested_is_malformed_not_a_crash(self):
        # In the component, CPython's recursive JSON parser would exhaust the
        # wasm stack (a trap, not a RecursionError) long before Python notices.
        with self.assertRaises(Malformed) as c:
            parse_webhook([], b"[" * 100000 + b"]" * 100000)
        self.assertIn("nested deeper than 128", c.exception.message)

    def test_depth_limit_boundary(self):
        def body(depth):
            junk = "[" * (depth - 1) + "]" * (depth - 1)  # the root object is level 1
            return edit(QUALIFIED, lambda d: d.__setitem__("junk", "@")).replace(b'"@"', junk.encode())

        self.assertEqual(parse_webhook([], body(mapping.MAX_DEPTH))["status"], "Qualified")
        with self.assertRaises(Malformed):
            parse_webhook([], body(mapping.MAX_DEPTH + 1))

    def test_brackets_inside_strings_do_not_count(self):
        name = '[[[{{{ \\" ' * 100
        body = edit(QUALIFIED, lambda d: d["properties"].__setitem__("dealname", name))
        self.assertEqual(parse_webhook([], body)["deal"]["name"], name)

    def test_lone_surrogates_are_refused_not_passed_on(self):
        # json.loads keeps "\\ud800" as a lone surrogate; a WIT string cannot
        # hold one, so passing it on would trap the component.
        cases = [
            (b'{"objectId": 1, "properties": {"dealstage": "x\\ud800"}}', "properties.dealstage"),
            (b'{"objectId": "\\udc00", "properties": {"dealstage": "x"}}', "objectId"),
            (b'{"eventType": "\\ud800", "objectId": 1, "properties": {"dealstage": "x"}}', "eventType"),
            (b'{"objectId": 1, "properties": {"dealstage": "x", "closedate": "\\ud800"}}', "properties.closedate"),
            (b'{"objectId": 1, "properties": {"dealstage": "x"}, "contact": {"email": "a\\udfff"}}', "contact.email"),
        ]
        for body, field in cases:
            with self.assertRaises(InvalidField, msg=body) as c:
                parse_webhook([], body)
            self.assertEqual((c.exception.field, c.exception.expected), (field, "valid Unicode text"))
        # A proper surrogate pair is one character, and fine.
        e = parse_webhook([], b'{"objectId": 1, "properties": {"dealstage": "x", "dealname": "\\ud83d\\ude00"}}')
        self.assertEqual(e["deal"]["name"], "\U0001F600")

    def test_only_utf8(self):
        with self.assertRaises(Malformed) as c:
            parse_webhook([], QUALIFIED.decode().encode("utf-16"))
        self.assertIn("not UTF-8", c.exception.message)
        body = edit(QUALIFIED, lambda d: d["contact"].__setitem__("firstname", "Zoë"))
        self.assertEqual(parse_webhook([], body)["customer"]["first_name"], "Zoë")

    def test_accepts_bytearray_and_list_of_ints(self):
        self.assertEqual(parse_webhook([], bytearray(QUALIFIED))["status"], "Qualified")
        self.assertEqual(parse_webhook([], list(QUALIFIED))["status"], "Qualified")


BINDINGS = os.path.join(HERE, "bindings")


@unittest.skipUnless(os.path.isdir(os.path.join(BINDINGS, "wit_world")), "no bindings/ (build.sh generates them)")
class AppWiring(unittest.TestCase):
    """app.py against the stub bindings `componentize-py bindings` writes:
    same dataclasses as in the component, imports that raise NotImplementedError."""

    @classmethod
    def setUpClass(cls):
        import sys

        if BINDINGS not in sys.path:
            sys.path.append(BINDINGS)
        import app
        from wit_world.imports import log, types
        from componentize_py_types import Err

        cls.app, cls.types, cls.Err = app, types, Err
        cls.logged = []
        cls._real_log = log.log
        log.log = lambda level, message: cls.logged.append((level, message))
        cls.log_module = log

    @classmethod
    def tearDownClass(cls):
        cls.log_module.log = cls._real_log

    def parse(self, body, headers=()):
        hs = [self.types.Header(name=n, value=v) for n, v in headers]
        return self.app.WitWorld().parse(hs, body)

    def test_event_uses_binding_types(self):
        t = self.types
        e = self.parse(QUALIFIED)
        self.assertIsInstance(e, t.CrmEvent)
        self.assertIsInstance(e.customer, t.Customer)
        self.assertIsInstance(e.deal, t.Deal)
        self.assertIsInstance(e.property, t.Property)
        self.assertEqual((e.reference, e.status, e.received_at), ("hubspot-deal-1234567", "Qualified", 0))
        self.assertEqual(e.deal.value, 12500000.0)
        self.assertEqual(e.property.zip_code, "90210")

    def test_errors_are_raised_as_err_variants(self):
        t = self.types
        with self.assertRaises(self.Err) as c:
            self.parse(b"nope")
        self.assertIsInstance(c.exception.value, t.ParseError_Malformed)
        with self.assertRaises(self.Err) as c:
            self.parse(b'{"properties": {"dealstage": "x"}}')
        self.assertEqual(c.exception.value, t.ParseError_MissingField("objectId"))
        with self.assertRaises(self.Err) as c:
            self.parse(edit(QUALIFIED, lambda d: d["properties"].__setitem__("amount", "lots")))
        self.assertEqual(
            c.exception.value,
            t.ParseError_InvalidField(t.FieldError(field="properties.amount", expected="a number")),
        )

    def test_unmapped_stage_is_logged(self):
        self.logged.clear()
        e = self.parse(edit(QUALIFIED, lambda d: d["properties"].__setitem__("dealstage", "closedlost")))
        self.assertEqual(e.status, "closedlost")
        self.assertEqual(len(self.logged), 1)
        self.assertIn("closedlost", self.logged[0][1])


class StageTable(unittest.TestCase):
    def test_stage_table_targets_default_routes(self):
        self.assertEqual(set(mapping.STAGE_TO_STATUS.values()), {"Qualified", "Committed"})


if __name__ == "__main__":
    unittest.main()
