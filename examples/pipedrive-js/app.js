// The Pipedrive source: checks the webhook's HTTP Basic credentials, then
// maps the deal change (logic.js) into the contract's events. Types for
// editors: types/ (generated from the WIT, see README.md).
import { get } from "crm:plugin/config@0.2.0";
import { log } from "crm:plugin/log@0.2.0";

import { checkBasicAuth, dealEvents, parseMap, Problem } from "./logic.js";

/** @param {import("crm:plugin/types@0.2.0").IncomingRequest} request */
export function parse(request) {
  try {
    checkBasicAuth(request.headers, get("webhook_user"), get("webhook_password"));
    const events = dealEvents(request.body, parseMap(get("status_map")), parseMap(get("stage_map")));
    if (events.length === 0) log("debug", "a deal change that maps to no status; nothing to do");
    return events.map(toEvent);
  } catch (p) {
    if (!(p instanceof Problem)) throw p;
    switch (p.kind) {
      case "unauthenticated":
        throw { tag: "unauthenticated", val: p.message };
      case "unavailable":
        throw { tag: "unavailable", val: p.message };
      case "malformed":
        throw { tag: "malformed", val: p.message };
      case "missing":
        throw { tag: "missing-field", val: p.field };
      default:
        throw { tag: "invalid-field", val: { field: p.field, expected: p.message } };
    }
  }
}

/** @returns {import("crm:plugin/types@0.2.0").CrmEvent} */
function toEvent(e) {
  return {
    eventType: e.eventType,
    reference: e.reference,
    status: e.status,
    customer: { contactId: e.contactId },
    deal: { name: e.dealName, value: e.value, currency: e.currency },
    property: undefined,
    occurredAt: e.occurredAt === undefined ? undefined : BigInt(e.occurredAt),
    leadId: undefined,
    receivedAt: 0n, // set by the host
  };
}
