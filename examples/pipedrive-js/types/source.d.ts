/// <reference path="./interfaces/crm-plugin-config.d.ts" />
/// <reference path="./interfaces/crm-plugin-http.d.ts" />
/// <reference path="./interfaces/crm-plugin-log.d.ts" />
/// <reference path="./interfaces/crm-plugin-types.d.ts" />
declare module 'crm:plugin/source@0.2.0' {
  export type IncomingRequest = import('crm:plugin/types@0.2.0').IncomingRequest;
  export type CrmEvent = import('crm:plugin/types@0.2.0').CrmEvent;
  export type ParseError = import('crm:plugin/types@0.2.0').ParseError;
  export type * as CrmPluginConfig020 from 'crm:plugin/config@0.2.0'; // import crm:plugin/config@0.2.0
  export type * as CrmPluginHttp020 from 'crm:plugin/http@0.2.0'; // import crm:plugin/http@0.2.0
  export type * as CrmPluginLog020 from 'crm:plugin/log@0.2.0'; // import crm:plugin/log@0.2.0
  export type * as CrmPluginTypes020 from 'crm:plugin/types@0.2.0'; // import crm:plugin/types@0.2.0
  /**
  * Turn a webhook request into the deal events it carries: none, one, or
  * many (each gets its own receipt, dedupe and jobs).
  */
  export function parse(request: IncomingRequest): Array<CrmEvent>;
}
