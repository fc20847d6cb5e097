"""Source plugin for HubSpot-like deal webhooks (world `crm:plugin/source`).

The mapping lives in `mapping.py` (plain Python, unit-tested without the
bindings); this module only converts between it and the WIT types that
componentize-py generates as the `wit_world` package at build time.
"""

# Import everything at module level: componentize-py snapshots the interpreter
# after importing this module, so these cost nothing per call.
import wit_world
from wit_world.imports import log, types
from componentize_py_types import Err

import mapping


def _to_event(e):
    c = e["customer"]
    d = e["deal"]
    p = e["property"]
    return types.CrmEvent(
        event_type=e["event_type"],
        reference=e["reference"],
        status=e["status"],
        customer=types.Customer(
            contact_id=c["contact_id"],
            first_name=c["first_name"],
            last_name=c["last_name"],
            email=c["email"],
            phone=c["phone"],
        ),
        deal=types.Deal(
            name=d["name"],
            value=d["value"],
            currency=d["currency"],
            closing_date=d["closing_date"],
        ),
        property=None
        if p is None
        else types.Property(
            id=p["id"],
            address=p["address"],
            city=p["city"],
            state=p["state"],
            zip_code=p["zip_code"],
            property_type=p["property_type"],
            square_footage=p["square_footage"],
        ),
        received_at=e["received_at"],
    )


def _to_error(f):
    if isinstance(f, mapping.Malformed):
        return types.ParseError_Malformed(f.message)
    if isinstance(f, mapping.MissingField):
        return types.ParseError_MissingField(f.field)
    return types.ParseError_InvalidField(types.FieldError(field=f.field, expected=f.expected))


class WitWorld(wit_world.WitWorld):
    def parse(self, headers, body):
        pairs = [(h.name, h.value) for h in headers]
        try:
            event = mapping.parse_webhook(pairs, body)
        except mapping.ParseFailure as f:
            # componentize-py: a `result` export returns its `err` case by
            # raising componentize_py_types.Err(value).
            raise Err(_to_error(f))
        if event["status"] not in mapping.STAGE_TO_STATUS.values():
            log.log(
                log.Level.DEBUG,
                f"{event['reference']}: dealstage {event['status']!r} has no normalized status; passed through as sent",
            )
        return _to_event(event)
