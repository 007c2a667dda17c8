// Starts Redis servers for tests: `redis-server` on a free loopback port with
// persistence off and its working directory in a fresh folder under
// .test-runs, removed again by stop().
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import Redis from 'ioredis';
import { freePort } from './ports';
import { runsDirectory, startProcess } from './process';
import { tool } from './tools';

const host = '127.0.0.1';
const readyTimeoutMs = 30_000;

export interface RedisServer {
  /** redis://127.0.0.1:PORT */
  url: string;
  port: number;
  /** The server's working directory (`--dir`). */
  directory: string;
  /** Closes the clients opened by client(), stops the server and removes its directory. */
  stop(): Promise<void>;
  /** Opens an ioredis client on database 0, which stop() closes. */
  client(): Redis;
  /** The server's log so far. */
  log(): string;
}

export interface StartRedisOptions {
  /** Extra command-line arguments for redis-server, such as ['--requirepass', 'secret']. */
  args?: string[];
  /** Password that the readiness PING authenticates with, needed with --requirepass. */
  password?: string;
}

/** Sends PING over a fresh connection and resolves true when the server replies +PONG (or -NOAUTH, which also means it is up). */
function ping(port: number, password?: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, host);
    let reply = '';
    socket.setTimeout(2_000, () => socket.destroy());
    socket.once('connect', () => {
      if (password !== undefined) socket.write(`AUTH ${password}\r\n`);
      socket.write('PING\r\n');
    });
    socket.on('data', (chunk: Buffer) => {
      reply += chunk.toString('latin1');
      if (reply.includes('+PONG') || reply.includes('-NOAUTH')) {
        socket.destroy();
        resolve(true);
      } else if (reply.includes('-LOADING')) {
        socket.destroy();
        resolve(false);
      }
    });
    socket.once('error', () => resolve(false));
    socket.once('close', () => resolve(false));
  });
}

async function launch(name: string, directory: string, options: StartRedisOptions): Promise<RedisServer> {
  const port = await freePort();
  const serverArguments = [
    '--port', String(port),
    '--bind', host,
    '--save', '',
    '--appendonly', 'no',
    '--dir', directory,
    ...(options.args ?? []),
  ];
  const server = startProcess(name, tool('redis-server'), serverArguments, { cwd: directory });
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (server.child.exitCode !== null || server.child.signalCode !== null) {
      rmSync(directory, { recursive: true, force: true });
      throw new Error(`redis-server exited before it answered PING:\n${server.log()}`);
    }
    if (await ping(port, options.password)) break;
    if (Date.now() > deadline) {
      await server.stop('SIGKILL');
      rmSync(directory, { recursive: true, force: true });
      throw new Error(`redis-server on ${host}:${port} did not answer PING within ${readyTimeoutMs} ms:\n${server.log()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }

  const clients: Redis[] = [];
  return {
    url: `redis://${host}:${port}`,
    port,
    directory,
    log: () => server.log(),
    client() {
      const client = new Redis({ host, port, password: options.password, maxRetriesPerRequest: 1 });
      clients.push(client);
      return client;
    },
    async stop() {
      for (const client of clients) client.disconnect();
      // With `--save ""` a SIGTERM shuts down without writing an RDB.
      await server.stop('SIGTERM');
      rmSync(directory, { recursive: true, force: true });
    },
  };
}

/** Starts an empty Redis server, with its log in .test-runs/`name`.log. */
export async function startRedis(name: string, options: StartRedisOptions = {}): Promise<RedisServer> {
  mkdirSync(runsDirectory, { recursive: true });
  const directory = mkdtempSync(path.join(runsDirectory, `redis-${name}-`));
  return launch(name, directory, options);
}

/** Starts a Redis server that loads `rdbFile` (copied into its directory as dump.rdb) at startup. */
export async function startRedisFromRdb(name: string, rdbFile: string, options: StartRedisOptions = {}): Promise<RedisServer> {
  mkdirSync(runsDirectory, { recursive: true });
  const directory = mkdtempSync(path.join(runsDirectory, `redis-${name}-`));
  copyFileSync(rdbFile, path.join(directory, 'dump.rdb'));
  return launch(name, directory, { ...options, args: [...(options.args ?? []), '--dbfilename', 'dump.rdb'] });
}
