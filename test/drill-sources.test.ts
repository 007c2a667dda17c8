// Restore drills of PostgreSQL and Redis backups through Temporal: the dump
// restores into an ephemeral cluster with the recorded row counts, both Redis
// modes restore with the recorded key counts, missing tables and keys fail
// the drill, and a cancelled drill or a worker killed mid-drill leaves no
// server process and no scratch directory behind.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { generateIdentity } from '../activities/crypto/age';
import { reapDrillLeftovers } from '../activities/drill/scratch';
import type { DrillProgress, DrillWorkflowResult } from '../activities/drill/types';
import type { PostgresFacts, RedisFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { drillLeftovers, processesMentioning, readManifestFile, runDrill, writeManifestFile } from './harness/drill';
import { startPostgres, type PostgresServer } from './harness/postgres';
import { runsDirectory } from './harness/process';
import { startRedis, type RedisServer } from './harness/redis';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool, toolsBin } from './harness/tools';

let postgres: PostgresServer;
let redis: RedisServer;
let stack: Stack;
let folder: string;
let drillRoot: string;
let workerEnvironment: NodeJS.ProcessEnv;

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'drill-sources-'));
  drillRoot = path.join(folder, 'scratch');
  postgres = await startPostgres('drill-pg');
  await postgres.psql('postgres', 'CREATE DATABASE entitlements');
  await postgres.psql('entitlements', readFileSync(path.join(repositoryRoot, 'test', 'cases', 'postgres', 'entitlements.sql'), 'utf8'));
  // A role from globals.sql that owns a table, so the dump restores only after the globals.
  await postgres.psql('postgres', 'CREATE ROLE drill_owner LOGIN');
  await postgres.psql('entitlements', 'ALTER TABLE iam.roles OWNER TO drill_owner');
  await postgres.psql('postgres', 'CREATE DATABASE bulk');
  await postgres.psql('bulk', "CREATE TABLE filler AS SELECT g AS id, md5(g::text) || repeat('x', 200) AS body FROM generate_series(1, 400000) g");

  redis = await startRedis('drill-redis', { args: ['--repl-diskless-sync-delay', '0'] });
  const script = readFileSync(path.join(repositoryRoot, 'test', 'cases', 'redis', 'load.redis'), 'utf8');
  execFileSync(tool('redis-cli'), ['-h', '127.0.0.1', '-p', String(redis.port)], { input: script });

  workerEnvironment = { PATH: `${toolsBin}:${process.env.PATH}`, OPA_BACKUP_DRILL_DIR: drillRoot, PG_DRILL_TEST_PASSWORD: postgres.password };
  stack = await startStack('drill-sources', workerEnvironment);
});

after(async () => {
  await stack?.stop();
  // A failed test may leave a drill whose worker is gone: its servers lead their own process groups.
  if (drillRoot) {
    process.env.OPA_BACKUP_DRILL_DIR = drillRoot;
    await reapDrillLeftovers();
  }
  await redis?.stop();
  await postgres?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function planFor(name: string, databases: string[], withRedis: boolean): Plan {
  return {
    name,
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: {
      postgres: [{ name: 'upstream', url: postgres.url, password: 'env:PG_DRILL_TEST_PASSWORD', databases, globals: true }],
      ...(withRedis
        ? {
            redis: [
              { name: 'cache-rdb', url: redis.url, mode: 'rdb' as const },
              { name: 'cache-keys', url: redis.url, mode: 'keys' as const },
            ],
          }
        : {}),
    },
  };
}

/** Returns the artifact key of each kind in a backup; keys carry ".gz" when the plan compresses. */
function keysByKind(plan: Plan, backupId: string): Record<string, string> {
  return Object.fromEntries(readManifestFile(folder, plan.name, backupId).artifacts.map((artifact) => [artifact.kind, artifact.key]));
}

function check(result: DrillWorkflowResult, name: string, object: string): DrillWorkflowResult['checks'][number] {
  const found = result.checks.find((entry) => entry.name === name && entry.object === object);
  assert.ok(found, `no check ${name} of ${object} in ${JSON.stringify(result.checks)}`);
  return found;
}

/** Processes of drills: anything started in the drill root or on a drill cluster directory. */
function drillProcesses(): string[] {
  return [...processesMentioning(drillRoot), ...processesMentioning('opa-backup-drill-pg-')];
}

async function waitFor(what: string, condition: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Returns the drill's cluster server processes ("postgres -D …"), not initdb's bootstrap runs. */
function drillPostgresServers(): string[] {
  return processesMentioning('opa-backup-drill-pg-').filter((line) => / -D /.test(line) && !/--boot|--single|--check/.test(line));
}

test('drill passes on PostgreSQL and Redis', async () => {
  const plan = planFor('drill-sources-pass', ['entitlements'], true);
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));
  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.deepEqual(result.checks.filter((entry) => entry.outcome !== 'passed'), []);
  assert.equal(result.outcome, 'passed');
  const manifest = readManifestFile(folder, plan.name, backup.backupId);
  const keys = keysByKind(plan, backup.backupId);
  assert.deepEqual(
    result.checks.map((entry) => `${entry.name} ${entry.object}`).sort(),
    [
      ...manifest.artifacts.map((artifact) => `artifact-digest ${artifact.key}`),
      `postgres-globals ${keys['postgres-globals']}`,
      `postgres-restore ${keys['postgres-dump']}`,
      `redis-restore ${keys['redis-keys']}`,
      `redis-restore ${keys['redis-rdb']}`,
    ].sort(),
  );
  const tables = (manifest.artifacts.find((artifact) => artifact.kind === 'postgres-dump')!.facts as PostgresFacts).tables!;
  assert.equal(check(result, 'postgres-restore', keys['postgres-dump']).message, `${tables.length} tables restored with their recorded row counts`);
  assert.match(check(result, 'redis-restore', keys['redis-rdb']).message, /^\d+ keys in 2 databases match the recorded keyspace$/);
  assert.notEqual(result.rtoSeconds, undefined);
  assert.ok(result.rtoSeconds! > 0, `rtoSeconds ${result.rtoSeconds} is not positive`);
  assert.ok(existsSync(path.join(folder, result.reportKey)));
  assert.deepEqual(drillLeftovers(drillRoot), []);
  assert.deepEqual(drillProcesses(), []);
});

test('table missing from the dump fails postgres-restore', async () => {
  const plan = planFor('drill-sources-table', ['entitlements'], false);
  const backup = await stack.backup(plan);
  const manifest = readManifestFile(folder, plan.name, backup.backupId);
  const facts = manifest.artifacts.find((artifact) => artifact.kind === 'postgres-dump')!.facts as PostgresFacts;
  facts.tables!.push({ schema: 'iam', name: 'ghosts', rows: 3 });
  writeManifestFile(folder, plan.name, backup.backupId, manifest);

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.equal(result.outcome, 'failed');
  const keys = keysByKind(plan, backup.backupId);
  const restore = check(result, 'postgres-restore', keys['postgres-dump']);
  assert.equal(restore.outcome, 'failed');
  assert.equal(restore.message, 'table iam.ghosts: relation "iam.ghosts" does not exist');
  assert.equal(check(result, 'postgres-globals', keys['postgres-globals']).outcome, 'passed');
});

test('keys missing from a Redis artifact fail redis-restore', async () => {
  const plan = planFor('drill-sources-keys', [], true);
  plan.sources.postgres = undefined;
  const backup = await stack.backup(plan);
  const manifest = readManifestFile(folder, plan.name, backup.backupId);
  for (const artifact of manifest.artifacts) (artifact.facts as RedisFacts).keyspace['0'] += 2;
  writeManifestFile(folder, plan.name, backup.backupId, manifest);
  const recorded = (manifest.artifacts[0].facts as RedisFacts).keyspace['0'];

  const result = await runDrill(stack, { plan, backup: 'latest' });
  assert.equal(result.outcome, 'failed');
  const keys = keysByKind(plan, backup.backupId);
  for (const key of [keys['redis-rdb'], keys['redis-keys']]) {
    const restore = check(result, 'redis-restore', key);
    assert.equal(restore.outcome, 'failed');
    assert.ok(restore.message.startsWith(`db 0 has ${recorded - 2} keys, the manifest records ${recorded}`), restore.message);
  }
});

test('encrypted backup drills with the identity', async () => {
  const identity = generateIdentity();
  const identityFile = path.join(folder, 'identity.txt');
  writeFileSync(identityFile, `${identity.encodeSecret()}\n`, { mode: 0o600 });
  const plan: Plan = {
    ...planFor('drill-sources-encrypted', ['entitlements'], true),
    encryption: { recipients: [identity.recipient.toString()], identity: `file:${identityFile}` },
  };
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));
  const manifest = readManifestFile(folder, plan.name, backup.backupId);
  assert.ok(manifest.artifacts.every((artifact) => artifact.key.endsWith('.age')), 'the artifacts are not encrypted');

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.deepEqual(result.checks.filter((entry) => entry.outcome !== 'passed'), []);
  assert.equal(result.checks.length, 8);
  assert.equal(result.outcome, 'passed');

  // Without the identity neither the artifacts nor their facts can be read.
  const withoutIdentity: Plan = { ...plan, encryption: { recipients: plan.encryption.recipients } };
  const blind = await runDrill(stack, { plan: withoutIdentity, backup: backup.backupId });
  assert.equal(blind.outcome, 'failed');
  const digest = check(blind, 'artifact-digest', keysByKind(plan, backup.backupId)['redis-rdb']);
  assert.match(digest.message, /is encrypted, and the plan gives no encryption\.identity or passphrase/);
  assert.deepEqual(drillLeftovers(drillRoot), []);
});

test('cancelled drill leaves nothing behind', async () => {
  const plan = planFor('drill-sources-cancel', ['bulk'], true);
  const backup = await stack.backup(plan);
  const handle = await stack.client.workflow.start('restoreDrillWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `drill-cancel-${randomBytes(4).toString('hex')}`,
    args: [{ plan, backup: backup.backupId }],
  });
  await waitFor('the drill cluster to start', () => drillPostgresServers().length > 0, 60_000);
  const progress = await handle.query<DrillProgress>('progress');
  assert.ok(progress.checks.some((entry) => entry.state === 'running'), JSON.stringify(progress.checks));
  await handle.cancel();
  await assert.rejects(handle.result(), /cancel/i);

  await waitFor('the drill processes to stop', () => drillProcesses().length === 0, 20_000);
  assert.deepEqual(drillLeftovers(drillRoot), []);
});

test('restarted worker reaps a killed drill', async () => {
  const plan = planFor('drill-sources-crash', ['bulk'], false);
  const backup = await stack.backup(plan);
  const handle = await stack.client.workflow.start('restoreDrillWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `drill-crash-${randomBytes(4).toString('hex')}`,
    args: [{ plan, backup: backup.backupId }],
  });
  await waitFor('the drill cluster to start', () => drillPostgresServers().length > 0, 60_000);
  const orphans = drillProcesses().map((line) => Number(line.split(' ')[0]));
  const scratchDirectories = drillLeftovers(drillRoot);
  assert.ok(scratchDirectories.length > 0);

  // SIGKILL gives the worker no chance to clean up, and the drill's servers
  // lead their own process groups, so they outlive it.
  await stack.worker.stop('SIGKILL');
  assert.ok(orphans.some((pid) => existsSync(`/proc/${pid}`)), 'no drill process outlived the worker');

  const worker = await stack.restartWorker('drill-sources-worker-2', workerEnvironment);
  assert.match(worker.log(), /removed the leftovers of a drill whose worker stopped/);
  await waitFor('the orphaned processes to exit', () => orphans.every((pid) => !existsSync(`/proc/${pid}`)), 10_000);
  for (const directory of scratchDirectories) {
    // The retried step may open the drill's directory again; the old cluster must be gone.
    if (directory.startsWith('/dev/shm')) assert.equal(existsSync(directory), false, `${directory} was not removed`);
  }

  await handle.cancel();
  await assert.rejects(handle.result(), /cancel/i);
  await waitFor('the drill processes to stop', () => drillProcesses().length === 0, 20_000);
  assert.deepEqual(drillLeftovers(drillRoot), []);
});
