// Run from this folder: node --test
import assert from "node:assert/strict";
import { test } from "node:test";

import { outcomeFor, requestFor } from "./logic.js";

test("the request carries the deal and the idempotency key", () => {
  const event = { eventType: "deal_updated", reference: "D-1", status: "Won", deal: { value: 10 }, customer: { email: "a@example.com" } };
  const request = requestFor(event, "notify", "key-1", "https://x.example/hook", "t0ken");
  assert.equal(request.url, "https://x.example/hook");
  assert.deepEqual(request.headers[1], { name: "idempotency-key", value: "key-1" });
  assert.deepEqual(request.headers[2], { name: "authorization", value: "Bearer t0ken" });
  assert.equal(JSON.parse(new TextDecoder().decode(request.body)).deal.id, "D-1");
});

test("answers are classified by status", () => {
  const bytes = (s) => new TextEncoder().encode(s);
  assert.equal(outcomeFor(201, bytes("ok")).tag, "delivered");
  assert.equal(outcomeFor(503, bytes("")).tag, "retryable");
  assert.deepEqual(outcomeFor(400, bytes("bad")), { tag: "permanent", val: { status: 400, reason: "bad" } });
});
