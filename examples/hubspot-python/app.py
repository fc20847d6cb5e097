"""Source plugin for HubSpot app webhooks (world `crm:plugin/source@0.2.0`).

The logic lives in `mapping.py` (plain Python, unit-tested without the
bindings). This module reads the settings, checks the signature, calls
HubSpot's CRM API through the host's `http` import, and converts between
`mapping`'s plain values and the WIT types componentize-py generates as the
`wit_world` package at build time.
"""

# Import everything at module level: componentize-py snapshots the interpreter
# after importing this module, so these cost nothing per call.
import json
import traceback

import wit_world
from wit_world.imports import config, http, log, types
from componentize_py_types import Err

import mapping

DEFAULT_API_URL = "https://api.hubapi.com"


def _setting(key, variable):
    value = config.get(key)
    if value is None or not value.strip():
        raise mapping.Unavailable(f"HubSpot is not configured: set {variable}")
    return value.strip()


def _call(api_url, token, path, body):
    """POST a CRM API request; its JSON answer, or Unavailable (HubSpot then
    sends the webhook again later)."""
    request = http.Request(
        method="POST",
        url=api_url.rstrip("/") + path,
        headers=[
            types.Header(name="authorization", value=f"Bearer {token}"),
            types.Header(name="content-type", value="application/json"),
        ],
        body=json.dumps(body).encode(),
    )
    try:
        response = http.send(request)
    except Err as e:
        raise mapping.Unavailable(f"cannot reach HubSpot's API ({path}): {e.value}") from None
    if response.status not in (200, 207):
        excerpt = bytes(response.body[:300]).decode("utf-8", "replace")
        raise mapping.Unavailable(f"HubSpot's API answered {response.status} to {path}: {excerpt}")
    return mapping.load_json(response.body, what=f"HubSpot's answer to {path}")


def enriched_events(request):
    """The request's deal events, with the deals and contacts fetched."""
    headers = {h.name.lower(): h.value for h in request.headers}
    secret = _setting("client_secret", "HUBSPOT_CLIENT_SECRET")
    mapping.verify_signature(secret, request.method, request.url, headers, request.body, request.received_at_ms)
    changes = mapping.deal_changes(request.body)
    if not changes:
        return []
    token = _setting("access_token", "HUBSPOT_ACCESS_TOKEN")
    api_url = config.get("api_url") or DEFAULT_API_URL
    stage_map = mapping.parse_stage_map(config.get("stage_map"))
    lead_id_property = config.get("lead_id_property")

    deal_ids = [c["deal_id"] for c in changes]
    deals = mapping.objects_by_id(_call(api_url, token, *mapping.deals_request(deal_ids)), "deals")
    contacts_by_deal = mapping.contacts_of(_call(api_url, token, *mapping.associations_request(deal_ids)))
    # The first contact of each deal: at most one per deal, so at most 100,
    # HubSpot's limit for one batch read.
    contact_ids = [ids[0] for ids in contacts_by_deal.values() if ids]
    contacts = {}
    if contact_ids:
        extra = [lead_id_property] if lead_id_property else []
        answer = _call(api_url, token, *mapping.contacts_request(contact_ids, extra))
        contacts = mapping.objects_by_id(answer, "contacts")
    for missing in sorted({c["deal_id"] for c in changes} - deals.keys()):
        log.log(log.Level.WARN, f"deal {missing} is not in HubSpot any more; its event is left out")
    return mapping.build_events(changes, deals, contacts_by_deal, contacts, stage_map, lead_id_property)


def _to_event(e):
    c = e["customer"]
    d = e["deal"]
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
            city=c["city"],
            state=c["state"],
            zip_code=c["zip_code"],
            country=c["country"],
        ),
        deal=types.Deal(name=d["name"], value=d["value"], currency=d["currency"], closing_date=d["closing_date"]),
        property=None,
        occurred_at=e["occurred_at"],
        lead_id=e["lead_id"],
        received_at=e["received_at"],
    )


def _to_error(f):
    if isinstance(f, mapping.Unauthenticated):
        return types.ParseError_Unauthenticated(f.reason)
    if isinstance(f, mapping.Unavailable):
        return types.ParseError_Unavailable(f.reason)
    if isinstance(f, mapping.Malformed):
        return types.ParseError_Malformed(f.message)
    if isinstance(f, mapping.MissingField):
        return types.ParseError_MissingField(f.field)
    return types.ParseError_InvalidField(types.FieldError(field=f.field, expected=f.expected))


class WitWorld(wit_world.WitWorld):
    def parse(self, request):
        try:
            return [_to_event(e) for e in enriched_events(request)]
        except mapping.ParseFailure as f:
            # componentize-py: a `result` export returns its `err` case by
            # raising componentize_py_types.Err(value).
            raise Err(_to_error(f))
        except Exception:
            # A bug: say where in the host's log (stderr goes nowhere), and
            # answer 503 so HubSpot sends the webhook again once it is fixed.
            log.log(log.Level.ERROR, traceback.format_exc())
            raise Err(types.ParseError_Unavailable("the HubSpot plugin failed; see the host's log"))
