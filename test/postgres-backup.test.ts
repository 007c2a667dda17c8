// PostgreSQL sources through Temporal: a plan with an OPA and a PostgreSQL
// source backs up both, the dump restores with pg_restore to the counts the
// manifest recorded, and a server restart during a dump costs a retry of
// that dump only.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { WorkflowHandle } from '@temporalio/client';
import type { Manifest, PostgresFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import type { BackupWorkflowResult } from '../common/workflow-types';
import { startOpa, type OpaServer } from './harness/opa';
import { startPostgres, type PostgresServer } from './harness/postgres';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool } from './harness/tools';

let postgres: PostgresServer;
let stack: Stack;
let opa: OpaServer;
let folder: string;

before(async () => {
  postgres = await startPostgres('pg-backup');
  stack = await startStack('pg-backup', { PG_BACKUP_TEST_PASSWORD: postgres.password });
  opa = await startOpa('pg-backup-opa');
  await opa.putData('', '{"app": {"ok": true}}');
  folder = mkdtempSync(path.join(runsDirectory, 'pg-backup-'));
  await postgres.psql('postgres', 'CREATE DATABASE entitlements');
  await postgres.psql('entitlements', readFileSync(path.join(repositoryRoot, 'test', 'cases', 'postgres', 'entitlements.sql'), 'utf8'));
});

after(async () => {
  await opa?.stop();
  await stack?.stop();
  await postgres?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function planFor(name: string, databases: string[]): Plan {
  return {
    name,
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    compression: { level: 0 },
    sources: {
      opa: [{ name: 'edge', url: opa.url }],
      postgres: [{ name: 'upstream', url: postgres.url, password: 'env:PG_BACKUP_TEST_PASSWORD', databases }],
    },
    settings: { postgresDump: { heartbeatTimeout: '5s', retry: { initialInterval: '500ms', maximumInterval: '1s' } } },
  };
}

async function startedAttempt(handle: WorkflowHandle, activityId: string): Promise<number | undefined> {
  const events = (await handle.fetchHistory()).events ?? [];
  const scheduled = events.find((event) => event.activityTaskScheduledEventAttributes?.activityId === activityId);
  if (!scheduled) return undefined;
  const started = events.find((event) => String(event.activityTaskStartedEventAttributes?.scheduledEventId) === String(scheduled.eventId));
  return started?.activityTaskStartedEventAttributes?.attempt ?? undefined;
}

test('plan with OPA and PostgreSQL sources restores the counts', async () => {
  const plan = planFor('pg-plan', ['entitlements']);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  assert.deepEqual(result.artifacts.map((artifact) => artifact.key).sort(), [
    'opa/edge.tar.gz',
    'postgres/upstream/entitlements.dump',
    'postgres/upstream/globals.sql',
  ]);

  const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8')) as Manifest;
  const dump = manifest.artifacts.find((artifact) => artifact.kind === 'postgres-dump')!;
  const facts = dump.facts as PostgresFacts;
  const counts = new Map(facts.tables!.map((table) => [`${table.schema}.${table.name}`, table.rows]));
  assert.equal(counts.get('iam.users'), 5000);
  assert.equal(counts.get('iam.no_pk_notes'), 3);

  await postgres.psql('postgres', 'CREATE DATABASE restored');
  execFileSync(tool('pg_restore'), ['--no-password', '--exit-on-error', '--dbname', 'restored', path.join(folder, 'pg-plan', result.backupId, dump.key)], {
    env: { ...process.env, ...postgres.clientEnvironment },
  });
  for (const table of facts.tables!) {
    const rows = (await postgres.psql('restored', `SELECT count(*) FROM ONLY "${table.schema}"."${table.name}"`)).trim();
    assert.equal(Number(rows), table.rows, `${table.schema}.${table.name}`);
  }
});

test('server restart during a dump retries that dump only', async () => {
  await postgres.psql('postgres', 'CREATE DATABASE bulk');
  await postgres.psql('bulk', "CREATE TABLE filler AS SELECT g AS id, md5(g::text) || repeat('x', 200) AS body FROM generate_series(1, 600000) g");
  const plan = planFor('pg-restart', ['bulk']);
  const handle = await stack.client.workflow.start('backupWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `pg-restart-${randomBytes(4).toString('hex')}`,
    args: [{ plan }],
  });
  const deadline = Date.now() + 60_000;
  while (!/"PostgreSQL dump started"[^\n]*"database":"bulk"|"database":"bulk"[^\n]*"PostgreSQL dump started"/.test(stack.worker.log())) {
    if (Date.now() > deadline) throw new Error('the bulk dump did not start');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await new Promise((resolve) => setTimeout(resolve, 300));
  await postgres.restart();

  const result = (await handle.result()) as BackupWorkflowResult;
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  assert.ok(((await startedAttempt(handle, 'postgres-upstream-db-bulk')) ?? 0) >= 2, 'the dump was not retried');
  assert.equal(await startedAttempt(handle, 'opa-edge'), 1, 'the OPA snapshot was redone');
  const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8')) as Manifest;
  const dump = manifest.artifacts.find((artifact) => artifact.kind === 'postgres-dump')!;
  assert.equal((dump.facts as PostgresFacts).tables!.find((table) => table.name === 'filler')?.rows, 600000);
});

test('cancelled backup stops pg_dump at once and seals nothing', async () => {
  await postgres.psql('postgres', 'CREATE DATABASE locked');
  await postgres.psql('locked', 'CREATE TABLE held (id int)');
  // pg_dump waits for a share lock on every table it dumps, so an exclusive
  // lock held by another session keeps it waiting until it is stopped.
  const holder = await postgres.connect('locked');
  await holder.query('BEGIN');
  await holder.query('LOCK TABLE held IN ACCESS EXCLUSIVE MODE');
  try {
    const plan = planFor('pg-cancel', ['locked']);
    plan.settings = { postgresDump: { heartbeatTimeout: '2s' } };
    // The database name travels in PGDATABASE, so pg_dump is found as a new process with its snapshot argument.
    const pgDumpProcesses = (): string[] =>
      execFileSync('ps', ['-eo', 'pid=,args='], { encoding: 'utf8' })
        .split('\n')
        .filter((line) => /pg_dump --format=custom --snapshot=/.test(line))
        .map((line) => line.trim().split(/\s+/)[0]);
    const before = new Set(pgDumpProcesses());
    const handle = await stack.client.workflow.start('backupWorkflow', {
      taskQueue: stack.taskQueue,
      workflowId: `pg-cancel-${randomBytes(4).toString('hex')}`,
      args: [{ plan }],
    });
    const deadline = Date.now() + 60_000;
    let pid: string | undefined;
    while (!(pid = pgDumpProcesses().find((candidate) => !before.has(candidate)))) {
      if (Date.now() > deadline) throw new Error('pg_dump of database locked did not start');
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const cancelledAt = Date.now();
    await handle.cancel();
    await assert.rejects(handle.result(), /cancel/i);
    while (pgDumpProcesses().includes(pid)) {
      assert.ok(Date.now() - cancelledAt < 10_000, 'pg_dump still runs 10 s after the cancel');
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const backups = existsSync(path.join(folder, 'pg-cancel')) ? readdirSync(path.join(folder, 'pg-cancel')) : [];
    for (const backup of backups) {
      assert.equal(existsSync(path.join(folder, 'pg-cancel', backup, 'manifest.json')), false, `${backup} has a manifest`);
      assert.equal(existsSync(path.join(folder, 'pg-cancel', backup, 'postgres', 'upstream', 'locked.dump')), false, `${backup} has a dump`);
    }
  } finally {
    await holder.query('ROLLBACK').catch(() => undefined);
    await holder.end();
  }
});
