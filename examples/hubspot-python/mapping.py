"""HubSpot app webhooks -> normalized crm-events, in plain Python.

HubSpot posts a JSON array of up to 100 events, each carrying ids only, and
signs the request (`X-HubSpot-Signature-v3`). This module checks the
signature, picks the deal-stage events out of the batch, builds the three
HubSpot CRM API requests that fetch what the events leave out (the deals,
their associated contacts, and those contacts), and turns the answers into
events. It sends nothing itself: `app.py` does, through the host's `http`
import. Nothing here imports the WIT bindings, so the whole mapping is tested
with `python -m unittest` on an ordinary interpreter.

Events are dicts shaped like the WIT `crm-event` record (keys are the
snake_case field names the bindings use). Failures are raised as:

* `Unauthenticated(reason)`      -> parse-error::unauthenticated (401)
* `Unavailable(reason)`          -> parse-error::unavailable (503: HubSpot retries)
* `Malformed(message)`           -> parse-error::malformed (400)
* `MissingField(path)`           -> parse-error::missing-field (400)
* `InvalidField(path, expected)` -> parse-error::invalid-field (400)
"""

import base64
import hashlib
import hmac
import json
import math
import re
from datetime import datetime, timezone
from itertools import accumulate

#: HubSpot's own rule: refuse a request whose timestamp is older than this.
MAX_SIGNATURE_AGE_MS = 5 * 60 * 1000

#: Stage ids -> the statuses the default routing table acts on, unless
#: HUBSPOT_STAGE_MAP says otherwise. Other stages pass through as sent.
DEFAULT_STAGE_MAP = "qualifiedtobuy=Qualified,closedwon=Committed"

#: The deal events this source turns into crm-events.
DEAL_CREATION = "deal.creation"
DEAL_PROPERTY_CHANGE = "deal.propertyChange"

DEAL_PROPERTIES = ["dealname", "amount", "deal_currency_code", "closedate", "dealstage", "pipeline"]
CONTACT_PROPERTIES = ["email", "firstname", "lastname", "phone", "mobilephone", "city", "state", "zip", "country"]


class ParseFailure(Exception):
    """Base of the ways a webhook is refused."""


class Unauthenticated(ParseFailure):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Unavailable(ParseFailure):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Malformed(ParseFailure):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


class MissingField(ParseFailure):
    def __init__(self, field):
        super().__init__(f"missing field {field}")
        self.field = field


class InvalidField(ParseFailure):
    def __init__(self, field, expected):
        super().__init__(f"invalid field {field}: expected {expected}")
        self.field = field
        self.expected = expected


# ---- The signature ----------------------------------------------------------

#: Characters HubSpot decodes in the URI before signing (its v3 rules).
_URI_DECODED = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}
_URI_ENCODED = re.compile("|".join(_URI_DECODED), re.IGNORECASE)


def signed_uri(url):
    """The URI as HubSpot signs it: the listed escapes decoded."""
    return _URI_ENCODED.sub(lambda m: _URI_DECODED[m.group(0).upper()], url)


def signature(secret, method, url, body, timestamp):
    """X-HubSpot-Signature-v3: base64 of HMAC-SHA256, keyed by the app's client
    secret, over method + URI + body + timestamp (UTF-8)."""
    source = method.encode() + signed_uri(url).encode() + bytes(body) + str(timestamp).encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


def verify_signature(secret, method, url, headers, body, now_ms):
    """Raise Unauthenticated unless the request is signed with `secret` within
    the last five minutes. `headers`: a dict with lower-case names."""
    given = headers.get("x-hubspot-signature-v3")
    stamp = headers.get("x-hubspot-request-timestamp")
    if not given or not stamp:
        raise Unauthenticated("no X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp header")
    try:
        timestamp = int(stamp.strip())
    except ValueError:
        raise Unauthenticated("X-HubSpot-Request-Timestamp is not a number") from None
    if abs(now_ms - timestamp) > MAX_SIGNATURE_AGE_MS:
        raise Unauthenticated(f"the request is signed {abs(now_ms - timestamp) // 1000} s from now; more than 5 minutes")
    expected = signature(secret, method, url, body, stamp.strip())
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise Unauthenticated("X-HubSpot-Signature-v3 does not match")


# ---- The batch ----------------------------------------------------------------

#: Deepest nesting of arrays/objects accepted (serde_json's default limit).
#: CPython's JSON parser recurses per level; inside the component a few
#: thousand levels exhaust the wasm stack and trap instead of raising
#: RecursionError, so depth is checked before parsing.
MAX_DEPTH = 128

# JSON strings: removed first, so brackets inside them do not count.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
# Opening bracket -> byte 1, closing -> byte 255 (-1 as a signed byte).
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[{]}")


def nesting_depth(text):
    """Deepest nesting of arrays/objects in JSON text, without recursing (all
    passes are C-level: a Python loop per bracket would be slow in the
    component)."""
    without_strings = _JSON_STRING.sub("", text).encode()
    steps = without_strings.translate(_BRACKET_STEP, _NOT_BRACKET)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def _reject_constant(name):
    # json.loads accepts NaN / Infinity / -Infinity by default; JSON does not.
    raise ValueError(f"{name} is not valid JSON")


def load_json(body, what="body"):
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"{what} is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise Malformed(f"{what} is not valid JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise Malformed(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise Malformed(f"{what} is not valid JSON: nested too deeply") from None


def _text(value, path):
    """`value` if it can cross the component boundary: JSON may carry lone
    surrogates, which a WIT string (UTF-8) cannot hold."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidField(path, "valid Unicode text") from None
    return value


def object_id(value, path):
    """An id: an integer or a non-empty string, as a string."""
    if value is None:
        raise MissingField(path)
    if isinstance(value, bool):
        raise InvalidField(path, "an integer or a non-empty string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return _text(value.strip(), path)
    raise InvalidField(path, "an integer or a non-empty string")


def deal_changes(body):
    """The deal-stage changes in a webhook: for each `deal.creation` and each
    `deal.propertyChange` of `dealstage`, a dict {deal_id, event_type, stage
    (None for a creation: read from the deal), occurred_at_ms}. Other events
    of the batch are left out."""
    root = load_json(body)
    if isinstance(root, dict):
        root = [root]  # a single event, as HubSpot's test button sends
    if not isinstance(root, list):
        raise Malformed("body is not the JSON array of events HubSpot sends")
    changes = []
    for i, event in enumerate(root):
        if not isinstance(event, dict):
            raise InvalidField(f"[{i}]", "an event object")
        kind = event.get("subscriptionType")
        if kind is None:
            raise MissingField(f"[{i}].subscriptionType")
        if kind == DEAL_CREATION:
            stage = None
        elif kind == DEAL_PROPERTY_CHANGE and event.get("propertyName") == "dealstage":
            stage = event.get("propertyValue")
            if not isinstance(stage, str) or not stage.strip():
                raise InvalidField(f"[{i}].propertyValue", "the new deal stage's id")
            stage = _text(stage.strip(), f"[{i}].propertyValue")
        else:
            continue
        occurred = event.get("occurredAt")
        if occurred is not None and (isinstance(occurred, bool) or not isinstance(occurred, int)):
            raise InvalidField(f"[{i}].occurredAt", "epoch milliseconds")
        changes.append({
            "deal_id": object_id(event.get("objectId"), f"[{i}].objectId"),
            "event_type": kind,
            "stage": stage,
            "occurred_at_ms": occurred,
        })
    # HubSpot does not promise to send events in the order they happened:
    # events are accepted (and a deal's stages sent on) in occurredAt order.
    changes.sort(key=lambda c: (c["occurred_at_ms"] is None, c["occurred_at_ms"] or 0))
    return changes


# ---- The CRM API ----------------------------------------------------------------

def deals_request(deal_ids):
    """POST path and body reading the deals, with the properties used here."""
    inputs = [{"id": i} for i in dict.fromkeys(deal_ids)]
    return "/crm/v3/objects/deals/batch/read", {"properties": DEAL_PROPERTIES, "inputs": inputs}


def associations_request(deal_ids):
    """POST path and body reading each deal's associated contacts."""
    return "/crm/v4/associations/deals/contacts/batch/read", {"inputs": [{"id": i} for i in dict.fromkeys(deal_ids)]}


def contacts_request(contact_ids, extra_properties=()):
    """POST path and body reading the contacts."""
    properties = CONTACT_PROPERTIES + [p for p in extra_properties if p not in CONTACT_PROPERTIES]
    return "/crm/v3/objects/contacts/batch/read", {
        "properties": properties,
        "inputs": [{"id": i} for i in dict.fromkeys(contact_ids)],
    }


def objects_by_id(answer, what):
    """A batch read's `results`, by id (HubSpot leaves out ids it does not
    have, answering 207 with `errors`)."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list):
        raise Unavailable(f"HubSpot's answer for the {what} has no results list")
    return {str(r.get("id")): r for r in results if isinstance(r, dict)}


def contacts_of(answer):
    """Deal id -> its associated contact ids (the first is the one used),
    from the associations answer."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list):
        raise Unavailable("HubSpot's answer for the associations has no results list")
    out = {}
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("from"), dict):
            continue
        to = [str(t.get("toObjectId")) for t in r.get("to") or [] if isinstance(t, dict) and t.get("toObjectId") is not None]
        out[str(r["from"].get("id"))] = to
    return out


def parse_stage_map(text):
    """"stage=Status,stage=Status" -> {stage id (lower-case): status}."""
    stages = {}
    for entry in (text or DEFAULT_STAGE_MAP).split(","):
        if not entry.strip():
            continue
        stage, sep, status = entry.partition("=")
        if not sep or not stage.strip() or not status.strip():
            raise Unavailable(f"HUBSPOT_STAGE_MAP entry {entry.strip()!r} must look like stageid=Status")
        stages[stage.strip().lower()] = status.strip()
    return stages


def _prop(obj, key):
    """A HubSpot property: every value is a string; "" means unset."""
    value = (obj.get("properties") or {}).get(key)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        value = str(int(value)) if float(value).is_integer() else repr(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return _text(value.strip(), f"properties.{key}")


def amount(deal):
    value = _prop(deal, "amount")
    if value is None:
        return None
    try:
        n = float(value)
    except ValueError:
        return None
    return n if math.isfinite(n) and n >= 0 else None


def closing_date(deal):
    """`closedate` as a date: HubSpot sends an ISO 8601 time or epoch ms."""
    value = _prop(deal, "closedate")
    if value is None:
        return None
    if value.isdigit():
        try:
            return datetime.fromtimestamp(int(value) / 1000, tz=timezone.utc).date().isoformat()
        except (OverflowError, OSError, ValueError):
            return None
    return value[:10]


def currency(deal):
    code = _prop(deal, "deal_currency_code")
    if code is None:
        return None
    code = code.upper()
    return code if len(code) == 3 and code.isascii() and code.isalpha() else None


def build_events(changes, deals, contacts_by_deal, contacts, stage_map, lead_id_property=None):
    """The crm-events for `changes`, enriched from the API answers (already
    indexed by id). A deal HubSpot no longer has is left out."""
    events = []
    for change in changes:
        deal = deals.get(change["deal_id"])
        if deal is None:
            continue
        stage = change["stage"] or _prop(deal, "dealstage")
        if not stage:
            continue
        contact_ids = contacts_by_deal.get(change["deal_id"]) or []
        contact = next((contacts[c] for c in contact_ids if c in contacts), {})
        lead_id = None
        if lead_id_property:
            lead_id = _prop(contact, lead_id_property) or _prop(deal, lead_id_property)
        occurred = change["occurred_at_ms"]
        events.append({
            "event_type": change["event_type"],
            "reference": change["deal_id"],
            "status": stage_map.get(stage.lower(), stage),
            "customer": {
                "contact_id": str(contact["id"]) if contact.get("id") is not None else None,
                "first_name": _prop(contact, "firstname"),
                "last_name": _prop(contact, "lastname"),
                "email": _prop(contact, "email"),
                "phone": _prop(contact, "phone") or _prop(contact, "mobilephone"),
                "city": _prop(contact, "city"),
                "state": _prop(contact, "state"),
                "zip_code": _prop(contact, "zip"),
                "country": _prop(contact, "country"),
            },
            "deal": {
                "name": _prop(deal, "dealname"),
                "value": amount(deal),
                "currency": currency(deal),
                "closing_date": closing_date(deal),
            },
            "property": None,
            "occurred_at": occurred // 1000 if occurred is not None else None,
            "lead_id": lead_id,
            # Filled in by the host; a source's value is ignored.
            "received_at": 0,
        })
    return events
