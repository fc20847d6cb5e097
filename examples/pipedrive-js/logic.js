// Pipedrive webhooks v2 → deal events, as plain JavaScript (tested with
// `node --test`; app.js is the glue to the contract).
//
// A v2 body is {meta, data, previous}: meta.action (create, change, delete),
// meta.entity ("deal"), meta.timestamp (unix seconds); data is the deal as it
// is now (id, title, value, currency, status: open|won|lost, stage_id, ...);
// previous holds the changed fields' old values (null on create).

/** Why a webhook is refused: kind is unauthenticated, unavailable, malformed, missing or invalid. */
export class Problem extends Error {
  constructor(kind, field = "", message = "") {
    super(`${kind} ${field} ${message}`.trim());
    Object.assign(this, { kind, field, message });
  }
}

/** "a=X,b=Y" as a Map (keys as written, trimmed). */
export function parseMap(text) {
  const map = new Map();
  for (const entry of (text ?? "").split(",").map((e) => e.trim()).filter(Boolean)) {
    const at = entry.indexOf("=");
    if (at <= 0) throw new Problem("unavailable", "", `the mapping ${JSON.stringify(entry)} must look like key=Status`);
    map.set(entry.slice(0, at).trim(), entry.slice(at + 1).trim());
  }
  return map;
}

const BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** Decode standard base64 (no engine API needed); null if it is not. */
export function fromBase64(text) {
  const clean = text.replace(/=+$/, "");
  if (!/^[A-Za-z0-9+/]*$/.test(clean) || clean.length % 4 === 1) return null;
  const bytes = [];
  let bits = 0;
  let value = 0;
  for (const ch of clean) {
    value = (value << 6) | BASE64.indexOf(ch);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push((value >> bits) & 0xff);
    }
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

/** Compare without stopping at the first difference. */
function same(a, b) {
  let differs = a.length ^ b.length;
  for (let i = 0; i < Math.max(a.length, b.length); i++) differs |= (a.charCodeAt(i) | 0) ^ (b.charCodeAt(i) | 0);
  return differs === 0;
}

/** Check the Authorization header against the configured user and password. */
export function checkBasicAuth(headers, user, password) {
  if (!user || !password) {
    throw new Problem("unavailable", "", "set PIPEDRIVE_WEBHOOK_USER and PIPEDRIVE_WEBHOOK_PASSWORD");
  }
  const header = headers.find((h) => h.name === "authorization")?.value ?? "";
  const match = /^Basic\s+(\S+)$/i.exec(header);
  const decoded = match ? fromBase64(match[1]) : null;
  if (decoded === null || !same(decoded, `${user}:${password}`)) {
    throw new Problem("unauthenticated", "", header ? "wrong webhook credentials" : "no Basic credentials");
  }
}

/**
 * The deal events in a v2 body: one when a deal is created or its status or
 * stage changed, and the status or stage maps to a status; none otherwise.
 */
export function dealEvents(body, statusMap, stageMap) {
  let root;
  try {
    root = JSON.parse(new TextDecoder().decode(body));
  } catch (e) {
    throw new Problem("malformed", "", `the body is not JSON: ${e.message}`);
  }
  if (root === null || typeof root !== "object") throw new Problem("malformed", "", "the body is not a JSON object");
  const meta = object(root, "meta", "meta");
  if (meta.version !== undefined && String(meta.version) !== "2.0") {
    throw new Problem("invalid", "meta.version", "2.0 (a webhooks v2 subscription)");
  }
  const entity = text(meta, "entity", "meta.entity");
  const action = text(meta, "action", "meta.action");
  if (entity !== "deal" || (action !== "create" && action !== "change")) return [];
  const deal = object(root, "data", "data");
  const previous = root.previous && typeof root.previous === "object" ? root.previous : null;
  if (action === "change" && !(previous && ("status" in previous || "stage_id" in previous))) return [];

  const id = deal.id;
  if (id === undefined || id === null) throw new Problem("missing", "data.id");
  if (typeof id !== "number" && typeof id !== "string") throw new Problem("invalid", "data.id", "a number or string");
  const dealStatus = text(deal, "status", "data.status");
  const stage = deal.stage_id === undefined || deal.stage_id === null ? undefined : String(deal.stage_id);
  const status = statusMap.get(dealStatus) ?? (stage === undefined ? undefined : stageMap.get(stage));
  if (status === undefined) return [];
  if (deal.value !== undefined && deal.value !== null && typeof deal.value !== "number") {
    throw new Problem("invalid", "data.value", "a number");
  }
  const timestamp = meta.timestamp;
  const person = deal.person_id;
  return [
    {
      eventType: action === "create" ? "deal_created" : "deal_updated",
      reference: String(id),
      status,
      // Pipedrive's id of the deal's person: Meta matches on it (external_id).
      contactId: typeof person === "number" || typeof person === "string" ? String(person) : undefined,
      dealName: optionalText(deal, "title"),
      value: deal.value ?? undefined,
      currency: optionalText(deal, "currency")?.toUpperCase(),
      occurredAt: Number.isInteger(timestamp) && timestamp > 0 ? timestamp : undefined,
    },
  ];
}

function object(parent, key, field) {
  const value = parent[key];
  if (value === undefined || value === null) throw new Problem("missing", field);
  if (typeof value !== "object" || Array.isArray(value)) throw new Problem("invalid", field, "an object");
  return value;
}

function text(parent, key, field) {
  const value = parent[key];
  if (value === undefined || value === null) throw new Problem("missing", field);
  if (typeof value !== "string") throw new Problem("invalid", field, "a string");
  return value;
}

function optionalText(parent, key) {
  return typeof parent[key] === "string" ? parent[key] : undefined;
}
