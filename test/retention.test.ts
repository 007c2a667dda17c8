// Retention through Temporal and the CLI, on a local folder and on the real
// S3-compatible server. A dry run deletes nothing. A real run deletes the
// backups no rule keeps (manifest first, then the folder) and keeps
// referenced, verified, future-dated and unreadable backups. It removes
// folders of backups that never committed and aborts unfinished uploads
// older than the grace period. A backup that a running drill uses is kept.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, type ExecFileException } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { CreateMultipartUploadCommand, UploadPartCommand } from '@aws-sdk/client-s3';
import { bundleWorkflowCode, NativeConnection, Worker } from '@temporalio/worker';
import { LocalBlobStore } from '../activities/storage/local';
import { S3BlobStore } from '../activities/storage/s3';
import type { BlobStore } from '../activities/storage';
import { makeBackupId } from '../common/layout';
import { deleteBackups, planRetention, type RetentionRunReport as RetentionReport } from '../activities/retention';
import type { Plan } from '../common/plan';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startS3Server, type S3Server } from './harness/s3-server';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot } from './harness/tools';

let s3: S3Server;
let stack: Stack;
let folder: string;
let credentials: Record<string, string>;

before(async () => {
  s3 = await startS3Server({ name: 'retention' });
  await s3.createBucket('opa-backups');
  credentials = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region };
  Object.assign(process.env, credentials);
  stack = await startStack('retention', credentials);
  folder = mkdtempSync(path.join(runsDirectory, 'retention-'));
});

after(async () => {
  await stack?.stop();
  await s3?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

const id = (time: string, suffix: string): string => makeBackupId(new Date(time), `0000000${suffix}`);

// keepLast 2 keeps G and F; keepDaily 3 keeps F (complete over the newer,
// partial G) for 3 December, E2 for 2 December and D for 29 November.
const A = id('2026-11-01T10:00:00Z', 'a'); // verified by a passed drill: the newest verified backup
const B = id('2026-11-02T10:00:00Z', 'b'); // deleted
const C = id('2026-11-28T10:00:00Z', 'd'); // F's bundle is stored here: kept
const D = id('2026-11-29T10:00:00Z', 'e');
const E = id('2026-12-02T08:00:00Z', 'f'); // deleted
const E2 = id('2026-12-02T20:00:00Z', '1');
const F = id('2026-12-03T10:00:00Z', '2');
const G = id('2026-12-03T12:00:00Z', '3'); // partial
const H = id('2027-06-01T00:00:00Z', '4'); // dated in the future
// The newest backup, but its manifest is unreadable: kept, and left out of the rules.
const K = id('2026-12-03T23:00:00Z', 'c');
const L1 = id('2026-11-15T00:00:00Z', '5'); // no manifest: a leftover
const L2 = id('2026-11-20T00:00:00Z', '6'); // no manifest, but written recently (local) or also old (S3)
const EXPECTED_DELETED = [B, E];
const EXPECTED_KEPT = [A, K, C, D, E2, F, G, H];

function manifest(backupId: string, status: 'complete' | 'partial', storedIn?: string): string {
  const bundle = Buffer.from(`bundle of ${backupId}`);
  return JSON.stringify({
    format: 'opa-backup.manifest',
    version: 1,
    backupId,
    plan: 'keep-test',
    status,
    startedAt: new Date().toISOString(),
    completedAt: new Date().toISOString(),
    workflow: { workflowId: 'fixture', runId: 'fixture' },
    artifacts: [
      {
        kind: 'opa-bundle',
        source: 'edge-1',
        key: 'opa/edge-1.tar.gz',
        size: bundle.length,
        sha256: createHash('sha256').update(bundle).digest('hex'),
        ...(storedIn ? { storedIn } : {}),
      },
    ],
    failures: [],
  });
}

async function put(store: BlobStore, key: string, text: string): Promise<void> {
  await store.put(key, Readable.from([Buffer.from(text)]));
}

/** Writes the fixture backups into a store, without the committed backups in `missing`. */
async function writeFixture(store: BlobStore, missing: string[] = []): Promise<void> {
  const plan = 'keep-test';
  for (const [backupId, status, storedIn] of [
    [A, 'complete'],
    [B, 'complete'],
    [C, 'complete'],
    [D, 'complete'],
    [E, 'complete'],
    [E2, 'complete'],
    [F, 'complete', C],
    [G, 'partial'],
    [H, 'complete'],
  ] as Array<[string, 'complete' | 'partial', string?]>) {
    if (missing.includes(backupId)) continue;
    await put(store, `${plan}/${backupId}/opa/edge-1.tar.gz`, `bundle of ${backupId}`);
    await put(store, `${plan}/${backupId}/manifest.json`, manifest(backupId, status, storedIn));
  }
  await put(store, `${plan}/${A}/drills/20261102T000000Z.json`, JSON.stringify({ outcome: 'passed' }));
  await put(store, `${plan}/${B}/drills/20261103T000000Z.json`, JSON.stringify({ outcome: 'failed' }));
  await put(store, `${plan}/${K}/opa/edge-1.tar.gz`, 'bundle');
  await put(store, `${plan}/${K}/manifest.json`, '{ not json');
  await put(store, `${plan}/${L1}/opa/edge-1.tar.gz`, 'never sealed');
  await put(store, `${plan}/${L2}/opa/edge-1.tar.gz`, 'never sealed');
  await put(store, `${plan}/notes/readme.txt`, 'not a backup folder');
}

/** Lists every key under the plan's folder. */
async function keysOf(store: BlobStore): Promise<string[]> {
  const keys: string[] = [];
  for await (const object of store.list('keep-test/')) keys.push(object.key);
  return keys;
}

function writePlan(name: string, destination: string[]): string {
  const file = path.join(folder, `${name}.yaml`);
  writeFileSync(
    file,
    [
      'name: keep-test',
      'destination:',
      ...destination,
      'encryption: { unencrypted: true }',
      'sources:',
      '  opa:',
      '    - { name: edge-1, url: "http://127.0.0.1:9" }',
      'retention:',
      '  keepLast: 2',
      '  keepDaily: 3',
      destination.some((line) => line.includes('s3')) ? '  leftoverGrace: 1s' : '  leftoverGrace: 1h',
      '',
    ].join('\n'),
  );
  return file;
}

/** Runs the CLI without blocking this process, whose event loop runs the stand-in drill worker. */
/** Returns a child's exit code: 0 without an error, null when a signal ended it. */
function exitStatus(error: ExecFileException | null): number | null {
  if (!error) return 0;
  return typeof error.code === 'number' ? error.code : null;
}

function cli(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [path.join(repositoryRoot, 'bin', 'opa-backup'), ...args],
      {
        encoding: 'utf8',
        timeout: 120_000,
        env: { ...process.env, ...credentials, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
      },
      (error, stdout, stderr) => resolve({ status: exitStatus(error), stdout, stderr }),
    );
  });
}

async function runRetention(planFile: string, dryRun: boolean): Promise<RetentionReport> {
  const run = await cli(['retention', '--plan', planFile, '--json', ...(dryRun ? ['--dry-run'] : [])]);
  assert.equal(run.status, 0, `${run.stdout}\n${run.stderr}`);
  return JSON.parse(run.stdout) as RetentionReport;
}

function assertDecision(report: RetentionReport, dryRun: boolean): void {
  assert.equal(report.dryRun, dryRun);
  assert.equal(report.backups, 10);
  assert.deepEqual(report.deleted, EXPECTED_DELETED);
  assert.deepEqual(
    report.kept.map((kept) => kept.id),
    [...EXPECTED_KEPT].sort(),
  );
  const reasons = new Map(report.kept.map((kept) => [kept.id, kept.reasons]));
  assert.deepEqual(reasons.get(A), ['newest verified backup']);
  assert.deepEqual(reasons.get(C), [`referenced by ${F} (storedIn)`]);
  assert.deepEqual(reasons.get(F), ['keepLast', 'daily 2026-12-03']);
  assert.deepEqual(reasons.get(G), ['keepLast']);
  assert.deepEqual(reasons.get(H), ['dated in the future']);
  assert.deepEqual(reasons.get(K), ['manifest unreadable']);
  assert.deepEqual(report.future, [H]);
  assert.deepEqual(
    report.unreadable.map((entry) => entry.id),
    [K],
  );
}

test('retention on local folder', async () => {
  const root = path.join(folder, 'local-backups');
  const store = new LocalBlobStore(root);
  await writeFixture(store);
  // L1 was last written two days ago; L2 an hour's grace has not passed for.
  const old = new Date(Date.now() - 2 * 86_400_000);
  utimesSync(path.join(root, 'keep-test', L1, 'opa', 'edge-1.tar.gz'), old, old);
  // A put that crashed two days ago left its temporary file; one from now is still running.
  const stale = path.join(root, 'keep-test', E2, 'opa', 'edge-1.tar.gz.partial-0123456789ab');
  const fresh = path.join(root, 'keep-test', E2, 'opa', 'edge-1.tar.gz.partial-ba9876543210');
  writeFileSync(stale, 'half');
  writeFileSync(fresh, 'half');
  utimesSync(stale, old, old);
  const planFile = writePlan('local', ['  local: { path: ./local-backups }']);

  const before = await keysOf(store);
  const dry = await runRetention(planFile, true);
  assertDecision(dry, true);
  assert.deepEqual(
    dry.leftovers.map((leftover) => leftover.id),
    [L1],
  );
  assert.deepEqual(dry.uncommittedRecent, [L2], 'a folder within the grace period is reported, not removed');
  assert.deepEqual(
    dry.staleUploads.map((upload) => upload.uploadId),
    ['edge-1.tar.gz.partial-0123456789ab'],
  );
  assert.deepEqual(await keysOf(store), before, 'a dry run deletes nothing');
  assert.ok(existsSync(stale), 'a dry run aborts no upload');

  const report = await runRetention(planFile, false);
  assertDecision(report, false);
  assert.deepEqual(
    report.leftovers.map((leftover) => leftover.id),
    [L1],
  );
  const remaining = readdirSync(path.join(root, 'keep-test')).sort();
  assert.deepEqual(remaining, [...EXPECTED_KEPT, L2, 'notes'].sort());
  for (const backupId of EXPECTED_KEPT) {
    if (backupId !== K) assert.ok(existsSync(path.join(root, 'keep-test', backupId, 'manifest.json')), `manifest of ${backupId}`);
  }
  assert.ok(!existsSync(stale), 'the stale temporary file is removed');
  assert.ok(existsSync(fresh), 'a recent temporary file stays');

  // A second run finds nothing more to delete.
  const again = await runRetention(planFile, false);
  assert.deepEqual(again.deleted, []);
  assert.deepEqual(again.leftovers, []);
});

test('retention on S3 server', async () => {
  const store = new S3BlobStore({ bucket: 'opa-backups', prefix: 'team', endpoint: s3.endpoint, region: s3.region });
  await writeFixture(store);
  const upload = await store.client.send(
    new CreateMultipartUploadCommand({ Bucket: 'opa-backups', Key: `team/keep-test/${E2}/opa/other.tar.gz` }),
  );
  await store.client.send(
    new UploadPartCommand({
      Bucket: 'opa-backups',
      Key: `team/keep-test/${E2}/opa/other.tar.gz`,
      UploadId: upload.UploadId,
      PartNumber: 1,
      Body: Buffer.alloc(1024, 1),
    }),
  );
  // The plan's grace period is 1 s: let it pass so that the leftovers and the upload are stale.
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const planFile = writePlan('s3', [
    '  s3:',
    '    bucket: opa-backups',
    '    prefix: team',
    `    endpoint: ${s3.endpoint}`,
    `    region: ${s3.region}`,
  ]);

  const before = await keysOf(store);
  const dry = await runRetention(planFile, true);
  assertDecision(dry, true);
  assert.deepEqual(
    dry.leftovers.map((leftover) => leftover.id),
    [L1, L2],
  );
  assert.deepEqual(
    dry.staleUploads.map((entry) => entry.uploadId),
    [upload.UploadId],
  );
  assert.deepEqual(await keysOf(store), before, 'a dry run deletes nothing');

  const report = await runRetention(planFile, false);
  assertDecision(report, false);
  const after = await keysOf(store);
  for (const backupId of [...EXPECTED_DELETED, L1, L2]) {
    assert.ok(!after.some((key) => key.startsWith(`keep-test/${backupId}/`)), `${backupId} is gone`);
  }
  for (const backupId of EXPECTED_KEPT) {
    assert.ok(after.includes(`keep-test/${backupId}/opa/edge-1.tar.gz`), `${backupId} is kept`);
  }
  assert.ok(after.includes('keep-test/notes/readme.txt'), 'folders that are not backups are left alone');
  const uploads: string[] = [];
  for await (const entry of store.listUnfinishedUploads('keep-test/')) uploads.push(entry.uploadId);
  assert.deepEqual(uploads, []);
});

test('retention keeps backup a drill uses', async () => {
  // A stand-in restore drill on its own task queue: it returns a backup of
  // the plan from the drillTarget query and runs until signalled.
  const drillFolder = mkdtempSync(path.join(runsDirectory, 'retention-drill-'));
  const workflowsPath = path.join(drillFolder, 'drill-workflow.js');
  writeFileSync(
    workflowsPath,
    [
      "const { defineQuery, defineSignal, setHandler, condition } = require('@temporalio/workflow');",
      'exports.restoreDrillWorkflow = async function restoreDrillWorkflow(input) {',
      '  let done = false;',
      "  setHandler(defineQuery('drillTarget'), () => ({ plan: input.planName, backupId: input.backupId }));",
      "  setHandler(defineSignal('finish'), () => { done = true; });",
      '  await condition(() => done);',
      '};',
    ].join('\n'),
  );
  const root = path.join(folder, 'drill-backups');
  const store = new LocalBlobStore(root);
  const older = id('2026-11-01T00:00:00Z', '7');
  const newer = id('2026-12-01T00:00:00Z', '8');
  for (const backupId of [older, newer]) {
    await put(store, `keep-test/${backupId}/opa/edge-1.tar.gz`, 'bundle');
    await put(store, `keep-test/${backupId}/manifest.json`, manifest(backupId, 'complete'));
  }
  const planFile = path.join(folder, 'drill.yaml');
  writeFileSync(
    planFile,
    [
      'name: keep-test',
      'destination: { local: { path: ./drill-backups } }',
      'encryption: { unencrypted: true }',
      'sources: { opa: [{ name: edge-1, url: "http://127.0.0.1:9" }] }',
      'retention: { keepLast: 1 }',
      '',
    ].join('\n'),
  );

  const connection = await NativeConnection.connect({ address: stack.temporal.address });
  const taskQueue = `drill-${randomBytes(3).toString('hex')}`;
  const worker = await Worker.create({
    connection,
    taskQueue,
    workflowBundle: await bundleWorkflowCode({ workflowsPath }),
  });
  const running = worker.run();
  try {
    const drill = await stack.client.workflow.start('restoreDrillWorkflow', {
      taskQueue,
      workflowId: `drill-${randomBytes(3).toString('hex')}`,
      args: [{ planName: 'keep-test', backupId: older }],
    });
    // Visibility is eventually consistent: wait until the list shows the drill.
    const deadline = Date.now() + 20_000;
    for (;;) {
      const listed = [];
      for await (const execution of stack.client.workflow.list({ query: "WorkflowType = 'restoreDrillWorkflow' AND ExecutionStatus = 'Running'" })) {
        listed.push(execution.workflowId);
      }
      if (listed.includes(drill.workflowId)) break;
      assert.ok(Date.now() < deadline, 'the running drill did not appear in visibility within 20 s');
      await new Promise((resolve) => setTimeout(resolve, 250));
    }

    const report = await runRetention(planFile, false);
    assert.deepEqual(report.unresolvedDrills, []);
    assert.deepEqual(report.deleted, []);
    assert.deepEqual(report.kept, [
      { id: older, reasons: [`used by running drill ${drill.workflowId}`] },
      { id: newer, reasons: ['keepLast'] },
    ]);
    assert.ok(existsSync(path.join(root, 'keep-test', older, 'manifest.json')));

    await drill.signal('finish');
    await drill.result();
    // Once the drill is over, visibility must drop it before the backup is deleted.
    const closedBy = Date.now() + 20_000;
    let final: RetentionReport;
    for (;;) {
      final = await runRetention(planFile, false);
      if (final.deleted.length > 0 || Date.now() > closedBy) break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    assert.deepEqual(final.deleted, [older]);
    assert.ok(!existsSync(path.join(root, 'keep-test', older)));
  } finally {
    worker.shutdown();
    await running;
    await connection.close();
    rmSync(drillFolder, { recursive: true, force: true });
  }
});

test('retention prunes every replica', async () => {
  // The replica missed F, which stores its bundle in C: there no kept
  // backup references C, so the replica deletes C as well as B and E.
  const root = path.join(folder, 'replicated-backups');
  const primary = new LocalBlobStore(root);
  await writeFixture(primary);
  await s3.createBucket('opa-backups-replica');
  const replica = new S3BlobStore({ bucket: 'opa-backups-replica', endpoint: s3.endpoint, region: s3.region });
  await writeFixture(replica, [F]);
  const deadPort = await freePort();
  const planFile = path.join(folder, 'replicated.yaml');
  const planLines = (withDeadReplica: boolean): string[] => [
    'name: keep-test',
    'destination: { local: { path: ./replicated-backups } }',
    'replicas:',
    `  - { name: bucket, s3: { bucket: opa-backups-replica, endpoint: "${s3.endpoint}", region: ${s3.region} } }`,
    ...(withDeadReplica ? [`  - { name: down, s3: { bucket: opa-backups, endpoint: "http://127.0.0.1:${deadPort}", region: ${s3.region} } }`] : []),
    'encryption: { unencrypted: true }',
    'sources: { opa: [{ name: edge-1, url: "http://127.0.0.1:9" }] }',
    'retention: { keepLast: 2, keepDaily: 3, leftoverGrace: 1h }',
    '',
  ];
  writeFileSync(planFile, planLines(false).join('\n'));
  const replicaDeleted = [B, C, E];
  const replicaKept = [A, D, E2, G, H, K].sort();

  const primaryBefore = await keysOf(primary);
  const replicaBefore = await keysOf(replica);
  const dry = await runRetention(planFile, true);
  assertDecision(dry, true);
  assert.deepEqual(
    dry.destinations.map((entry) => [entry.name, entry.state]),
    [
      ['primary', 'complete'],
      ['bucket', 'complete'],
    ],
  );
  assert.deepEqual(dry.destinations[0].deleted, EXPECTED_DELETED);
  assert.deepEqual(dry.destinations[1].deleted, replicaDeleted);
  assert.deepEqual(
    dry.destinations[1].kept.map((kept) => kept.id),
    replicaKept,
  );
  assert.match(dry.destinations[1].destination, /^s3:\/\/opa-backups-replica\//);
  assert.deepEqual(await keysOf(primary), primaryBefore, 'a dry run deletes nothing in the primary');
  assert.deepEqual(await keysOf(replica), replicaBefore, 'a dry run deletes nothing in the replica');

  const report = await runRetention(planFile, false);
  assertDecision(report, false);
  assert.deepEqual(report.destinations[1].state, 'complete');
  assert.deepEqual(report.destinations[1].deleted, replicaDeleted);
  const primaryAfter = readdirSync(path.join(root, 'keep-test')).sort();
  assert.deepEqual(primaryAfter, [...EXPECTED_KEPT, L1, L2, 'notes'].sort());
  const replicaAfter = await keysOf(replica);
  for (const backupId of replicaDeleted) {
    assert.ok(!replicaAfter.some((key) => key.startsWith(`keep-test/${backupId}/`)), `${backupId} is gone from the replica`);
  }
  for (const backupId of replicaKept) {
    assert.ok(replicaAfter.includes(`keep-test/${backupId}/opa/edge-1.tar.gz`), `${backupId} is kept in the replica`);
  }

  // A replica that is down fails alone: the others are pruned and the CLI exits 1.
  await writeFixture(primary);
  await writeFixture(replica, [F]);
  writeFileSync(planFile, planLines(true).join('\n'));
  const run = await cli(['retention', '--plan', planFile, '--json']);
  assert.equal(run.status, 1, `${run.stdout}\n${run.stderr}`);
  assert.match(run.stderr, /failed in destination down/);
  const withDown = JSON.parse(run.stdout) as RetentionReport;
  assert.deepEqual(
    withDown.destinations.map((entry) => [entry.name, entry.state]),
    [
      ['primary', 'complete'],
      ['bucket', 'complete'],
      ['down', 'failed'],
    ],
  );
  assert.deepEqual(withDown.destinations[0].deleted, EXPECTED_DELETED);
  assert.deepEqual(withDown.destinations[1].deleted, replicaDeleted);
  assert.match(withDown.destinations[2].error ?? '', /ECONNREFUSED|connect/i);
  assert.match(withDown.destinations[2].destination, new RegExp(`127\\.0\\.0\\.1:${deadPort}`));
  assert.deepEqual(withDown.destinations[2].deleted, []);

  const text = await cli(['retention', '--plan', planFile, '--dry-run']);
  assert.equal(text.status, 1);
  assert.match(text.stdout, /^down: s3:\/\/opa-backups\//m);
  assert.match(text.stdout, /FAILED: /);
});

test('retention lists ranges, deletes listed keys', async () => {
  // 1,100 folders make three listing ranges. Their artifacts have 80
  // different names, more key sets than planRetention keeps, so some
  // folders are listed again at delete time. Every 100th has a drill report.
  const plan = {
    name: 'ranges',
    destination: { s3: { bucket: 'opa-backups', prefix: 'ranges-test', endpoint: s3.endpoint, region: s3.region } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'edge-1', url: 'http://127.0.0.1:9' }] },
    retention: { keepLast: 10 },
  } as Plan;
  const store = new S3BlobStore(plan.destination.s3!);
  const now = new Date('2026-12-04T00:00:00Z');
  const ids = Array.from({ length: 1100 }, (_, index) =>
    makeBackupId(new Date(now.getTime() - (index + 1) * 3_600_000), index.toString(16).padStart(8, '0')),
  ).sort();
  const uncommitted = makeBackupId(new Date('2025-01-01T00:00:00Z'), 'ffffffff');
  const writes: Array<[string, string]> = [
    [`ranges/${uncommitted}/opa/edge-1.tar.gz`, 'never sealed'],
    ['ranges/notes/readme.txt', 'not a backup folder'],
  ];
  ids.forEach((backupId, index) => {
    writes.push([`ranges/${backupId}/opa/edge-${index % 80}.tar.gz`, `bundle ${index}`]);
    writes.push([`ranges/${backupId}/manifest.json`, JSON.stringify({ backupId, status: 'complete', artifacts: [] })]);
    if (index % 100 === 0) writes.push([`ranges/${backupId}/drills/20261201T000000Z.json`, JSON.stringify({ outcome: 'failed' })]);
  });
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (next < writes.length) {
        const [key, text] = writes[next++];
        await put(store, key, text);
      }
    }),
  );

  // A run deletes at most maxDeletes backups, the oldest, and defers the rest.
  const first = await planRetention({ plan, now: now.toISOString(), maxDeletes: 1000 });
  assert.equal(first.backups, ids.length, 'every committed folder is found once, over three listing ranges');
  assert.deepEqual(first.deleted, ids.slice(0, 1000));
  assert.equal(first.deferred, 90);
  await deleteBackups({ plan, backupIds: first.deleted, contents: first.contents, checkDrills: false });

  const report = await planRetention({ plan, now: now.toISOString(), maxDeletes: 1000 });
  assert.equal(report.backups, 100);
  assert.equal(report.deferred, undefined);
  assert.deepEqual(
    report.kept.map((kept) => kept.id),
    ids.slice(-10),
  );
  assert.deepEqual(report.deleted, ids.slice(1000, -10));
  assert.ok(report.contents.keySets.length <= 64);
  assert.ok(report.contents.keySetOf.includes(-1), 'some folders have a key set beyond the kept ones');
  assert.equal(Object.keys(first.contents.drillReports).length, 10);
  assert.equal(Object.keys(report.contents.drillReports).length, 1);

  // An object written after the listing into a folder whose keys were kept
  // stays behind, in a folder without a manifest. A folder listed again at
  // delete time would lose it too.
  const late = report.deleted.find((_, index) => report.contents.keySetOf[index] >= 0)!;
  await put(store, `ranges/${late}/opa/late.tar.gz`, 'written after the listing');
  await deleteBackups({ plan, backupIds: report.deleted, contents: report.contents, checkDrills: false });

  const left: string[] = [];
  for await (const object of store.list('ranges/')) left.push(object.key);
  const expected = [
    ...writes.map(([key]) => key).filter((key) => ids.slice(-10).some((id) => key.startsWith(`ranges/${id}/`))),
    `ranges/${uncommitted}/opa/edge-1.tar.gz`,
    'ranges/notes/readme.txt',
    `ranges/${late}/opa/late.tar.gz`,
  ].sort();
  assert.deepEqual(left.sort(), expected);

  const later = await planRetention({ plan, now: new Date(Date.now() + 2 * 86_400_000).toISOString() });
  assert.deepEqual(later.deleted, []);
  assert.deepEqual(
    later.leftovers.map((leftover) => leftover.id),
    [uncommitted, late].sort(),
  );
});
