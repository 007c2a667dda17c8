// Starts a Redis Cluster for tests: N redis-server masters in cluster mode on
// free loopback ports, joined with `redis-cli --cluster create` and no
// replicas, so each master serves about 16384 / N hash slots.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import Redis from 'ioredis';
import { freePort } from './ports';
import { startRedis, type RedisServer } from './redis';
import { tool } from './tools';

const run = promisify(execFile);
const readyTimeoutMs = 30_000;

export interface RedisCluster {
  masters: RedisServer[];
  /** A cluster-aware ioredis client, which stop() closes. */
  client(): InstanceType<typeof Redis.Cluster>;
  stop(): Promise<void>;
}

/** Waits until every node reports cluster_state:ok, which follows the slot assignment by a few gossip rounds. */
async function waitForClusterOk(masters: RedisServer[]): Promise<void> {
  const deadline = Date.now() + readyTimeoutMs;
  const clients = masters.map((master) => master.client());
  for (;;) {
    const states = await Promise.all(clients.map(async (client) => /cluster_state:ok/.test((await client.cluster('INFO')) as string)));
    if (states.every(Boolean)) return;
    if (Date.now() > deadline) throw new Error(`the Redis Cluster did not reach cluster_state:ok within ${readyTimeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Starts `count` masters (at least 3, which `redis-cli --cluster create` requires) and joins them into one cluster. */
export async function startRedisCluster(name: string, count = 3): Promise<RedisCluster> {
  const masters: RedisServer[] = [];
  const clients: Array<InstanceType<typeof Redis.Cluster>> = [];
  const stop = async (): Promise<void> => {
    for (const client of clients) client.disconnect();
    for (const master of masters) await master.stop();
  };
  try {
    for (let index = 0; index < count; index += 1) {
      // The cluster bus defaults to port + 10000, which may be taken or above
      // 65535, so it gets its own free port.
      const busPort = await freePort();
      masters.push(
        await startRedis(`${name}-${index}`, {
          args: ['--cluster-enabled', 'yes', '--cluster-port', String(busPort), '--cluster-config-file', 'nodes.conf', '--repl-diskless-sync-delay', '0'],
        }),
      );
    }
    await run(tool('redis-cli'), ['--cluster', 'create', ...masters.map((master) => `127.0.0.1:${master.port}`), '--cluster-replicas', '0', '--cluster-yes']);
    await waitForClusterOk(masters);
  } catch (error) {
    await stop();
    throw error;
  }
  return {
    masters,
    client() {
      const client = new Redis.Cluster(masters.map((master) => ({ host: '127.0.0.1', port: master.port })));
      clients.push(client);
      return client;
    },
    stop,
  };
}
