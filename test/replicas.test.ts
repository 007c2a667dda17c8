// Replicated destinations on the real S3-compatible server: every artifact
// and manifest reaches each destination, `list` names the destinations of
// each backup, and a destination that is down makes the backup partial and
// is named in the result.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { generateIdentity } from '../activities/crypto/age';
import { S3BlobStore } from '../activities/storage/s3';
import { listBackups } from '../client/backups';
import type { Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startOpa, type OpaServer } from './harness/opa';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startS3Server, type S3Server } from './harness/s3-server';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot } from './harness/tools';

const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
const recipient = generateIdentity().recipient.toString();
let s3: S3Server;
let stack: Stack;
let opa: OpaServer;

before(async () => {
  s3 = await startS3Server({ name: 'replicas' });
  await s3.createBucket('backups-east');
  await s3.createBucket('backups-west');
  const credentials = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region };
  Object.assign(process.env, credentials);
  stack = await startStack('replicas', credentials);
  opa = await startOpa('replicas-opa');
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
});

after(async () => {
  await opa?.stop();
  await stack?.stop();
  await s3?.stop();
});

function bucket(name: string, endpoint = s3.endpoint): { bucket: string; endpoint: string; region: string } {
  return { bucket: name, endpoint, region: s3.region };
}

async function objects(store: S3BlobStore, prefix: string): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  for await (const object of store.list(prefix)) {
    const chunks: Buffer[] = [];
    for await (const chunk of await store.get(object.key)) chunks.push(chunk as Buffer);
    found.set(object.key, createHash('sha256').update(Buffer.concat(chunks)).digest('hex'));
  }
  return found;
}

test('two destinations both receive the whole backup', async () => {
  const plan: Plan = {
    name: 'replicated',
    destination: { s3: bucket('backups-east') },
    replicas: [{ name: 'west', s3: bucket('backups-west') }],
    encryption: { recipients: [recipient] },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  assert.deepEqual(result.destinations, [
    { name: 'primary', state: 'complete' },
    { name: 'west', state: 'complete' },
  ]);

  const prefix = `replicated/${result.backupId}/`;
  const east = await objects(new S3BlobStore(bucket('backups-east')), prefix);
  const west = await objects(new S3BlobStore(bucket('backups-west')), prefix);
  assert.deepEqual([...east.keys()].sort(), [`${prefix}facts.json.gz.age`, `${prefix}manifest.json`, `${prefix}opa/edge.tar.gz.age`]);
  // The same bytes in both buckets: one encryption, streamed to both.
  assert.deepEqual(west, east);

  const listed = await listBackups(plan);
  assert.deepEqual(
    listed.map((backup) => [backup.backupId, backup.status, backup.destinations]),
    [[result.backupId, 'complete', ['primary', 'west']]],
  );
});

test('a destination that is down makes the backup partial and names it', async () => {
  const deadEndpoint = `http://127.0.0.1:${await freePort()}`;
  const plan: Plan = {
    name: 'half-down',
    destination: { s3: bucket('backups-east') },
    replicas: [{ name: 'west', s3: bucket('backups-west', deadEndpoint) }],
    encryption: { recipients: [recipient] },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  const result = await stack.backup(plan);
  assert.equal(result.status, 'partial');
  assert.equal(result.destinations?.[0].state, 'complete');
  assert.equal(result.destinations?.[1].name, 'west');
  assert.equal(result.destinations?.[1].state, 'failed');
  assert.match(result.destinations?.[1].error ?? '', /storing opa\/edge\.tar\.gz\.age failed/);
  const failure = result.failures.find((entry) => entry.kind === 'destination');
  assert.equal(failure?.source, 'west');

  const east = new S3BlobStore(bucket('backups-east'));
  const chunks: Buffer[] = [];
  for await (const chunk of await east.get(result.manifestKey)) chunks.push(chunk as Buffer);
  const manifest = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Manifest;
  assert.equal(manifest.status, 'partial');
  assert.deepEqual(
    manifest.destinations?.map((destination) => [destination.name, destination.state]),
    [
      ['primary', 'complete'],
      ['west', 'failed'],
    ],
  );

  // list names the primary as the only holder and reports the unreachable replica.
  const planFile = path.join(runsDirectory, 'replicas-half-down.json');
  writeFileSync(planFile, JSON.stringify(plan));
  const run = spawnSync(process.execPath, [path.join(repositoryRoot, 'bin', 'opa-backup'), 'list', '--plan', planFile], {
    encoding: 'utf8',
    env: process.env,
    timeout: 120_000,
  });
  assert.equal(run.status, 1, run.stderr);
  assert.match(run.stderr, /destination west cannot be listed/);
  assert.match(run.stdout, new RegExp(`${result.backupId}\\s+partial\\s+.*\\sprimary$`, 'm'));
});

test('the CLI prints each destination of a backup', async () => {
  const planFile = path.join(runsDirectory, 'replicas-cli.json');
  const plan: Plan = {
    name: 'replicated-cli',
    destination: { s3: bucket('backups-east') },
    replicas: [{ name: 'west', s3: bucket('backups-west') }],
    encryption: { recipients: [recipient] },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  writeFileSync(planFile, JSON.stringify(plan));
  const child = spawnSync(process.execPath, [path.join(repositoryRoot, 'bin', 'opa-backup'), 'backup', '--plan', planFile, '--wait'], {
    encoding: 'utf8',
    env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
    timeout: 120_000,
  });
  assert.equal(child.status, 0, child.stdout + child.stderr);
  assert.match(child.stdout, /destination primary: complete\n\s+destination west: complete/);
});

test('verify falls back to replicas', async () => {
  const plan: Plan = {
    name: 'replicated-verify',
    destination: { s3: bucket('backups-east') },
    replicas: [{ name: 'west', s3: bucket('backups-west') }],
    encryption: { recipients: [recipient] },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete');
  await new S3BlobStore(bucket('backups-east')).delete(`replicated-verify/${result.backupId}/opa/edge.tar.gz.age`);
  const planFile = path.join(runsDirectory, 'replicas-verify.json');
  writeFileSync(planFile, JSON.stringify(plan));
  const verify = (...args: string[]) =>
    spawnSync(process.execPath, [path.join(repositoryRoot, 'bin', 'opa-backup'), 'verify', ...args, '--plan', planFile], {
      encoding: 'utf8',
      env: process.env,
      timeout: 120_000,
    });

  const any = verify(result.backupId);
  assert.equal(any.status, 0, any.stdout + any.stderr);
  assert.doesNotMatch(any.stderr, /NodeVersionSupportWarning/);
  const primary = verify(result.backupId, '--destination', 'primary');
  assert.equal(primary.status, 4, primary.stdout + primary.stderr);
  assert.match(primary.stdout, /DAMAGED .*opa\/edge\.tar\.gz\.age/);
  const west = verify('latest', '--destination', 'west');
  assert.equal(west.status, 0, west.stdout + west.stderr);
  assert.match(west.stdout, new RegExp(`backup ${result.backupId}: verified`));
  const unknown = verify('latest', '--destination', 'north');
  assert.equal(unknown.status, 2, unknown.stderr);
  assert.match(unknown.stderr, /--destination "north" is not a destination of plan replicated-verify; use one of primary, west/);
});

test('returning replica receives missed backups', async () => {
  const deadEndpoint = `http://127.0.0.1:${await freePort()}`;
  const plan = (endpoint: string): Plan => ({
    name: 'catch-up',
    destination: { s3: bucket('backups-east') },
    replicas: [{ name: 'west', s3: bucket('backups-west', endpoint) }],
    encryption: { recipients: [recipient] },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  });
  const missed = await stack.backup(plan(deadEndpoint));
  assert.equal(missed.status, 'partial');
  assert.equal(missed.caughtUp, undefined, 'nothing earlier to copy');

  const next = await stack.backup(plan(s3.endpoint));
  assert.equal(next.status, 'complete', JSON.stringify(next.failures));
  assert.deepEqual(next.caughtUp, [{ name: 'west', copied: [missed.backupId] }]);
  const prefix = `catch-up/${missed.backupId}/`;
  const east = await objects(new S3BlobStore(bucket('backups-east')), prefix);
  const west = await objects(new S3BlobStore(bucket('backups-west')), prefix);
  assert.ok(east.has(`${prefix}manifest.json`));
  assert.deepEqual(west, east, 'the replica contains the same bytes as the primary');

  const listed = await listBackups(plan(s3.endpoint));
  assert.deepEqual(
    listed.map((backup) => [backup.backupId, backup.destinations]),
    [
      [missed.backupId, ['primary', 'west']],
      [next.backupId, ['primary', 'west']],
    ],
  );

  // Nothing is missing any more: the next backup copies nothing.
  const third = await stack.backup(plan(s3.endpoint));
  assert.equal(third.caughtUp, undefined);

  // A missed backup whose primary copy was damaged since is not copied, and nothing of it is left in the replica.
  const damaged = await stack.backup(plan(deadEndpoint));
  const primary = new S3BlobStore(bucket('backups-east'));
  await primary.put(`catch-up/${damaged.backupId}/opa/edge.tar.gz.age`, Readable.from([Buffer.from('not what was stored')]));
  const after = await stack.backup(plan(s3.endpoint));
  assert.equal(after.caughtUp?.length, 1);
  assert.deepEqual(after.caughtUp?.[0].copied, []);
  assert.equal(after.caughtUp?.[0].damaged?.[0].backupId, damaged.backupId);
  assert.match(after.caughtUp?.[0].damaged?.[0].reason ?? '', /opa\/edge\.tar\.gz\.age does not match the manifest: 19 bytes/);
  assert.deepEqual([...(await objects(new S3BlobStore(bucket('backups-west')), `catch-up/${damaged.backupId}/`)).keys()], []);
});
