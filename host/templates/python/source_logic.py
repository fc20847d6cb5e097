"""The deal event in a webhook body like example-payload.json (plain Python)."""

import json


class Problem(Exception):
    """What is wrong with a body: kind is malformed, missing or invalid."""

    def __init__(self, kind, field="", message=""):
        super().__init__(f"{kind} {field} {message}".strip())
        self.kind, self.field, self.message = kind, field, message


def parse_body(body):
    try:
        root = json.loads(body)
    except ValueError as e:
        raise Problem("malformed", message=f"the body is not JSON: {e}") from None
    if not isinstance(root, dict):
        raise Problem("malformed", message="the body is not a JSON object")
    deal = root.get("deal") if isinstance(root.get("deal"), dict) else {}
    contact = root.get("contact") if isinstance(root.get("contact"), dict) else {}

    def text(obj, key):
        value = obj.get(key)
        return value if isinstance(value, str) else None

    def required(obj, key, field):
        value = text(obj, key)
        if value is None:
            raise Problem("missing", field)
        return value

    value = deal.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise Problem("invalid", "deal.value", "a number")
    return {
        "event_type": text(root, "event") or "deal_updated",
        "reference": required(deal, "id", "deal.id"),
        "status": required(deal, "status", "deal.status"),
        "customer": {k: text(contact, k) for k in ("first_name", "last_name", "email", "phone")},
        "deal": {"name": text(deal, "name"), "value": None if value is None else float(value),
                 "currency": text(deal, "currency")},
    }
