"""HubSpot-like deal webhook -> normalized crm-event, in plain Python.

Nothing here imports the WIT bindings, so the whole mapping is tested with
`python -m unittest` on an ordinary interpreter. `app.py` turns the plain
values this module returns (and the errors it raises) into the binding types.

`parse_webhook` returns a dict shaped like the WIT `crm-event` record (keys are
the snake_case field names the bindings use) or raises one of:

* `Malformed(message)`          -> parse-error::malformed
* `MissingField(path)`          -> parse-error::missing-field
* `InvalidField(path, expected)` -> parse-error::invalid-field
"""

import json
import math
import re
from datetime import datetime, timezone
from itertools import accumulate

#: Prefix of every reference, so HubSpot deal ids never collide with another
#: provider's ids in the receipt store.
REFERENCE_PREFIX = "hubspot-deal-"

#: Event type when neither the body's `eventType` nor the header says one.
DEFAULT_EVENT_TYPE = "deal.propertyChange"

#: Header consulted when the body has no `eventType`.
EVENT_HEADER = "x-hubspot-event"

#: HubSpot pipeline stage ids (lower-case) -> the normalized statuses the
#: default routing table acts on. Every other stage passes through as sent:
#: it is stored, and no route matches it.
STAGE_TO_STATUS = {
    "qualifiedtobuy": "Qualified",
    "contractsent": "Committed",
    "closedwon": "Committed",
}


class ParseFailure(Exception):
    """Base of the three ways a webhook is refused."""


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


#: Deepest nesting of arrays/objects accepted (serde_json's default limit, so
#: the Rust plugins and this one agree). CPython's JSON parser recurses per
#: level; inside the component a few thousand levels exhaust the wasm stack and
#: trap instead of raising RecursionError, so depth is checked before parsing.
MAX_DEPTH = 128

# JSON strings: removed first, so brackets inside them do not count.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
# Opening bracket -> byte 1, closing -> byte 255 (-1 as a signed byte).
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[{]}")


def nesting_depth(text):
    """Deepest nesting of arrays/objects in JSON text, without recursing.

    All passes are C-level (one regex, bytes.translate, accumulate): a Python
    loop over every bracket would cost ~0.2 s per MiB of small objects
    natively, and several times that inside the component."""
    without_strings = _JSON_STRING.sub("", text).encode()
    steps = without_strings.translate(_BRACKET_STEP, _NOT_BRACKET)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def _check_depth(text):
    if nesting_depth(text) > MAX_DEPTH:
        raise Malformed(f"body is not valid JSON: nested deeper than {MAX_DEPTH} levels")


def _reject_constant(name):
    # json.loads accepts NaN / Infinity / -Infinity by default; JSON does not.
    raise ValueError(f"{name} is not valid JSON")


def _load_json(body):
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"body is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    _check_depth(text)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise Malformed(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise Malformed("body is not valid JSON: nested too deeply") from None


def _text(value, path):
    """`value` if it can cross the component boundary. JSON may carry lone
    surrogates ("\\ud800"), which json.loads keeps but a WIT string (UTF-8)
    cannot hold: lowering one would trap the component instead of answering."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidField(path, "valid Unicode text") from None
    return value


def _object(value, path):
    if not isinstance(value, dict):
        raise InvalidField(path, "a JSON object")
    return value


def _optional_object(obj, key, path):
    value = obj.get(key)
    if value is None:
        return None
    return _object(value, path)


def optional_string(obj, key, path):
    """A string field. Numbers are kept as written (ids, zip codes); an absent,
    null or blank value (HubSpot sends "" for an unset property) is None."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidField(path, "a string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_number(value)
    if not isinstance(value, str):
        raise InvalidField(path, "a string")
    return _text(value, path) if value.strip() else None


def _format_number(n):
    """A JSON number as written: 15000.0 -> "15000", 1.5 -> "1.5"."""
    if n.is_integer():
        return str(int(n))
    return repr(n)


def optional_number(obj, key, path, expected="a non-negative number"):
    """A number field; numeric strings such as "12500000" (HubSpot sends every
    property as a string) are accepted. Absent, null or "" is None."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidField(path, expected)
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if "_" in text:  # float() would accept "1_000"; JSON-ish numbers do not
            raise InvalidField(path, expected)
        try:
            n = float(text)
        except ValueError:
            raise InvalidField(path, expected) from None
    else:
        raise InvalidField(path, expected)
    if not math.isfinite(n):
        raise InvalidField(path, expected)
    if n < 0:
        raise InvalidField(path, "a non-negative number")
    return n


def deal_reference(root):
    """`objectId` (integer or non-empty string) -> "hubspot-deal-<id>"."""
    value = root.get("objectId")
    if value is None:
        raise MissingField("objectId")
    if isinstance(value, bool):
        raise InvalidField("objectId", "an integer or a non-empty string")
    if isinstance(value, int):
        object_id = str(value)
    elif isinstance(value, float) and value.is_integer():
        object_id = str(int(value))
    elif isinstance(value, str) and value.strip():
        object_id = _text(value.strip(), "objectId")
    else:
        raise InvalidField("objectId", "an integer or a non-empty string")
    return REFERENCE_PREFIX + object_id


def status_for_stage(stage):
    """Map a HubSpot `dealstage` to the normalized status (case-insensitive);
    unknown stages pass through as sent (trimmed)."""
    stage = stage.strip()
    return STAGE_TO_STATUS.get(stage.lower(), stage)


def deal_status(properties):
    if properties is None:
        raise MissingField("properties.dealstage")
    value = properties.get("dealstage")
    if value is None:
        raise MissingField("properties.dealstage")
    if not isinstance(value, str) or not value.strip():
        raise InvalidField("properties.dealstage", "a non-empty string")
    return status_for_stage(_text(value, "properties.dealstage"))


def event_type(root, headers):
    """The body's `eventType`, else the `x-hubspot-event` header, else
    "deal.propertyChange". `headers` is a list of (name, value) pairs."""
    value = root.get("eventType")
    if value is not None:
        if not isinstance(value, str):
            raise InvalidField("eventType", "a string")
        if value.strip():
            return _text(value.strip(), "eventType")
    for name, header_value in headers:
        if name.lower() == EVENT_HEADER and header_value.strip():
            return header_value.strip()
    return DEFAULT_EVENT_TYPE


def closing_date(properties):
    """`closedate` as sent when it is a date string; HubSpot's epoch
    milliseconds ("1773532800000" or a number) become an ISO 8601 date."""
    path = "properties.closedate"
    value = properties.get("closedate")
    if value is None or isinstance(value, str) and not value.strip():
        return None
    millis = None
    if isinstance(value, bool):
        raise InvalidField(path, "an ISO 8601 date or epoch milliseconds")
    if isinstance(value, int):
        millis = value
    elif isinstance(value, str) and value.strip().isdigit():
        millis = int(value.strip())
    elif isinstance(value, str):
        return _text(value.strip(), path)
    else:
        raise InvalidField(path, "an ISO 8601 date or epoch milliseconds")
    try:
        return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).date().isoformat()
    except (OverflowError, OSError, ValueError):
        raise InvalidField(path, "an ISO 8601 date or epoch milliseconds") from None


def currency(properties):
    code = optional_string(properties, "deal_currency_code", "properties.deal_currency_code")
    if code is None:
        return None
    code = code.strip().upper()
    if len(code) != 3 or not (code.isascii() and code.isalpha()):
        raise InvalidField("properties.deal_currency_code", "a three-letter ISO 4217 code")
    return code


def customer(root):
    contact = _optional_object(root, "contact", "contact") or {}

    def s(key):
        return optional_string(contact, key, f"contact.{key}")

    return {
        "contact_id": s("hs_object_id"),
        "first_name": s("firstname"),
        "last_name": s("lastname"),
        "email": s("email"),
        "phone": s("phone") or s("mobilephone"),
    }


def deal(properties):
    return {
        "name": optional_string(properties, "dealname", "properties.dealname"),
        "value": optional_number(properties, "amount", "properties.amount", expected="a number"),
        "currency": currency(properties),
        "closing_date": closing_date(properties),
    }


def property_info(root):
    p = _optional_object(root, "property", "property")
    if p is None:
        return None

    def s(key):
        return optional_string(p, key, f"property.{key}")

    return {
        "id": s("id"),
        "address": s("address"),
        "city": s("city"),
        "state": s("state"),
        "zip_code": s("zip"),
        "property_type": s("type"),
        "square_footage": optional_number(p, "square_feet", "property.square_feet"),
    }


def parse_webhook(headers, body):
    """Parse one webhook. `headers`: (name, value) pairs; `body`: bytes.

    Returns a dict shaped like the WIT crm-event (nested dicts for customer,
    deal and property); raises a ParseFailure naming the field at fault.
    """
    root = _object(_load_json(body), "body")

    object_type = root.get("objectType")
    if object_type is not None and (not isinstance(object_type, str) or object_type.strip().lower() != "deal"):
        raise InvalidField("objectType", '"deal"')

    reference = deal_reference(root)
    properties = _optional_object(root, "properties", "properties")
    status = deal_status(properties)

    return {
        "event_type": event_type(root, headers),
        "reference": reference,
        "status": status,
        "customer": customer(root),
        "deal": deal(properties),
        "property": property_info(root),
        # Filled in by the host; a source's value is ignored.
        "received_at": 0,
    }
