// The request for one action, and what its answer means (plain JavaScript).

/** The POST for one action: the event as JSON, with the job's idempotency key. */
export function requestFor(event, action, idempotencyKey, endpoint, token) {
  const body = {
    action,
    event: event.eventType,
    deal: { id: event.reference, status: event.status, name: event.deal.name ?? null, value: event.deal.value ?? null },
    contact: { email: event.customer.email ?? null },
  };
  const headers = [
    { name: "content-type", value: "application/json" },
    { name: "idempotency-key", value: idempotencyKey },
  ];
  if (token) headers.push({ name: "authorization", value: `Bearer ${token}` });
  return { method: "POST", url: endpoint, headers, body: new TextEncoder().encode(JSON.stringify(body)) };
}

/** 2xx delivered; 408, 429 and 5xx retryable; anything else permanent. */
export function outcomeFor(status, body) {
  const detail = new TextDecoder().decode(body.slice(0, 200));
  if (status >= 200 && status < 300) return { tag: "delivered", val: { status, detail } };
  if (status === 408 || status === 429 || (status >= 500 && status < 600)) {
    return { tag: "retryable", val: { status, reason: detail, retryAfterMs: undefined } };
  }
  return { tag: "permanent", val: { status, reason: detail } };
}
