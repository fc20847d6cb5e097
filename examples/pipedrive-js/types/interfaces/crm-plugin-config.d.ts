declare module 'crm:plugin/config@0.2.0' {
  /**
   * The value of a declared key, or none if it is not set. Asking for an
   * undeclared key also returns none (and the host logs a warning).
   */
  export function get(key: string): string | undefined;
}
