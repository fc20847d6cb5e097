// __NAME__: turns one webhook into the deal event it carries. The logic is
// logic.js, plain JavaScript tested with `node --test`; this module converts
// its result into the contract's types (componentize-js conventions: records
// are objects with camelCase fields, u64 is a BigInt, and a `result` export
// returns its `ok` case and throws its `err` case as {tag, val}).
import { parseBody, Problem } from "./logic.js";

export function parse(request) {
  let e;
  try {
    e = parseBody(request.body);
  } catch (p) {
    if (!(p instanceof Problem)) throw p;
    if (p.kind === "malformed") throw { tag: "malformed", val: p.message };
    if (p.kind === "missing") throw { tag: "missing-field", val: p.field };
    throw { tag: "invalid-field", val: { field: p.field, expected: p.message } };
  }
  return [
    {
      eventType: e.eventType,
      reference: e.reference,
      status: e.status,
      customer: {
        contactId: undefined, firstName: e.customer.firstName, lastName: e.customer.lastName, email: e.customer.email,
        phone: e.customer.phone, city: undefined, state: undefined, zipCode: undefined, country: undefined,
      },
      deal: { name: e.deal.name, value: e.deal.value, currency: e.deal.currency, closingDate: undefined },
      property: undefined,
      occurredAt: undefined,
      leadId: undefined,
      receivedAt: 0n, // set by the host
    },
  ];
}
