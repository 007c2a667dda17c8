// Redis sources through Temporal, in both modes: the backup records the
// keyspace, and the artifact restores into a fresh server with the same key
// count per database.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createReadStream, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { restoreKeys } from '../activities/redis/dump';
import type { Manifest, RedisFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { runsDirectory } from './harness/process';
import { startRedis, startRedisFromRdb, type RedisServer } from './harness/redis';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool } from './harness/tools';

let redis: RedisServer;
let stack: Stack;
let folder: string;

before(async () => {
  redis = await startRedis('redis-backup', { args: ['--repl-diskless-sync-delay', '0'] });
  const script = readFileSync(path.join(repositoryRoot, 'test', 'cases', 'redis', 'load.redis'), 'utf8');
  execFileSync(tool('redis-cli'), ['-h', '127.0.0.1', '-p', String(redis.port)], { input: script });
  stack = await startStack('redis-backup');
  folder = mkdtempSync(path.join(runsDirectory, 'redis-backup-'));
});

after(async () => {
  await stack?.stop();
  await redis?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

async function keyCounts(server: RedisServer): Promise<Record<string, number>> {
  const info = await server.client().info('keyspace');
  const counts: Record<string, number> = {};
  for (const match of info.matchAll(/^db(\d+):keys=(\d+)/gm)) counts[match[1]] = Number(match[2]);
  return counts;
}

for (const mode of ['rdb', 'keys'] as const) {
  test(`redis source in ${mode} mode restores every key`, async () => {
    const plan: Plan = {
      name: `redis-${mode}`,
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      compression: { level: 0 },
      sources: { redis: [{ name: 'cache', url: redis.url, mode }] },
    };
    const result = await stack.backup(plan);
    assert.equal(result.status, 'complete', JSON.stringify(result.failures));
    const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8')) as Manifest;
    const artifact = manifest.artifacts[0];
    assert.equal(artifact.kind, mode === 'rdb' ? 'redis-rdb' : 'redis-keys');
    const facts = artifact.facts as RedisFacts;
    const expected = await keyCounts(redis);
    assert.deepEqual(facts.keyspace, expected);

    const file = path.join(folder, plan.name, result.backupId, artifact.key);
    const restored = mode === 'rdb' ? await startRedisFromRdb(`redis-backup-restored-${mode}`, file) : await startRedis(`redis-backup-restored-${mode}`);
    try {
      if (mode === 'keys') await restoreKeys(createReadStream(file), restored.url);
      assert.deepEqual(await keyCounts(restored), expected);
    } finally {
      await restored.stop();
    }
  });
}
