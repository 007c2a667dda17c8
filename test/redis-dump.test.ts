// dumpRdb, dumpKeys and restoreKeys against real Redis servers, storing into a
// LocalBlobStore under .test-runs. Every backup is restored into a fresh
// server and compared with the source per database: key set, type, value
// and TTL.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Readable, Transform } from 'node:stream';
import { after, before, test } from 'node:test';
import type Redis from 'ioredis';
import { dumpKeys, dumpRdb, RedisSyncRejectedError, restoreKeys } from '../activities/redis/dump';
import type { BlobStore, PutOptions } from '../activities/storage/blob-store';
import { LocalBlobStore } from '../activities/storage/local';
import { runsDirectory } from './harness/process';
import { startRedis, startRedisFromRdb, type RedisServer } from './harness/redis';
import { repositoryRoot, tool } from './harness/tools';

const caseFile = path.join(repositoryRoot, 'test', 'cases', 'redis', 'load.redis');
/** A key name with CR LF and NUL bytes, which must survive both modes byte for byte. */
const binaryKey = Buffer.from('odd\r\nkey\x00end', 'latin1');
const binaryValue = Buffer.from([0x00, 0x0d, 0x0a, 0xff, 0xfe, 0x00]);
const bigKey = 'big:value';
const bigValue = randomBytes(10 * 1024 * 1024);
/** Keys in load.redis plus the two added from code, per database. */
const expectedKeyspace = { '0': 13, '3': 1 };

let source: RedisServer;
let sourceClient: Redis;
let folder: string;
let storeRoot: string;
let store: LocalBlobStore;
const servers: RedisServer[] = [];

before(async () => {
  // A diskless sync waits repl-diskless-sync-delay seconds (default 5) for
  // more replicas before it starts; 0 starts at once.
  source = await startRedis('redis-dump-source', { args: ['--repl-diskless-sync-delay', '0'] });
  servers.push(source);
  const output = execFileSync(tool('redis-cli'), ['-h', '127.0.0.1', '-p', String(source.port)], {
    input: readFileSync(caseFile),
    encoding: 'utf8',
  });
  assert.doesNotMatch(output, /ERR/, `redis-cli failed on load.redis:\n${output}`);
  sourceClient = source.client();
  await sourceClient.set(binaryKey, binaryValue);
  await sourceClient.set(bigKey, bigValue);
  folder = mkdtempSync(path.join(runsDirectory, 'redis-dump-'));
  storeRoot = path.join(folder, 'store');
  store = new LocalBlobStore(storeRoot);
});

after(async () => {
  for (const server of servers) await server.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function storedFile(key: string): string {
  return path.join(storeRoot, ...key.split('/'));
}

/** Entries of the store folder that would contain `key`, partial files of failed puts included. */
function entriesBeside(key: string): string[] {
  const directory = path.dirname(storedFile(key));
  return existsSync(directory) ? readdirSync(directory) : [];
}

function digest(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function sortedHex(values: Buffer[]): string[] {
  return values.map((value) => value.toString('hex')).sort();
}

/** Describes a key's value in a form that does not depend on the server's encoding or hash order. */
async function describeValue(client: Redis, key: Buffer, type: string): Promise<unknown> {
  switch (type) {
    case 'string': {
      const value = (await client.getBuffer(key))!;
      return { length: value.length, sha256: digest(value) };
    }
    case 'hash': {
      const flat = await client.hgetallBuffer(key);
      return Object.entries(flat).map(([field, value]) => `${Buffer.from(field).toString('hex')}=${value.toString('hex')}`).sort();
    }
    case 'list':
      return (await client.lrangeBuffer(key, 0, -1)).map((value) => value.toString('hex'));
    case 'set':
      return sortedHex(await client.smembersBuffer(key));
    case 'zset':
      return (await client.zrangeBuffer(key, 0, -1, 'WITHSCORES')).map((value) => value.toString('hex'));
    case 'stream':
      return await client.xrange(key, '-', '+');
    default:
      throw new Error(`no comparison for type ${type}`);
  }
}

interface KeyState {
  type: string;
  value: unknown;
  /** PTTL in ms, or -1 for no expiry. */
  pttl: number;
}

interface Snapshot {
  /** db index -> hex key -> state */
  databases: Map<number, Map<string, KeyState>>;
  takenAt: number;
}

/** Reads every key of databases 0 to 15 with its type, value and TTL. */
async function snapshot(client: Redis): Promise<Snapshot> {
  const databases = new Map<number, Map<string, KeyState>>();
  const takenAt = Date.now();
  for (let db = 0; db < 16; db += 1) {
    await client.select(db);
    const keys: Buffer[] = [];
    let cursor = '0';
    do {
      const [next, batch] = await client.scanBuffer(cursor, 'COUNT', 1000);
      cursor = next.toString();
      keys.push(...batch);
    } while (cursor !== '0');
    if (keys.length === 0) continue;
    const states = new Map<string, KeyState>();
    for (const key of keys) {
      const type = await client.type(key);
      states.set(key.toString('hex'), { type, value: await describeValue(client, key, type), pttl: await client.pttl(key) });
    }
    databases.set(db, states);
  }
  await client.select(0);
  return { databases, takenAt };
}

/**
 * Compares a restored server with the source snapshot. `ttlStart` is when the
 * restored TTLs started to count down from the source's values: the source
 * snapshot time for an RDB (it stores absolute expiry times), the restore time
 * for keys mode (RESTORE gets the remaining TTL).
 */
async function assertSameData(expected: Snapshot, restored: Redis, ttlStart: number): Promise<void> {
  const actual = await snapshot(restored);
  assert.deepEqual([...actual.databases.keys()], [...expected.databases.keys()], 'databases holding keys');
  for (const [db, expectedKeys] of expected.databases) {
    const actualKeys = actual.databases.get(db)!;
    assert.deepEqual([...actualKeys.keys()].sort(), [...expectedKeys.keys()].sort(), `key set of db ${db}`);
    for (const [hexKey, state] of expectedKeys) {
      const name = `db ${db} key ${JSON.stringify(Buffer.from(hexKey, 'hex').toString('latin1'))}`;
      const restoredState = actualKeys.get(hexKey)!;
      assert.equal(restoredState.type, state.type, `type of ${name}`);
      assert.deepEqual(restoredState.value, state.value, `value of ${name}`);
      if (state.pttl === -1) {
        assert.equal(restoredState.pttl, -1, `${name} has no TTL`);
      } else {
        const remaining = state.pttl - (actual.takenAt - ttlStart);
        assert.ok(
          Math.abs(restoredState.pttl - remaining) <= 1000,
          `TTL of ${name}: restored ${restoredState.pttl} ms, expected ${remaining} ms within 1000 ms`,
        );
      }
    }
  }
}

test('source holds the case keys', async () => {
  const before = await snapshot(sourceClient);
  assert.equal(before.databases.get(0)?.size, expectedKeyspace['0']);
  assert.equal(before.databases.get(3)?.size, expectedKeyspace['3']);
  assert.equal(before.databases.get(0)?.get(binaryKey.toString('hex'))?.type, 'string');
  assert.ok((before.databases.get(3)?.values().next().value as KeyState).pttl > 0, 'db3:key has a TTL');
});

test('rdb mode diskless round trip', async () => {
  const expected = await snapshot(sourceClient);
  const key = 'rdb/diskless.rdb';
  let progress = 0;
  const result = await dumpRdb({
    url: source.url,
    source: 'cache',
    store,
    key,
    onProgress: (bytes) => {
      progress = bytes;
    },
  });
  const file = readFileSync(storedFile(key));
  assert.equal(result.size, file.length);
  assert.equal(result.sha256, digest(file));
  assert.equal(progress, file.length);
  assert.ok(result.size > bigValue.length, `RDB of ${result.size} bytes holds the 10 MB value`);
  assert.equal(file.subarray(0, 5).toString('latin1'), 'REDIS');
  assert.equal(result.redisVersion, (await sourceClient.info('server')).match(/redis_version:(\S+)/)![1]);
  assert.deepEqual(result.keyspace, expectedKeyspace);
  assert.match(source.log(), /target: replicas sockets/, 'the master used diskless replication ($EOF: form)');

  const restored = await startRedisFromRdb('redis-dump-rdb-diskless', storedFile(key));
  servers.push(restored);
  await assertSameData(expected, restored.client(), expected.takenAt);
});

test('rdb mode disk-based round trip', async () => {
  await sourceClient.config('SET', 'repl-diskless-sync', 'no');
  try {
    const expected = await snapshot(sourceClient);
    const key = 'rdb/disk.rdb';
    const result = await dumpRdb({ url: source.url, source: 'cache', store, key });
    assert.deepEqual(result.keyspace, expectedKeyspace);
    assert.match(source.log(), /target: disk/, 'the master used disk-based replication ($<length> form)');
    const file = readFileSync(storedFile(key));
    assert.equal(result.sha256, digest(file));

    const restored = await startRedisFromRdb('redis-dump-rdb-disk', storedFile(key));
    servers.push(restored);
    await assertSameData(expected, restored.client(), expected.takenAt);
  } finally {
    await sourceClient.config('SET', 'repl-diskless-sync', 'yes');
  }
});

test('rdb mode abort leaves nothing', async () => {
  const controller = new AbortController();
  const key = 'rdb/aborted.rdb';
  await assert.rejects(
    dumpRdb({
      url: source.url,
      source: 'cache',
      store,
      key,
      signal: controller.signal,
      onProgress: (bytes) => {
        if (bytes > 1024 * 1024) controller.abort();
      },
    }),
  );
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key).filter((name) => name.startsWith('aborted.rdb')), []);
  // The source serves the next dump: the aborted replica connection is gone.
  const again = await dumpRdb({ url: source.url, source: 'cache', store, key });
  assert.deepEqual(again.keyspace, expectedKeyspace);
});

test('keys mode round trip', async () => {
  const expected = await snapshot(sourceClient);
  const key = 'keys/cache.keys';
  const result = await dumpKeys({ url: source.url, source: 'cache', store, key, scanCount: 3, batchSize: 2 });
  assert.deepEqual(result.keyspace, expectedKeyspace);
  assert.deepEqual(result.records, expectedKeyspace);
  assert.equal(result.expiredSkipped, 0);
  const file = readFileSync(storedFile(key));
  assert.equal(result.size, file.length);
  assert.equal(result.sha256, digest(file));
  assert.equal(file.subarray(0, 24).toString('latin1'), 'OPA-BACKUP-REDIS-KEYS 1\n');

  const restored = await startRedis('redis-dump-keys-restored');
  servers.push(restored);
  const restoredAt = Date.now();
  const restoredFile = await store.get(key);
  const outcome = await restoreKeys(restoredFile, restored.url);
  assert.deepEqual(outcome.records, expectedKeyspace);
  assert.equal(outcome.header.source, 'cache');
  await assertSameData(expected, restored.client(), restoredAt);
});

test('both modes with a password', async () => {
  const password = randomBytes(12).toString('hex');
  const secured = await startRedis('redis-dump-password', { args: ['--requirepass', password], password });
  servers.push(secured);
  const client = secured.client();
  await client.set('guarded', 'value');
  const key = 'keys/password.keys';
  await assert.rejects(
    dumpRdb({ url: secured.url, source: 'guarded', store, key }),
    /Redis source "guarded" \(127\.0\.0\.1:\d+\): RDB dump failed: .*NOAUTH/,
  );
  assert.equal(await store.stat(key), undefined);
  const rdb = await dumpRdb({ url: secured.url, password, source: 'guarded', store, key: 'rdb/password.rdb' });
  assert.deepEqual(rdb.keyspace, { '0': 1 });
  const keys = await dumpKeys({ url: secured.url, password, source: 'guarded', store, key });
  assert.deepEqual(keys.records, { '0': 1 });
});

test('rdb mode rejected SYNC suggests keys mode', async () => {
  const locked = await startRedis('redis-dump-no-sync', {
    args: ['--rename-command', 'SYNC', '', '--rename-command', 'PSYNC', ''],
  });
  servers.push(locked);
  await locked.client().set('some', 'value');
  const key = 'rdb/locked.rdb';
  await assert.rejects(dumpRdb({ url: locked.url, source: 'managed', store, key }), (error: Error) => {
    assert.ok(error instanceof RedisSyncRejectedError, `${error.name}: ${error.message}`);
    assert.match(error.message, /Redis source "managed" rejected SYNC/);
    assert.match(error.message, /unknown command/);
    assert.match(error.message, /mode: keys/);
    return true;
  });
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key).filter((name) => name.startsWith('locked.rdb')), []);

  const fallback = await dumpKeys({ url: locked.url, source: 'managed', store, key: 'keys/locked.keys' });
  assert.deepEqual(fallback.records, { '0': 1 });
});

test('keys mode skips key expiring mid-scan', async () => {
  const server = await startRedis('redis-dump-expiring');
  servers.push(server);
  const client = server.client();
  for (let index = 0; index < 50; index += 1) await client.set(`stable:${index}`, String(index));
  await client.set('vanishing', 'soon gone');
  const helper = server.client();
  let expired = false;
  const key = 'keys/expiring.keys';
  const result = await dumpKeys({
    url: server.url,
    source: 'expiring',
    store,
    key,
    scanCount: 5,
    onScanBatch: async (_db, keys) => {
      if (!keys.some((name) => name.toString() === 'vanishing')) return;
      // Expire the key after SCAN returned it and before it is dumped.
      await helper.pexpire('vanishing', 1);
      await new Promise((resolve) => setTimeout(resolve, 20));
      expired = true;
    },
  });
  assert.ok(expired, 'SCAN returned the vanishing key');
  assert.equal(result.expiredSkipped, 1);
  assert.deepEqual(result.records, { '0': 50 });

  const restored = await startRedis('redis-dump-expiring-restored');
  servers.push(restored);
  await restoreKeys(await store.get(key), restored.url);
  const restoredClient = restored.client();
  assert.equal(await restoredClient.dbsize(), 50);
  assert.equal(await restoredClient.exists('vanishing'), 0);
});

/**
 * Starts a loopback server that replies to the dumpRdb handshake, then
 * sends the parts of `syncReply` in reply to SYNC, 20 ms apart, and closes
 * the connection.
 */
async function startFakeMaster(syncReply: Buffer | Buffer[]): Promise<{ url: string; close(): Promise<void> }> {
  const server = net.createServer((socket) => {
    let received = '';
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString('latin1');
      // Commands arrive as RESP arrays whose first bulk string is the command name.
      for (;;) {
        const match = /^\*(\d+)\r\n/.exec(received);
        if (!match) return;
        let position = match[0].length;
        const args: string[] = [];
        for (let index = 0; index < Number(match[1]); index += 1) {
          const header = /^\$(\d+)\r\n/.exec(received.slice(position));
          if (!header) return;
          const start = position + header[0].length;
          const end = start + Number(header[1]);
          if (received.length < end + 2) return;
          args.push(received.slice(start, end));
          position = end + 2;
        }
        received = received.slice(position);
        const command = args[0].toUpperCase();
        if (command === 'INFO') {
          const text = args[1] === 'server' ? 'redis_version:7.0.0\r\n' : 'db0:keys=1,expires=0,avg_ttl=0\r\n';
          socket.write(`$${text.length}\r\n${text}\r\n`);
        } else if (command === 'SYNC') {
          const parts = Array.isArray(syncReply) ? [...syncReply] : [syncReply];
          const writeNext = (): void => {
            const part = parts.shift();
            if (part === undefined) socket.end();
            else socket.write(part, () => setTimeout(writeNext, 20));
          };
          writeNext();
        } else {
          socket.write('+OK\r\n');
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `redis://127.0.0.1:${port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

test('rdb mode short read leaves nothing', async () => {
  const partial = Buffer.concat([Buffer.from('\n\n$100000\r\nREDIS0010'), randomBytes(5000)]);
  const master = await startFakeMaster(partial);
  try {
    const key = 'rdb/short.rdb';
    await assert.rejects(
      dumpRdb({ url: master.url, source: 'flaky', store, key }),
      /Redis source "flaky" \(127\.0\.0\.1:\d+\): RDB dump failed: connection closed after \d+ of 100000 RDB bytes/,
    );
    assert.equal(await store.stat(key), undefined);
    assert.deepEqual(entriesBeside(key).filter((name) => name.startsWith('short.rdb')), []);
  } finally {
    await master.close();
  }
});

test('rdb mode missing end mark fails', async () => {
  const mark = 'a'.repeat(40);
  const partial = Buffer.concat([Buffer.from(`$EOF:${mark}\r\nREDIS0010`), randomBytes(3000), Buffer.from(mark.slice(0, 20))]);
  const master = await startFakeMaster(partial);
  try {
    const key = 'rdb/nomark.rdb';
    await assert.rejects(
      dumpRdb({ url: master.url, source: 'flaky', store, key }),
      /Redis source "flaky" .*before the end-of-RDB mark/,
    );
    assert.equal(await store.stat(key), undefined);
  } finally {
    await master.close();
  }
});

test('rdb mode end mark split across reads', async () => {
  const mark = 'b'.repeat(40);
  const rdb = Buffer.concat([Buffer.from('REDIS0010'), randomBytes(200_000)]);
  const master = await startFakeMaster([
    Buffer.from('\n'),
    Buffer.from(`\n$EOF:${mark}\r\n`),
    Buffer.concat([rdb, Buffer.from(mark.slice(0, 15))]),
    Buffer.from(mark.slice(15)),
  ]);
  try {
    const key = 'rdb/marked.rdb';
    const result = await dumpRdb({ url: master.url, source: 'fake', store, key });
    assert.equal(result.size, rdb.length);
    assert.ok(readFileSync(storedFile(key)).equals(rdb), 'stored bytes equal the RDB without the mark');
    assert.equal(result.redisVersion, '7.0.0');
  } finally {
    await master.close();
  }
});

test('rdb mode error reply fails', async () => {
  const master = await startFakeMaster(Buffer.from('-ERR SYNC is disabled here\r\n'));
  try {
    const key = 'rdb/error.rdb';
    await assert.rejects(dumpRdb({ url: master.url, source: 'fake', store, key }), /"fake" rejected SYNC \(ERR SYNC is disabled here\).*mode: keys/);
    assert.equal(await store.stat(key), undefined);
  } finally {
    await master.close();
  }
});

test('keys restore rejects truncated file', async () => {
  const key = 'keys/cache.keys';
  if (!(await store.stat(key))) await dumpKeys({ url: source.url, source: 'cache', store, key });
  const whole = readFileSync(storedFile(key));
  const target = await startRedis('redis-dump-truncated');
  servers.push(target);
  await assert.rejects(restoreKeys(Readable.from([whole.subarray(0, whole.length - 10)]), target.url), /truncated/);
});

/**
 * Wraps the test store so that puts read slowly (`delayMs` per chunk), or
 * fail once `failAfterBytes` bytes passed, like a slow or failing upload.
 */
function slowStore(inner: BlobStore, options: { delayMs: number; failAfterBytes?: number }): BlobStore {
  return Object.assign(Object.create(inner) as BlobStore, {
    put(key: string, body: Readable, putOptions?: PutOptions) {
      let seen = 0;
      const throttle = new Transform({
        highWaterMark: 1,
        transform(chunk: Buffer, _encoding, callback) {
          seen += chunk.length;
          if (options.failAfterBytes !== undefined && seen > options.failAfterBytes) {
            callback(new Error(`upload failed after ${seen} bytes`));
            return;
          }
          setTimeout(() => callback(null, chunk), options.delayMs);
        },
      });
      body.on('error', (error) => throttle.destroy(error));
      return inner.put(key, body.pipe(throttle), putOptions);
    },
  });
}

/** Fills database 0 of a fresh server with `count` strings of `valueBytes` random bytes each, which DUMP cannot compress. */
async function fillStrings(server: RedisServer, count: number, valueBytes: number): Promise<Redis> {
  const client = server.client();
  for (let start = 0; start < count; start += 1000) {
    const pipeline = client.pipeline();
    for (let index = start; index < Math.min(start + 1000, count); index += 1) {
      pipeline.set(`bulk:${index}`, randomBytes(valueBytes));
    }
    await pipeline.exec();
  }
  return client;
}

test('keys mode slow store round trip', async () => {
  // About 20 MB of records in 1 MB chunks, each held 100 ms by the store:
  // the output buffer fills, so the dump has to pause reading from Redis
  // while the store catches up.
  const server = await startRedis('redis-dump-slow-store');
  servers.push(server);
  const client = await fillStrings(server, 10_000, 2000);
  const key = 'keys/slow.keys';
  const result = await dumpKeys({ url: server.url, source: 'slow', store: slowStore(store, { delayMs: 100 }), key });
  assert.deepEqual(result.records, { '0': 10_000 });
  assert.ok(result.size > 20_000_000, `keys file of ${result.size} bytes`);
  const file = readFileSync(storedFile(key));
  assert.equal(result.sha256, digest(file));

  const restored = await startRedis('redis-dump-slow-store-restored');
  servers.push(restored);
  await restoreKeys(await store.get(key), restored.url);
  const restoredClient = restored.client();
  assert.equal(await restoredClient.dbsize(), 10_000);
  for (const index of [0, 1, 5_000, 9_999]) {
    assert.ok((await restoredClient.getBuffer(`bulk:${index}`))!.equals((await client.getBuffer(`bulk:${index}`))!), `value of bulk:${index}`);
  }
});

test('keys mode failed store leaves nothing', async () => {
  const server = await startRedis('redis-dump-failed-store');
  servers.push(server);
  await fillStrings(server, 10_000, 2000);
  const key = 'keys/failed.keys';
  await assert.rejects(
    dumpKeys({ url: server.url, source: 'failing', store: slowStore(store, { delayMs: 1, failAfterBytes: 8_000_000 }), key }),
    /upload failed after \d+ bytes/,
  );
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key).filter((name) => name.startsWith('failed.keys')), []);
  // The server has no client left over from the failed dump.
  const clients = (await server.client().client('LIST')) as string;
  assert.equal(clients.trim().split('\n').length, 2, clients);
});

test('keys mode abort leaves nothing', async () => {
  const server = await startRedis('redis-dump-keys-abort');
  servers.push(server);
  await fillStrings(server, 5_000, 2000);
  const controller = new AbortController();
  const key = 'keys/aborted.keys';
  await assert.rejects(
    dumpKeys({
      url: server.url,
      source: 'cache',
      store,
      key,
      signal: controller.signal,
      onProgress: (bytes) => {
        if (bytes > 1024 * 1024) controller.abort();
      },
    }),
  );
  assert.ok(controller.signal.aborted, 'the dump was aborted part way');
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key).filter((name) => name.startsWith('aborted.keys')), []);
});
