"""__NAME__: posts each deal event to the configured endpoint.

The logic is `logic.py`, plain Python tested with `python -m unittest`; this
module reads the settings and sends through the host's `http` import.
"""

import wit_world
from wit_world.imports import config, http, log, types
from componentize_py_types import Err

import logic


class WitWorld(wit_world.WitWorld):
    def deliver(self, event, action, context):
        endpoint = config.get("endpoint")
        if not endpoint:
            return types.Outcome_Permanent(types.Failure(status=None, reason="set __PREFIX___URL"))
        fields = {"event_type": event.event_type, "reference": event.reference, "status": event.status,
                  "deal_name": event.deal.name, "deal_value": event.deal.value, "email": event.customer.email}
        url, headers, body = logic.request_for(fields, action.name, context.idempotency_key, endpoint, config.get("token"))
        log.log(log.Level.DEBUG, f"posting {action.name} for deal {event.reference}")
        try:
            response = http.send(http.Request(
                method="POST", url=url, headers=[types.Header(name=n, value=v) for n, v in headers], body=body))
        except Err as e:
            return types.Outcome_Retryable(types.Retryable(status=None, reason=f"cannot reach {endpoint}: {e.value}",
                                                           retry_after_ms=None))
        kind, detail = logic.outcome_for(response.status, bytes(response.body))
        if kind == "delivered":
            return types.Outcome_Delivered(types.Delivered(status=response.status, detail=detail))
        if kind == "retryable":
            return types.Outcome_Retryable(types.Retryable(status=response.status, reason=detail, retry_after_ms=None))
        return types.Outcome_Permanent(types.Failure(status=response.status, reason=detail))
