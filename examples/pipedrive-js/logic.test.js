// Run from this folder: node --test
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { checkBasicAuth, dealEvents, fromBase64, parseMap, Problem } from "./logic.js";

const payload = (name) => readFileSync(new URL(`./payloads/${name}`, import.meta.url));
const bytes = (value) => new TextEncoder().encode(typeof value === "string" ? value : JSON.stringify(value));
const statuses = parseMap("won=Committed");
const stages = parseMap("3=Qualified");
const basic = (credentials) => [{ name: "authorization", value: `Basic ${Buffer.from(credentials).toString("base64")}` }];

test("a won deal is Committed, with its value and the change's time", () => {
  const [event] = dealEvents(payload("deal-won.json"), statuses, stages);
  assert.deepEqual(event, {
    eventType: "deal_updated", reference: "42", status: "Committed", contactId: "3", dealName: "Harbor View Offices",
    value: 480000, currency: "USD", occurredAt: 1764806400,
  });
});

test("a deal moved to a mapped stage is Qualified; other changes make no event", () => {
  assert.equal(dealEvents(payload("deal-stage-changed.json"), statuses, stages)[0].status, "Qualified");
  const renamed = JSON.parse(readFileSync(new URL("./payloads/deal-won.json", import.meta.url)));
  renamed.previous = { title: "Old name" };
  assert.deepEqual(dealEvents(bytes(renamed), statuses, stages), []);
  const person = { ...renamed, meta: { ...renamed.meta, entity: "person" } };
  assert.deepEqual(dealEvents(bytes(person), statuses, stages), []);
  assert.deepEqual(dealEvents(payload("deal-stage-changed.json"), statuses, parseMap("")), [], "stage 3 unmapped");
});

test("problems name their field", () => {
  const problem = (body) => {
    try {
      dealEvents(bytes(body), statuses, stages);
    } catch (p) {
      assert.ok(p instanceof Problem);
      return [p.kind, p.field];
    }
    return null;
  };
  assert.deepEqual(problem({ data: {} }), ["missing", "meta"]);
  assert.deepEqual(problem({ meta: { action: "create", entity: "deal" } }), ["missing", "data"]);
  assert.deepEqual(problem({ meta: { action: "create", entity: "deal" }, data: { status: "won" } }), ["missing", "data.id"]);
  assert.deepEqual(problem({ meta: { action: "create", entity: "deal", version: "1.0" }, data: {} }), ["invalid", "meta.version"]);
  assert.deepEqual(problem({ meta: { action: "create", entity: "deal" }, data: { id: 1, status: "won", value: "x" } }), ["invalid", "data.value"]);
});

test("only the configured Basic credentials pass", () => {
  assert.doesNotThrow(() => checkBasicAuth(basic("pipe:s3cret"), "pipe", "s3cret"));
  for (const headers of [basic("pipe:wrong"), basic("pipe:s3cret2"), [], [{ name: "authorization", value: "Bearer x" }]]) {
    assert.throws(() => checkBasicAuth(headers, "pipe", "s3cret"), (p) => p.kind === "unauthenticated");
  }
  assert.throws(() => checkBasicAuth(basic("a:b"), undefined, undefined), (p) => p.kind === "unavailable");
  assert.equal(fromBase64("cGlwZTpzM2NyZXQ="), "pipe:s3cret");
  assert.equal(fromBase64("not base64!"), null);
});
