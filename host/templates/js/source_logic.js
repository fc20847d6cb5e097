// The deal event in a webhook body like example-payload.json (plain JavaScript).

/** What is wrong with a body: kind is "malformed", "missing" or "invalid". */
export class Problem extends Error {
  constructor(kind, field = "", message = "") {
    super(`${kind} ${field} ${message}`.trim());
    Object.assign(this, { kind, field, message });
  }
}

export function parseBody(bytes) {
  let root;
  try {
    root = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new Problem("malformed", "", `the body is not JSON: ${e.message}`);
  }
  if (root === null || typeof root !== "object") throw new Problem("malformed", "", "the body is not a JSON object");
  const deal = root.deal && typeof root.deal === "object" ? root.deal : {};
  const contact = root.contact && typeof root.contact === "object" ? root.contact : {};
  const text = (obj, key) => (typeof obj[key] === "string" ? obj[key] : undefined);
  const required = (obj, key, field) => {
    const value = text(obj, key);
    if (value === undefined) throw new Problem("missing", field);
    return value;
  };
  if (deal.value !== undefined && deal.value !== null && typeof deal.value !== "number") {
    throw new Problem("invalid", "deal.value", "a number");
  }
  return {
    eventType: text(root, "event") ?? "deal_updated",
    reference: required(deal, "id", "deal.id"),
    status: required(deal, "status", "deal.status"),
    customer: {
      firstName: text(contact, "first_name"),
      lastName: text(contact, "last_name"),
      email: text(contact, "email"),
      phone: text(contact, "phone"),
    },
    deal: { name: text(deal, "name"), value: deal.value ?? undefined, currency: text(deal, "currency") },
  };
}
