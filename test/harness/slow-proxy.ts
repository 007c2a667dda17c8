// An HTTP proxy on loopback that delays each request before
// forwarding it, to make a source slow enough to interrupt mid-step.
import http from 'node:http';

export interface SlowProxy {
  url: string;
  requests: number;
  close(): Promise<void>;
}

export async function startSlowProxy(targetUrl: string, delayMs: number): Promise<SlowProxy> {
  const target = new URL(targetUrl);
  const state = { requests: 0 };
  const server = http.createServer((request, response) => {
    state.requests++;
    setTimeout(() => {
      const upstream = http.request(
        { host: target.hostname, port: target.port, path: request.url, method: request.method, headers: request.headers },
        (answer) => {
          response.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(response);
        },
      );
      upstream.on('error', () => {
        response.statusCode = 502;
        response.end();
      });
      request.pipe(upstream);
    }, delayMs);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`,
    get requests() {
      return state.requests;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
