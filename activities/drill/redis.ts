// The Redis part of a restore drill: load an RDB into a fresh redis-server
// (or RESTORE a keys-mode stream into an empty one) on a loopback port, and
// compare the key count of each database with the count the manifest
// recorded when the dump started.
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import Redis from 'ioredis';
import type { RedisFacts } from '../../common/manifest';
import { parseKeyspace, restoreKeys } from '../redis/dump';
import { CheckFailure, runCheck } from './checks';
import { startTracked, type DrillProcess, type Scratch } from './scratch';
import { findTool, freeLoopbackPort, sleep } from './tools';
import type { CheckResult } from './types';

const READY_TIMEOUT_MS = 120_000;
const START_ATTEMPTS = 3;

/** Sends PING and resolves true on +PONG; false while the server is not listening or still loading its RDB. */
function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let reply = '';
    socket.setTimeout(2_000, () => socket.destroy());
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk: Buffer) => {
      reply += chunk.toString('latin1');
      if (reply.includes('\r\n')) {
        socket.destroy();
        resolve(reply.startsWith('+PONG'));
      }
    });
    socket.once('error', () => resolve(false));
    socket.once('close', () => resolve(false));
  });
}

async function startRedisServer(
  scratch: Scratch,
  directory: string,
  rdbFile: string | undefined,
  signal?: AbortSignal,
): Promise<{ server?: DrillProcess; port: number; output: string }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freeLoopbackPort();
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', directory];
    if (rdbFile) args.push('--dbfilename', path.basename(rdbFile));
    const server = await startTracked(scratch, findTool('redis-server'), args, path.join(directory, `redis-${attempt}.log`), { cwd: directory });
    const deadline = Date.now() + READY_TIMEOUT_MS;
    try {
      for (;;) {
        if (server.child.exitCode !== null || server.child.signalCode !== null) {
          const output = server.logTail();
          await server.stop();
          if (/address already in use/i.test(output) && attempt < START_ATTEMPTS) break;
          return { port, output };
        }
        if (await ping(port)) return { server, port, output: '' };
        if (Date.now() > deadline) throw new Error(`the drill's redis-server on port ${port} did not answer PING within ${READY_TIMEOUT_MS} ms: ${server.logTail()}`);
        await sleep(50, signal);
      }
    } catch (error) {
      await server.stop('SIGKILL');
      throw error;
    }
  }
}

/**
 * Restores one Redis artifact and returns its redis-restore check. The server
 * and its directory are removed before it returns.
 */
export async function drillRedisArtifact(
  scratch: Scratch,
  artifact: { key: string; file: string; facts: RedisFacts },
  signal?: AbortSignal,
): Promise<CheckResult> {
  const directory = path.join(scratch.directory, `redis-${path.basename(artifact.key).replace(/[^A-Za-z0-9._-]/g, '_')}`);
  await rm(directory, { recursive: true, force: true });
  await mkdir(directory, { recursive: true });
  let server: DrillProcess | undefined;
  try {
    return await runCheck('redis-restore', artifact.key, async () => {
      const { facts } = artifact;
      let rdbFile: string | undefined;
      if (facts.mode === 'rdb') {
        // redis-server may rewrite its file, so it gets a copy.
        rdbFile = path.join(directory, 'dump.rdb');
        await copyFile(artifact.file, rdbFile);
      }
      const started = await startRedisServer(scratch, directory, rdbFile, signal);
      if (!started.server) throw new CheckFailure(`redis-server did not load the artifact: ${started.output}`);
      server = started.server;
      const url = `redis://127.0.0.1:${started.port}`;
      if (facts.mode === 'keys') {
        try {
          await restoreKeys(createReadStream(artifact.file), url);
        } catch (error) {
          throw new CheckFailure(`RESTORE of the keys stream failed: ${(error as Error).message}`);
        }
      }
      const client = new Redis({ host: '127.0.0.1', port: started.port, maxRetriesPerRequest: 1, lazyConnect: true });
      let restored: Record<string, number>;
      try {
        await client.connect();
        restored = parseKeyspace(await client.info('keyspace'));
      } finally {
        client.disconnect();
      }

      // Keys mode skips keys that expired between SCAN and DUMP; they may be missing from any database.
      let allowance = facts.mode === 'keys' ? (facts.expiredSkipped ?? 0) : 0;
      const problems: string[] = [];
      for (const db of [...new Set([...Object.keys(facts.keyspace), ...Object.keys(restored)])].sort((a, b) => Number(a) - Number(b))) {
        const expected = facts.keyspace[db] ?? 0;
        const actual = restored[db] ?? 0;
        const shortfall = expected - actual;
        if (shortfall > 0 && shortfall <= allowance) {
          allowance -= shortfall;
          continue;
        }
        if (shortfall !== 0) problems.push(`db ${db} has ${actual} keys, the manifest records ${expected}`);
      }
      if (problems.length > 0) {
        throw new CheckFailure(`${problems.join('; ')} (keys with a TTL that expired since the backup are not restored)`);
      }
      const total = Object.values(restored).reduce((sum, count) => sum + count, 0);
      return `${total} keys in ${Object.keys(restored).length} databases match the recorded keyspace`;
    });
  } finally {
    await (server as DrillProcess | undefined)?.stop('SIGKILL');
    await rm(directory, { recursive: true, force: true });
  }
}
