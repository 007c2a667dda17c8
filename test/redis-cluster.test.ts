// Redis Cluster sources through Temporal: a 3-master cluster is backed up
// in both modes, one activity per master, and every artifact is restored
// into plain (non-cluster) servers and compared with the cluster's keys.
import assert from 'node:assert/strict';
import { createReadStream, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import type Redis from 'ioredis';
import { CLUSTER_SLOTS, discoverClusterMasters, liveMasters, parseClusterNodes } from '../activities/redis/cluster';
import { restoreKeys } from '../activities/redis/dump';
import { redisClusterNodeKey } from '../common/layout';
import type { Manifest, RedisFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { runsDirectory } from './harness/process';
import { startRedis, startRedisFromRdb, type RedisServer } from './harness/redis';
import { startRedisCluster, type RedisCluster } from './harness/redis-cluster';
import { startStack, type Stack } from './harness/stack';

/** Keys loaded into the cluster: enough that every master gets many. */
const KEY_COUNT = 3000;
/** TTL of every fifth string key, in ms. */
const TTL_MS = 3_600_000;

let cluster: RedisCluster;
let stack: Stack;
let folder: string;
const servers: RedisServer[] = [];

/** Binary key names, with CR LF and NUL bytes, spread over the slots by their varying byte. */
function binaryKey(index: number): Buffer {
  return Buffer.concat([Buffer.from('bin\r\n\x00', 'latin1'), Buffer.from([index])]);
}

before(async () => {
  cluster = await startRedisCluster('redis-cluster');
  const client = cluster.client();
  for (let start = 0; start < KEY_COUNT; start += 200) {
    const writes: Array<Promise<unknown>> = [];
    for (let index = start; index < Math.min(start + 200, KEY_COUNT); index += 1) {
      const key = `key:${index}`;
      switch (index % 5) {
        case 0:
          writes.push(client.set(key, `value-${index}`, 'PX', TTL_MS));
          break;
        case 1:
          writes.push(client.hset(key, { name: `n${index}`, count: String(index) }));
          break;
        case 2:
          writes.push(client.rpush(key, 'a', 'b', String(index)));
          break;
        case 3:
          writes.push(client.sadd(key, 'x', 'y', String(index)));
          break;
        default:
          writes.push(client.zadd(key, 1, 'one', index, 'many'));
      }
    }
    await Promise.all(writes);
  }
  for (let index = 0; index < 16; index += 1) await client.set(binaryKey(index), Buffer.from([0x00, 0xff, index]));
  stack = await startStack('redis-cluster');
  folder = mkdtempSync(path.join(runsDirectory, 'redis-cluster-'));
});

after(async () => {
  await stack?.stop();
  for (const server of servers) await server.stop();
  await cluster?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

async function scanKeys(client: Redis): Promise<Buffer[]> {
  const keys: Buffer[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await client.scanBuffer(cursor, 'COUNT', 1000);
    cursor = next.toString();
    keys.push(...batch);
  } while (cursor !== '0');
  return keys;
}

/** Describes a key's value in a form that does not depend on the server's encoding or hash order. */
async function describeValue(client: Redis, key: Buffer): Promise<unknown> {
  const type = await client.type(key);
  switch (type) {
    case 'string':
      return (await client.getBuffer(key))!.toString('hex');
    case 'hash':
      return Object.entries(await client.hgetall(key)).sort();
    case 'list':
      return await client.lrange(key, 0, -1);
    case 'set':
      return (await client.smembers(key)).sort();
    case 'zset':
      return await client.zrange(key, 0, -1, 'WITHSCORES');
    default:
      throw new Error(`no comparison for type ${type}`);
  }
}

interface KeyState {
  value: unknown;
  pttl: number;
}

/** Reads every key of database 0 of each client, keyed by the hex of its name. */
async function readKeys(clients: Redis[]): Promise<Map<string, KeyState>> {
  const states = new Map<string, KeyState>();
  for (const client of clients) {
    for (const key of await scanKeys(client)) {
      states.set(key.toString('hex'), { value: await describeValue(client, key), pttl: await client.pttl(key) });
    }
  }
  return states;
}

async function backup(mode: 'rdb' | 'keys'): Promise<{ manifest: Manifest; backupFolder: string }> {
  const plan = {
    name: `redis-cluster-${mode}`,
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    // Uncompressed, so the artifacts are plain RDB and keys files.
    compression: { level: 0 },
    // The seed is the second master: discovery must find the others.
    sources: { redis: [{ name: 'cache', url: cluster.masters[1].url, mode, cluster: true }] },
  } as Plan;
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8')) as Manifest;
  return { manifest, backupFolder: path.join(folder, plan.name, result.backupId) };
}

/** Checks that the manifest has one artifact per master, with its node id and slots, and slots that cover the cluster once. */
async function assertOneArtifactPerMaster(manifest: Manifest, extension: string): Promise<void> {
  assert.equal(manifest.artifacts.length, cluster.masters.length);
  const slotOwners = new Uint8Array(CLUSTER_SLOTS);
  for (const master of cluster.masters) {
    const key = `redis/cache/127.0.0.1-${master.port}.${extension}`;
    const artifact = manifest.artifacts.find((candidate) => candidate.key === key);
    assert.ok(artifact, `artifact ${key} in ${manifest.artifacts.map((candidate) => candidate.key).join(', ')}`);
    const facts = artifact.facts as RedisFacts;
    assert.equal(facts.cluster?.nodeId, await master.client().cluster('MYID'), `node id of ${key}`);
    assert.equal(facts.cluster?.address, `127.0.0.1:${master.port}`);
    assert.match(facts.redisVersion, /^\d+\.\d+/);
    for (const [first, last] of facts.cluster!.slots) for (let slot = first; slot <= last; slot += 1) slotOwners[slot] += 1;
  }
  assert.ok(slotOwners.every((owners) => owners === 1), 'the masters in the manifest serve every slot exactly once');
}

async function totalDbsize(): Promise<number> {
  let total = 0;
  for (const master of cluster.masters) total += await master.client().dbsize();
  return total;
}

test('cluster rdb mode dumps every master', async () => {
  const { manifest, backupFolder } = await backup('rdb');
  await assertOneArtifactPerMaster(manifest, 'rdb');
  const recorded = manifest.artifacts.reduce((sum, artifact) => sum + ((artifact.facts as RedisFacts).keyspace['0'] ?? 0), 0);
  assert.equal(recorded, await totalDbsize(), 'sum of the masters\' DBSIZE equals the manifest\'s key counts');
  assert.equal(recorded, KEY_COUNT + 16);

  const restoredClients: Redis[] = [];
  for (const artifact of manifest.artifacts) {
    const restored = await startRedisFromRdb(`redis-cluster-restored-${path.basename(artifact.key)}`, path.join(backupFolder, artifact.key));
    servers.push(restored);
    const client = restored.client();
    assert.equal(await client.dbsize(), (artifact.facts as RedisFacts).keyspace['0'], `keys of ${artifact.key}`);
    restoredClients.push(client);
  }
  const expected = await readKeys(cluster.masters.map((master) => master.client()));
  const actual = await readKeys(restoredClients);
  assert.equal(expected.size, KEY_COUNT + 16);
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort(), 'the union of the restored keys equals the loaded keys');
  for (const [key, state] of expected) assert.deepEqual(actual.get(key)!.value, state.value, `value of key ${key}`);
});

test('cluster keys mode restores into one server', async () => {
  const backupStartedAt = Date.now();
  const { manifest, backupFolder } = await backup('keys');
  await assertOneArtifactPerMaster(manifest, 'keys');
  const records = manifest.artifacts.reduce((sum, artifact) => sum + ((artifact.facts as RedisFacts).records?.['0'] ?? 0), 0);
  assert.equal(records, await totalDbsize(), 'sum of the masters\' DBSIZE equals the manifest\'s record counts');

  const restored = await startRedis('redis-cluster-keys-restored');
  servers.push(restored);
  for (const artifact of manifest.artifacts) {
    const outcome = await restoreKeys(createReadStream(path.join(backupFolder, artifact.key)), restored.url);
    assert.deepEqual(outcome.records, (artifact.facts as RedisFacts).records, `records restored from ${artifact.key}`);
  }
  // The restored server is read first, so each source TTL is read later and is smaller.
  const actual = await readKeys([restored.client()]);
  const expected = await readKeys(cluster.masters.map((master) => master.client()));
  const elapsed = Date.now() - backupStartedAt;
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort(), 'the restored server holds the cluster\'s keys');
  for (const [key, state] of expected) {
    const restoredState = actual.get(key)!;
    assert.deepEqual(restoredState.value, state.value, `value of key ${key}`);
    if (state.pttl === -1) {
      assert.equal(restoredState.pttl, -1, `key ${key} has no TTL`);
    } else {
      // RESTORE starts the TTL the key had at dump time again, so the restored
      // TTL exceeds the source's by at most the time since the backup started.
      assert.ok(restoredState.pttl <= TTL_MS, `TTL of key ${key}: ${restoredState.pttl} ms`);
      assert.ok(restoredState.pttl >= state.pttl - 1000, `TTL of key ${key}: restored ${restoredState.pttl} ms, source ${state.pttl} ms`);
      assert.ok(
        restoredState.pttl <= state.pttl + elapsed + 1000,
        `TTL of key ${key}: restored ${restoredState.pttl} ms, source ${state.pttl} ms`,
      );
    }
  }
});

test('cluster parsing skips replicas, failed nodes', () => {
  const text = [
    'a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8000',
    'b2 127.0.0.1:7001@17001,cache-b master - 0 0 2 connected 8001-16383 [93->-c3]',
    'c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected',
    'd4 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected',
    'e5 :7004@17004 master - 0 0 4 connected',
  ].join('\n');
  const nodes = parseClusterNodes(text, '10.0.0.9');
  assert.equal(nodes.length, 5);
  assert.equal(nodes[4].host, '10.0.0.9', 'a node without a known address gets the seed host');
  const masters = liveMasters(nodes);
  assert.deepEqual(
    masters.map((master) => [master.nodeId, master.address, master.slots]),
    [
      ['a1', '127.0.0.1:7000', [[0, 8000]]],
      ['b2', '127.0.0.1:7001', [[8001, 16383]]],
    ],
  );
});

test('cluster node keys per address', () => {
  assert.equal(redisClusterNodeKey('cache', '10.0.0.7', 6379, 'rdb'), 'redis/cache/10.0.0.7-6379.rdb');
  assert.equal(redisClusterNodeKey('cache', '10.0.0.7', 6379, 'keys'), 'redis/cache/10.0.0.7-6379.keys');
  // An IPv6 address stays one path segment.
  assert.equal(redisClusterNodeKey('cache', 'fd00::7', 6379, 'rdb'), 'redis/cache/fd00%3A%3A7-6379.rdb');
});

test('cluster discovery rejects plain server', async () => {
  const plain = await startRedis('redis-cluster-plain');
  servers.push(plain);
  await assert.rejects(discoverClusterMasters(plain.url, undefined, 'cache'), (error: Error) => {
    assert.equal(error.name, 'ClusterNotEnabledError');
    assert.match(error.message, /Redis source "cache" \(127\.0\.0\.1:\d+\) is not a cluster node/);
    assert.match(error.message, /remove "cluster: true"/);
    return true;
  });
});

test('cluster with uncovered slots fails discovery', async () => {
  const master = cluster.masters[0];
  const client = master.client();
  const before = parseClusterNodes((await client.cluster('NODES')) as string, '127.0.0.1').find((node) => node.flags.includes('myself'))!;
  const [first] = before.slots[0];
  await client.call('CLUSTER', 'DELSLOTSRANGE', String(first), String(first + 99));
  await client.call('CLUSTER', 'DELSLOTSRANGE', String(first + 200), String(first + 200));
  try {
    await assert.rejects(
      discoverClusterMasters(master.url, undefined, 'cache'),
      new RegExp(`Redis Cluster source "cache": 101 of 16384 hash slots have no live master \\(slots ${first}-${first + 99}, ${first + 200}\\)`),
    );
  } finally {
    await client.call('CLUSTER', 'ADDSLOTSRANGE', String(first), String(first + 99));
    await client.call('CLUSTER', 'ADDSLOTSRANGE', String(first + 200), String(first + 200));
  }
});
