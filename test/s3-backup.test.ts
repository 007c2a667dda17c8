// A backup through Temporal into the real S3-compatible server: the bundle
// and the manifest land under the plan's prefix, the stored digests match,
// and the bundle restores into a fresh OPA.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { listBackups } from '../client/backups';
import { S3BlobStore } from '../activities/storage/s3';
import type { Manifest, OpaFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startS3Server, type S3Server } from './harness/s3-server';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot } from './harness/tools';

const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
let s3: S3Server;
let stack: Stack;
let opa: OpaServer;

before(async () => {
  s3 = await startS3Server({ name: 's3-backup' });
  await s3.createBucket('opa-backups');
  const credentials = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region };
  Object.assign(process.env, credentials);
  stack = await startStack('s3-backup', credentials);
  opa = await startOpa('s3-backup-opa');
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
});

after(async () => {
  await opa?.stop();
  await stack?.stop();
  await s3?.stop();
});

async function readObject(store: S3BlobStore, key: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

test('backup to S3 stores bundle and manifest under the prefix', async () => {
  const plan: Plan = {
    name: 's3-plan',
    destination: { s3: { bucket: 'opa-backups', prefix: 'team/opa', endpoint: s3.endpoint, region: s3.region } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'edge-1', url: opa.url, probes: [{ path: 'app/authz/allow', input: { user: 'alice', action: 'write', resource: '/reports/q3' } }] }] },
  };
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete');
  assert.match(result.destination, /^s3:\/\/opa-backups\/team\/opa\//);

  const store = new S3BlobStore({ bucket: 'opa-backups', prefix: 'team/opa', endpoint: s3.endpoint, region: s3.region });
  const manifestBytes = await readObject(store, result.manifestKey);
  assert.equal(createHash('sha256').update(manifestBytes).digest('hex'), result.manifestSha256);
  const manifest = JSON.parse(manifestBytes.toString('utf8')) as Manifest;
  assert.equal(manifest.status, 'complete');

  const artifact = manifest.artifacts[0];
  const bundle = await readObject(store, `s3-plan/${result.backupId}/${artifact.key}`);
  assert.equal(bundle.length, artifact.size);
  assert.equal(createHash('sha256').update(bundle).digest('hex'), artifact.sha256);

  // Only the artifact and the manifest remain in the backup's folder.
  const keys: string[] = [];
  for await (const object of store.list(`s3-plan/${result.backupId}/`)) keys.push(object.key);
  assert.deepEqual(keys.sort(), [`s3-plan/${result.backupId}/manifest.json`, `s3-plan/${result.backupId}/opa/edge-1.tar.gz`]);

  const listed = await listBackups(plan);
  assert.deepEqual(
    listed.map((backup) => backup.backupId),
    [result.backupId],
  );

  // The bundle, read back from S3, restores and decides as the source did.
  const folder = mkdtempSync(path.join(runsDirectory, 's3-restore-'));
  const file = path.join(folder, 'edge-1.tar.gz');
  writeFileSync(file, bundle);
  const restored = await startOpa('s3-backup-restored', { args: ['--bundle', file] });
  try {
    const response = await fetch(`${restored.url}/v1/data/app/authz/allow`, {
      method: 'POST',
      body: JSON.stringify({ input: (artifact.facts as OpaFacts).probes[0].input }),
    });
    const body = (await response.json()) as { result?: unknown };
    assert.equal(JSON.stringify(body.result), (artifact.facts as OpaFacts).probes[0].resultJson);
  } finally {
    await restored.stop();
    rmSync(folder, { recursive: true, force: true });
  }
});
