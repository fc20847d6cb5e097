// Run from this folder: node --test
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { parseBody, Problem } from "./logic.js";

test("the example payload is one qualified deal", () => {
  const event = parseBody(readFileSync(new URL("./example-payload.json", import.meta.url)));
  assert.deepEqual([event.reference, event.status], ["D-1001", "Qualified"]);
  assert.equal(event.customer.email, "jane.doe@example.com");
  assert.equal(event.deal.value, 250000);
});

test("problems name their field", () => {
  const bytes = (s) => new TextEncoder().encode(s);
  assert.throws(() => parseBody(bytes('{"deal": {"status": "Won"}}')), (p) => p instanceof Problem && p.field === "deal.id");
  assert.throws(
    () => parseBody(bytes('{"deal": {"id": "D", "status": "Won", "value": "lots"}}')),
    (p) => p.kind === "invalid" && p.field === "deal.value",
  );
  assert.throws(() => parseBody(bytes("not json")), (p) => p.kind === "malformed");
});
