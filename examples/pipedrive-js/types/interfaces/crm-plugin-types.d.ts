declare module 'crm:plugin/types@0.2.0' {
  /**
   * One HTTP header. Names are lower-case as the host passes them.
   */
  export interface Header {
    name: string,
    value: string,
  }
  /**
   * The person on the deal, as the CRM sent it (not yet normalized or hashed:
   * destinations apply their own normalization rules).
   */
  export interface Customer {
    /**
     * The CRM's stable id for the contact.
     */
    contactId?: string,
    firstName?: string,
    lastName?: string,
    email?: string,
    /**
     * As sent, e.g. "+1 (234) 567-890".
     */
    phone?: string,
    /**
     * The customer's own address, as the CRM has it (destinations
     * normalize it).
     */
    city?: string,
    state?: string,
    zipCode?: string,
    /**
     * ISO 3166-1 alpha-2 where the CRM has it, e.g. "US".
     */
    country?: string,
  }
  /**
   * The commercial side of the deal.
   */
  export interface Deal {
    /**
     * Human name of the deal, e.g. "The Grand Cypress Acquisition".
     */
    name?: string,
    /**
     * Deal value in `currency` units.
     */
    value?: number,
    /**
     * ISO 4217 code, upper-case, e.g. "USD".
     */
    currency?: string,
    /**
     * Expected closing date as sent (ISO 8601 date).
     */
    closingDate?: string,
  }
  /**
   * The property the deal is about.
   */
  export interface Property {
    id?: string,
    address?: string,
    city?: string,
    state?: string,
    zipCode?: string,
    propertyType?: string,
    squareFootage?: number,
  }
  /**
   * A CRM deal change, normalized. This is what is stored in the receipt
   * and handed to every destination.
   */
  export interface CrmEvent {
    /**
     * What the CRM said happened, e.g. "deal_created", "deal_updated".
     */
    eventType: string,
    /**
     * The CRM's id for the deal. With `status` it identifies a transition:
     * the host stores one receipt per (provider, reference, status).
     */
    reference: string,
    /**
     * The deal's status after the change, e.g. "Qualified", "Committed".
     */
    status: string,
    customer: Customer,
    deal: Deal,
    property?: Property,
    /**
     * When the deal reached `status`, unix seconds, if the CRM says
     * (e.g. HubSpot's `occurredAt`). Destinations prefer it to
     * `received-at` as the event's time.
     */
    occurredAt?: bigint,
    /**
     * The Meta Lead Ads lead id, when the CRM carries one.
     */
    leadId?: string,
    /**
     * When the host accepted the webhook, unix seconds. Filled in by the
     * host (a source's value is ignored), stable across retries.
     */
    receivedAt: bigint,
  }
  /**
   * A webhook request as the host received it.
   */
  export interface IncomingRequest {
    /**
     * "POST", usually.
     */
    method: string,
    /**
     * The URL as the sender called (and signed) it: the host's
     * `BASE_URL` (else `http://` and the `host` header) plus the path
     * and query, e.g. "https://crm.example.com/api/v1/webhook/hubspot".
     */
    url: string,
    /**
     * Every header, names lower-case. A source the host authenticates
     * (`auth = "host"`) does not get `x-api-key`, `authorization`,
     * `cookie` or `proxy-authorization`; one that authenticates itself
     * (`auth = "plugin"`) gets them all.
     */
    headers: Array<Header>,
    /**
     * The raw body, byte for byte (signatures are computed over it).
     */
    body: Uint8Array,
    /**
     * When the host received it, unix milliseconds.
     */
    receivedAtMs: bigint,
  }
  /**
   * A field that is present but wrong.
   */
  export interface FieldError {
    /**
     * Path of the field, e.g. "data.dealDetails.dealValue".
     */
    field: string,
    /**
     * What was expected, e.g. "a number".
     */
    expected: string,
  }
  /**
   * Why a webhook could not be turned into events. `malformed`,
   * `missing-field` and `invalid-field` answer 400 (codes malformed_body,
   * missing_field, invalid_field; the last two name the field);
   * `unauthenticated` answers 401; `unavailable` answers 503 so the CRM
   * sends the webhook again later.
   */
  export type ParseError = ParseErrorMalformed | ParseErrorMissingField | ParseErrorInvalidField | ParseErrorUnauthenticated | ParseErrorUnavailable;
  /**
   * The body is not what the plugin can read at all (e.g. not JSON).
   */
  export interface ParseErrorMalformed {
    tag: 'malformed',
    val: string,
  }
  /**
   * A required field is absent; the payload is the field's path,
   * e.g. "data.dealId".
   */
  export interface ParseErrorMissingField {
    tag: 'missing-field',
    val: string,
  }
  /**
   * A field is present but of the wrong type or value.
   */
  export interface ParseErrorInvalidField {
    tag: 'invalid-field',
    val: FieldError,
  }
  /**
   * The request is not from who it claims (bad signature, stale
   * timestamp, wrong credentials). The reason is logged, never sent.
   */
  export interface ParseErrorUnauthenticated {
    tag: 'unauthenticated',
    val: string,
  }
  /**
   * Something the plugin needs is down (e.g. the CRM's API, while
   * enriching): try again later.
   */
  export interface ParseErrorUnavailable {
    tag: 'unavailable',
    val: string,
  }
  /**
   * One action a route asks a destination to perform.
   */
  export interface Action {
    /**
     * The action's name as the destination understands it, e.g. "Lead",
     * "Purchase", "property-details-email".
     */
    name: string,
    /**
     * Extra parameters from the routing configuration.
     */
    params: Array<[string, string]>,
  }
  /**
   * Facts about this delivery attempt.
   */
  export interface DeliveryContext {
    /**
     * The receipt this delivery belongs to.
     */
    receiptId: string,
    /**
     * The provider (source plugin) that received the webhook.
     */
    provider: string,
    /**
     * 1 for the first attempt, 2 for the first retry, and so on.
     */
    attempt: number,
    /**
     * Stable for this (provider, deal, status, destination, action)
     * across every retry and replay: use it as the downstream
     * idempotency key / event id.
     */
    idempotencyKey: string,
  }
  /**
   * Details of a successful delivery.
   */
  export interface Delivered {
    /**
     * Downstream HTTP status, if a request was made.
     */
    status?: number,
    /**
     * Short human detail, e.g. the downstream message id.
     */
    detail: string,
  }
  /**
   * Details of a failure that may be retried.
   */
  export interface Retryable {
    status?: number,
    reason: string,
    /**
     * Do not retry before this many milliseconds (e.g. from Retry-After).
     */
    retryAfterMs?: bigint,
  }
  /**
   * Details of a failure that will not be retried.
   */
  export interface Failure {
    status?: number,
    reason: string,
  }
  /**
   * The result of a delivery attempt.
   */
  export type Outcome = OutcomeDelivered | OutcomeRetryable | OutcomePermanent;
  /**
   * Done (or already done before: a downstream "duplicate" counts).
   */
  export interface OutcomeDelivered {
    tag: 'delivered',
    val: Delivered,
  }
  /**
   * Failed, and trying again may work (5xx, 408, 429, timeouts).
   */
  export interface OutcomeRetryable {
    tag: 'retryable',
    val: Retryable,
  }
  /**
   * Failed, and trying again will not help (bad credentials, invalid
   * data). The job is dead-lettered at once with this reason.
   */
  export interface OutcomePermanent {
    tag: 'permanent',
    val: Failure,
  }
}
