/// <reference path="./crm-plugin-types.d.ts" />
declare module 'crm:plugin/http@0.2.0' {
  /**
   * Send one request and wait for the whole response.
   */
  export function send(request: Request): Response;
  export type Header = import('crm:plugin/types@0.2.0').Header;
  /**
   * A request to send. `url` must be absolute (`https://host/path`).
   */
  export interface Request {
    method: string,
    url: string,
    headers: Array<Header>,
    body: Uint8Array,
  }
  /**
   * The response. Redirects are not followed: a 3xx comes back as is.
   */
  export interface Response {
    status: number,
    headers: Array<Header>,
    body: Uint8Array,
  }
  /**
   * Why no response came back.
   */
  export type HttpError = HttpErrorDenied | HttpErrorInvalidRequest | HttpErrorTimeout | HttpErrorTransport | HttpErrorResponseTooLarge;
  /**
   * The URL's origin is not in the plugin's allow-list (the host logs it).
   */
  export interface HttpErrorDenied {
    tag: 'denied',
    val: string,
  }
  /**
   * The URL or method could not be used.
   */
  export interface HttpErrorInvalidRequest {
    tag: 'invalid-request',
    val: string,
  }
  /**
   * No answer within the time left for this call.
   */
  export interface HttpErrorTimeout {
    tag: 'timeout',
  }
  /**
   * Connection or protocol failure.
   */
  export interface HttpErrorTransport {
    tag: 'transport',
    val: string,
  }
  /**
   * The response body exceeded the host's limit (in bytes).
   */
  export interface HttpErrorResponseTooLarge {
    tag: 'response-too-large',
    val: bigint,
  }
}
