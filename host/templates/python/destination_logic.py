"""The request for one action, and what its answer means (plain Python)."""

import json


def request_for(fields, action, idempotency_key, endpoint, token):
    """(url, headers, body) of the POST for one action."""
    body = {
        "action": action,
        "event": fields["event_type"],
        "deal": {"id": fields["reference"], "status": fields["status"], "name": fields["deal_name"],
                 "value": fields["deal_value"]},
        "contact": {"email": fields["email"]},
    }
    headers = [("content-type", "application/json"), ("idempotency-key", idempotency_key)]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    return endpoint, headers, json.dumps(body).encode()


def outcome_for(status, body):
    """2xx delivered; 408, 429 and 5xx retryable; anything else permanent."""
    detail = body[:200].decode("utf-8", "replace")
    if 200 <= status < 300:
        return "delivered", detail
    if status in (408, 429) or 500 <= status < 600:
        return "retryable", detail
    return "permanent", detail
