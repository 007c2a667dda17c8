// A bundle service for tests: node:http (or node:https with client
// certificates) on a loopback port that serves bundle files under
// /bundles/NAME as OPA's bundle plugin expects them, with a bearer token,
// ETags and If-None-Match, and failures on demand.
import { createHash } from 'node:crypto';
import { createReadStream, readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';

export interface ServedBundle {
  file: string;
  /** Send an ETag (the file's SHA-256) and return 304 to a matching If-None-Match. @default true */
  etag?: boolean;
}

export interface BundleServer {
  url: string;
  port: number;
  /** Serves `bundle.file` at /bundles/NAME; replaces what was served there. */
  serve(name: string, bundle: ServedBundle): void;
  /** Responds to the next `count` requests for /bundles/NAME with `status`. */
  failNext(name: string, count: number, status: number): void;
  /** Requests for /bundles/NAME, counted by response status. */
  requests(name: string): Map<number, number>;
  /** If-None-Match headers received for /bundles/NAME. */
  conditionalRequests(name: string): number;
  stop(): Promise<void>;
}

/** PEM texts of an HTTPS server that requires client certificates signed by `ca`. */
export interface BundleServerTls {
  key: string;
  cert: string;
  ca: string;
}

/**
 * Starts the server; no `port` picks a free one. With `token`, requests need
 * `Authorization: Bearer TOKEN`; with `tls`, a client certificate.
 */
export async function startBundleServer(options: { token?: string; port?: number; tls?: BundleServerTls }): Promise<BundleServer> {
  const bundles = new Map<string, { file: string; etag?: string }>();
  const failures = new Map<string, { count: number; status: number }>();
  const counts = new Map<string, Map<number, number>>();
  const conditional = new Map<string, number>();

  const handler: http.RequestListener = (request, response) => {
    const name = decodeURIComponent((request.url ?? '').replace(/^\/bundles\//, '').split('?')[0]);
    const answer = (status: number): void => {
      const byStatus = counts.get(name) ?? new Map<number, number>();
      byStatus.set(status, (byStatus.get(status) ?? 0) + 1);
      counts.set(name, byStatus);
      response.statusCode = status;
    };
    const failure = failures.get(name);
    if (failure && failure.count > 0) {
      failure.count--;
      answer(failure.status);
      response.end('unavailable for the test\n');
      return;
    }
    if (options.token !== undefined && request.headers.authorization !== `Bearer ${options.token}`) {
      answer(401);
      response.end('{"code":"unauthorized"}\n');
      return;
    }
    const bundle = bundles.get(name);
    if (!request.url?.startsWith('/bundles/') || !bundle) {
      answer(404);
      response.end();
      return;
    }
    if (request.headers['if-none-match'] !== undefined) conditional.set(name, (conditional.get(name) ?? 0) + 1);
    if (bundle.etag) {
      response.setHeader('etag', bundle.etag);
      if (request.headers['if-none-match'] === bundle.etag) {
        answer(304);
        response.end();
        return;
      }
    }
    answer(200);
    response.setHeader('content-type', 'application/gzip');
    createReadStream(bundle.file).pipe(response);
  };
  const server = options.tls
    ? https.createServer({ ...options.tls, requestCert: true, rejectUnauthorized: true }, handler)
    : http.createServer(handler);

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', resolve);
  });
  const port = (server.address() as AddressInfo).port;
  return {
    url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    port,
    serve(name, bundle) {
      const digest = createHash('sha256').update(readFileSync(bundle.file)).digest('hex');
      bundles.set(name, { file: bundle.file, etag: bundle.etag === false ? undefined : `"${digest}"` });
    },
    failNext(name, count, status) {
      failures.set(name, { count, status });
    },
    requests: (name) => counts.get(name) ?? new Map(),
    conditionalRequests: (name) => conditional.get(name) ?? 0,
    stop: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
