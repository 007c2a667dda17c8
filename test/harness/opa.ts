// Starts `opa run --server` on a free loopback port and loads state into it
// the way an operator pushes it: PUT /v1/policies/{id} and PUT /v1/data.
import { freePort } from './ports';
import { startProcess, type ManagedProcess } from './process';
import { tool } from './tools';

export interface OpaServer {
  url: string;
  port: number;
  process: ManagedProcess;
  putPolicy(id: string, text: string): Promise<void>;
  putData(path: string, json: string): Promise<void>;
  stop(): Promise<void>;
}

export async function waitForHealth(url: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const response = await fetch(`${url}/health`);
      if (response.ok) return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) throw new Error(`OPA at ${url} not healthy after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function expectOk(response: Response, what: string): Promise<void> {
  if (!response.ok) throw new Error(`${what} returned ${response.status}: ${await response.text()}`);
}

/** Starts OPA with extra arguments (such as --v0-compatible or --bundle FILE) and environment. */
export async function startOpa(
  name: string,
  options: { args?: string[]; env?: NodeJS.ProcessEnv; port?: number } = {},
): Promise<OpaServer> {
  const port = options.port ?? (await freePort());
  const url = `http://127.0.0.1:${port}`;
  const server = startProcess(name, tool('opa'), ['run', '--server', '--addr', `127.0.0.1:${port}`, '--log-level', 'error', ...(options.args ?? [])], {
    env: { ...process.env, ...(options.env ?? {}) },
  });
  try {
    await waitForHealth(url);
  } catch (error) {
    await server.stop();
    throw new Error(`${(error as Error).message}\n${server.log()}`);
  }
  return {
    url,
    port,
    process: server,
    async putPolicy(id, text) {
      const response = await fetch(`${url}/v1/policies/${encodeURIComponent(id)}`, { method: 'PUT', body: text });
      await expectOk(response, `PUT /v1/policies/${id}`);
    },
    async putData(path, json) {
      const response = await fetch(`${url}/v1/data${path ? `/${path}` : ''}`, {
        method: 'PUT',
        body: json,
        headers: { 'content-type': 'application/json' },
      });
      await expectOk(response, `PUT /v1/data/${path}`);
    },
    stop: () => server.stop(),
  };
}
