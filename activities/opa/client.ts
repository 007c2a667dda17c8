// HTTP access to one OPA instance's REST API, with bearer-token and TLS
// options. Responses are streams, so large documents never sit in memory.
import http, { type IncomingMessage } from 'node:http';
import https from 'node:https';
import { readFileSync } from 'node:fs';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import type { OpaSource } from '../../common/plan';
import { resolveSecret } from '../secrets';

export interface OpaConnection {
  source: string;
  baseUrl: URL;
  /** Reference of the token, for error messages: "env:OPA_TOKEN". */
  tokenReference?: string;
  token?: string;
  agent: http.Agent;
  /** Limit for each request, from sending it to the last byte of the response. */
  requestTimeoutMs: number;
}

/** Builds a connection for a plan's OPA source; resolves the token and client key. */
export function connectOpa(source: OpaSource, index: number, requestTimeoutMs = 120_000): OpaConnection {
  const baseUrl = new URL(source.url.endsWith('/') ? source.url : `${source.url}/`);
  const token = source.token ? resolveSecret(source.token, `sources.opa[${index}].token`) : undefined;
  let agent: http.Agent;
  if (baseUrl.protocol === 'https:') {
    agent = new https.Agent({
      keepAlive: true,
      ca: source.tls?.caFile ? readFileSync(source.tls.caFile) : undefined,
      cert: source.tls?.certFile ? readFileSync(source.tls.certFile) : undefined,
      key: source.tls?.key ? resolveSecret(source.tls.key, `sources.opa[${index}].tls.key`) : undefined,
      rejectUnauthorized: !(source.tls?.insecureSkipVerify ?? false),
    });
  } else {
    agent = new http.Agent({ keepAlive: true });
  }
  return { source: source.name, baseUrl, tokenReference: source.token, token, agent, requestTimeoutMs };
}

/** Builds a failure for an HTTP response that is not 2xx: 401 and 403 cannot be fixed by a retry. */
function statusFailure(connection: OpaConnection, method: string, path: string, status: number, body: string): ApplicationFailure {
  const what = `snapshot of OPA "${connection.source}" failed: ${method} ${path} returned ${status}`;
  if (status === 401 || status === 403) {
    const hint = connection.tokenReference
      ? `check the token in ${connection.tokenReference.replace(':', ' ')}`
      : 'the plan sets no token for this source; add one with token: env:NAME';
    return ApplicationFailure.create({ type: FailureType.Unauthorized, nonRetryable: true, message: `${what}; ${hint}` });
  }
  const detail = body.trim().slice(0, 300);
  return ApplicationFailure.create({
    type: status >= 500 || status === 429 ? FailureType.SourceUnavailable : FailureType.InvalidResponse,
    message: `${what}${detail ? `: ${detail}` : ''}`,
  });
}

async function readBody(response: IncomingMessage, limit = 64 * 1024): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of response) {
    if (size < limit) chunks.push(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * Sends one request and returns the response stream. Statuses in
 * `acceptStatuses` (2xx by default) are returned; others throw a failure that
 * names the source and the request. Network errors throw SourceUnavailable,
 * which Temporal retries.
 */
export async function opaRequest(
  connection: OpaConnection,
  method: 'GET' | 'POST',
  path: string,
  options: { body?: string; signal?: AbortSignal; acceptStatuses?: (status: number) => boolean } = {},
): Promise<IncomingMessage> {
  const url = new URL(path.replace(/^\//, ''), connection.baseUrl);
  const transport = url.protocol === 'https:' ? https : http;
  const headers: Record<string, string> = { accept: 'application/json' };
  if (connection.token) headers.authorization = `Bearer ${connection.token}`;
  if (options.body !== undefined) {
    headers['content-type'] = 'application/json';
    headers['content-length'] = String(Buffer.byteLength(options.body));
  }
  const accept = options.acceptStatuses ?? ((status: number) => status >= 200 && status < 300);

  const response = await new Promise<IncomingMessage>((resolve, reject) => {
    const request = transport.request(url, { method, headers, agent: connection.agent, signal: options.signal }, resolve);
    request.setTimeout(connection.requestTimeoutMs, () => {
      request.destroy(new Error(`no answer within ${connection.requestTimeoutMs} ms`));
    });
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (error.name === 'AbortError') {
        reject(error);
        return;
      }
      reject(
        ApplicationFailure.create({
          type: FailureType.SourceUnavailable,
          message: `snapshot of OPA "${connection.source}" failed: ${method} ${url.pathname} to ${url.origin}: ${error.code ?? error.message}`,
        }),
      );
    });
    request.end(options.body);
  });

  const status = response.statusCode ?? 0;
  if (!accept(status)) {
    const body = await readBody(response);
    throw statusFailure(connection, method, url.pathname, status, body);
  }
  return response;
}

/** Sends one request and parses the JSON response. For small documents only. */
export async function opaJson<T>(
  connection: OpaConnection,
  method: 'GET' | 'POST',
  path: string,
  options: { body?: string; signal?: AbortSignal; acceptStatuses?: (status: number) => boolean } = {},
): Promise<{ status: number; body: T }> {
  const response = await opaRequest(connection, method, path, options);
  const text = await readBody(response, Number.MAX_SAFE_INTEGER);
  try {
    return { status: response.statusCode ?? 0, body: JSON.parse(text) as T };
  } catch {
    throw ApplicationFailure.create({
      type: FailureType.InvalidResponse,
      message: `snapshot of OPA "${connection.source}" failed: ${method} ${path} returned invalid JSON: ${text.slice(0, 200)}`,
    });
  }
}
