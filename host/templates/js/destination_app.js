// __NAME__: posts each deal event to the configured endpoint. The logic is
// logic.js, plain JavaScript tested with `node --test`; this module reads
// the settings and sends through the host's `http` import (componentize-js
// conventions: records are objects with camelCase fields, variants are
// {tag, val}, and an import returning a `result` throws its `err` case).
import { get } from "crm:plugin/config@0.2.0";
import { send } from "crm:plugin/http@0.2.0";
import { log } from "crm:plugin/log@0.2.0";

import { outcomeFor, requestFor } from "./logic.js";

export function deliver(event, action, context) {
  const endpoint = get("endpoint");
  if (!endpoint) return { tag: "permanent", val: { status: undefined, reason: "set __PREFIX___URL" } };
  const request = requestFor(event, action.name, context.idempotencyKey, endpoint, get("token"));
  log("debug", `posting ${action.name} for deal ${event.reference}`);
  let response;
  try {
    response = send(request);
  } catch (e) {
    const why = e?.payload ? JSON.stringify(e.payload) : String(e);
    return { tag: "retryable", val: { status: undefined, reason: `cannot reach ${endpoint}: ${why}`, retryAfterMs: undefined } };
  }
  return outcomeFor(response.status, response.body);
}
