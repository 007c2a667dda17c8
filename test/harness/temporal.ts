// Starts a Temporal dev server (`temporal server start-dev`) on free loopback
// ports, in memory, with no web UI.
import { Connection, Client } from '@temporalio/client';
import { freePort, waitForPort } from './ports';
import { startProcess, type ManagedProcess } from './process';
import { tool } from './tools';

export interface TemporalServer {
  address: string;
  process: ManagedProcess;
  client(): Promise<Client>;
  stop(): Promise<void>;
}

export async function startTemporal(name = 'temporal'): Promise<TemporalServer> {
  const port = await freePort();
  const httpPort = await freePort();
  const metricsPort = await freePort();
  const server = startProcess(name, tool('temporal'), [
    'server',
    'start-dev',
    '--ip',
    '127.0.0.1',
    '--port',
    String(port),
    '--http-port',
    String(httpPort),
    '--metrics-port',
    String(metricsPort),
    '--headless',
    '--log-level',
    'error',
  ]);
  await waitForPort(port, 60_000);
  const address = `127.0.0.1:${port}`;
  const connections: Connection[] = [];
  // The frontend accepts connections before the default namespace is ready.
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const connection = await Connection.connect({ address });
      await new Client({ connection }).workflowService.describeNamespace({ namespace: 'default' });
      await connection.close();
      break;
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`Temporal dev server not ready: ${(error as Error).message}\n${server.log()}`);
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
  return {
    address,
    process: server,
    async client() {
      const connection = await Connection.connect({ address });
      connections.push(connection);
      return new Client({ connection });
    },
    async stop() {
      for (const connection of connections) await connection.close().catch(() => undefined);
      await server.stop();
    },
  };
}
