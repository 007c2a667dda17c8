// `opa-backup doctor` against the real S3-compatible server and local
// folders: a versioned bucket passes the versioning check and an
// unversioned one gets a warning with the command that fixes it, a missing
// bucket and a replica on a dead port fail with their names, a setting the
// server does not implement is reported as unknown, and local folders
// report writes, free space and a shared filesystem.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, type ExecFileException } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  CreateBucketCommand,
  PutBucketLifecycleConfigurationCommand,
  PutBucketVersioningCommand,
  PutObjectLockConfigurationCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { S3BlobStore } from '../activities/storage/s3';
import type { DoctorCheck, DoctorReport } from '../client/doctor';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startS3Server, type S3Server } from './harness/s3-server';
import { repositoryRoot } from './harness/tools';

let s3: S3Server;
let folder: string;
let credentials: Record<string, string>;
let client: S3Client;

before(async () => {
  s3 = await startS3Server({ name: 'doctor' });
  await s3.createBucket('versioned');
  await s3.createBucket('plain');
  credentials = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region };
  Object.assign(process.env, credentials);
  client = new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    forcePathStyle: true,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
  });
  await client.send(new PutBucketVersioningCommand({ Bucket: 'versioned', VersioningConfiguration: { Status: 'Enabled' } }));
  folder = mkdtempSync(path.join(runsDirectory, 'doctor-'));
});

after(async () => {
  client?.destroy();
  await s3?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

/** Returns a child's exit code: 0 without an error, null when a signal ended it. */
function exitStatus(error: ExecFileException | null): number | null {
  if (!error) return 0;
  return typeof error.code === 'number' ? error.code : null;
}

function doctor(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [path.join(repositoryRoot, 'bin', 'opa-backup'), 'doctor', ...args],
      { encoding: 'utf8', timeout: 60_000, env: { ...process.env, ...credentials } },
      (error, stdout, stderr) => resolve({ status: exitStatus(error), stdout, stderr }),
    );
  });
}

function writePlan(name: string, lines: string[]): string {
  const file = path.join(folder, `${name}.yaml`);
  writeFileSync(
    file,
    [
      `name: ${name}`,
      ...lines,
      'encryption: { unencrypted: true }',
      'sources: { opa: [{ name: edge-1, url: "http://127.0.0.1:9" }] }',
      'retention: { keepDaily: 7, keepWithin: 2d }',
      '',
    ].join('\n'),
  );
  return file;
}

const s3Destination = (bucket: string, endpoint = s3.endpoint): string =>
  `{ s3: { bucket: ${bucket}, prefix: team, endpoint: "${endpoint}", region: ${s3.region} } }`;

/** Returns the named check of the named destination, failing the test when it is absent. */
function checkOf(report: DoctorReport, destination: string, check: string): DoctorCheck {
  const entry = report.destinations.find((candidate) => candidate.name === destination);
  assert.ok(entry, `destination ${destination} in ${JSON.stringify(report.destinations.map((candidate) => candidate.name))}`);
  const found = entry.checks.find((candidate) => candidate.check === check);
  assert.ok(found, `check ${check} of ${destination} in ${JSON.stringify(entry.checks)}`);
  return found;
}

test('doctor versioned and plain buckets', async () => {
  const planFile = writePlan('two-buckets', [
    `destination: ${s3Destination('versioned')}`,
    'replicas:',
    `  - { name: plain, ${s3Destination('plain').slice(2)}`,
  ]);
  const run = await doctor(['--plan', planFile, '--json']);
  assert.equal(run.status, 0, `${run.stdout}\n${run.stderr}`);
  const report = JSON.parse(run.stdout) as DoctorReport;
  assert.equal(report.failed, false);
  assert.deepEqual(
    report.destinations.map((entry) => [entry.name, entry.kind]),
    [
      ['primary', 's3'],
      ['plain', 's3'],
    ],
  );

  assert.equal(checkOf(report, 'primary', 'bucket').state, 'ok');
  assert.equal(checkOf(report, 'plain', 'bucket').state, 'ok');
  assert.equal(checkOf(report, 'primary', 'write').state, 'ok');
  assert.match(checkOf(report, 'primary', 'write').message, /team\/two-buckets\/\.doctor-[0-9a-f]{12}/);
  assert.equal(checkOf(report, 'plain', 'write').state, 'ok');

  assert.equal(checkOf(report, 'primary', 'versioning').state, 'ok');
  const plain = checkOf(report, 'plain', 'versioning');
  assert.equal(plain.state, 'warn');
  assert.match(plain.fix ?? '', /put-bucket-versioning --bucket plain --versioning-configuration Status=Enabled --endpoint-url http:\/\/127\.0\.0\.1:/);

  // SeaweedFS 4.48 implements GetObjectLockConfiguration and
  // GetBucketLifecycleConfiguration, so these checks have a result here.
  for (const name of ['primary', 'plain']) {
    const lock = checkOf(report, name, 'object lock');
    assert.equal(lock.state, 'warn');
    assert.match(lock.message, /Object Lock is not enabled/);
    assert.match(lock.fix ?? '', /"Mode":"COMPLIANCE","Days":2\}/);
    assert.equal(checkOf(report, name, 'lifecycle expiration').state, 'ok');
    const uploads = checkOf(report, name, 'lifecycle uploads');
    assert.equal(uploads.state, 'warn');
    assert.match(uploads.fix ?? '', /"AbortIncompleteMultipartUpload":\{"DaysAfterInitiation":7\}/);
    assert.equal(checkOf(report, name, 'separation').state, 'ok');
    // SeaweedFS 4.48 returns 501 NotImplemented to GetPublicAccessBlock.
    const publicAccess = checkOf(report, name, 'public access');
    assert.equal(publicAccess.state, 'unknown');
    assert.match(publicAccess.message, /^unknown: the server does not support GetPublicAccessBlock \(NotImplemented \(HTTP 501\)/);
  }

  for (const bucket of ['versioned', 'plain']) {
    const store = new S3BlobStore({ bucket, prefix: 'team', endpoint: s3.endpoint, region: s3.region });
    const left: string[] = [];
    for await (const object of store.list('two-buckets/')) left.push(object.key);
    store.client.destroy();
    assert.deepEqual(left, [], `probe objects left in ${bucket}`);
  }

  const text = await doctor(['--plan', planFile]);
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, /^primary: s3:\/\/versioned\/team\//m);
  assert.match(text.stdout, /^plain: s3:\/\/plain\/team\//m);
  assert.match(text.stdout, /^ {2}versioning +warn +versioning is not enabled/m);
  assert.match(text.stdout, /^ {2}public access +unknown +unknown: the server does not support GetPublicAccessBlock/m);
  assert.match(text.stdout, /, 0 fail, 2 unknown$/m);
});

test('doctor object lock and lifecycle', async () => {
  // The plan keeps backups for 2 days (keepWithin) to 7 days (keepDaily).
  for (const [bucket, days] of [
    ['locked-long', 400],
    ['locked-fit', 3],
  ] as const) {
    await client.send(new CreateBucketCommand({ Bucket: bucket, ObjectLockEnabledForBucket: true }));
    await client.send(
      new PutObjectLockConfigurationCommand({
        Bucket: bucket,
        ObjectLockConfiguration: { ObjectLockEnabled: 'Enabled', Rule: { DefaultRetention: { Mode: 'COMPLIANCE', Days: days } } },
      }),
    );
  }
  await s3.createBucket('expiring');
  await client.send(
    new PutBucketLifecycleConfigurationCommand({
      Bucket: 'expiring',
      LifecycleConfiguration: {
        Rules: [
          { ID: 'expire-team', Status: 'Enabled', Filter: { Prefix: 'team/' }, Expiration: { Days: 30 } },
          { ID: 'abort-uploads', Status: 'Enabled', Filter: { Prefix: 'team/locks/' }, AbortIncompleteMultipartUpload: { DaysAfterInitiation: 3 } },
          { ID: 'expire-other', Status: 'Enabled', Filter: { Prefix: 'other/' }, Expiration: { Days: 1 } },
        ],
      },
    }),
  );
  const planFile = writePlan('locks', [
    `destination: ${s3Destination('locked-long')}`,
    'replicas:',
    `  - { name: fit, ${s3Destination('locked-fit').slice(2)}`,
    `  - { name: expiring, ${s3Destination('expiring').slice(2)}`,
  ]);
  const run = await doctor(['--plan', planFile, '--json']);
  assert.equal(run.status, 0, `${run.stdout}\n${run.stderr}`);
  const report = JSON.parse(run.stdout) as DoctorReport;

  const long = checkOf(report, 'primary', 'object lock');
  assert.equal(long.state, 'warn');
  assert.match(long.message, /COMPLIANCE with a default retention of 400 days outlasts the 7 days/);
  assert.match(long.fix ?? '', /at most 7 days/);
  // Object Lock keeps the probe's version, so doctor deletes it with a delete marker.
  assert.equal(checkOf(report, 'primary', 'write').state, 'ok');
  assert.match(checkOf(report, 'primary', 'write').message, /stays until/);
  assert.equal(checkOf(report, 'primary', 'versioning').state, 'ok');

  const fit = checkOf(report, 'fit', 'object lock');
  assert.equal(fit.state, 'ok', JSON.stringify(fit));
  assert.match(fit.message, /3 days, within what the retention rules keep/);

  const expiration = checkOf(report, 'expiring', 'lifecycle expiration');
  assert.equal(expiration.state, 'warn');
  assert.match(expiration.message, /rule expire-team expires objects under "team\/" after 30 days/);
  const expiring = report.destinations.find((entry) => entry.name === 'expiring')!;
  assert.ok(!expiring.checks.some((check) => check.message.includes('expire-other')), 'a rule for another prefix is ignored');
  const uploads = checkOf(report, 'expiring', 'lifecycle uploads');
  assert.equal(uploads.state, 'ok');
  assert.match(uploads.message, /abort-uploads aborts incomplete multipart uploads after 3 days/);
});

test('doctor missing bucket fails', async () => {
  const planFile = writePlan('missing-bucket', [`destination: ${s3Destination('no-such-bucket')}`]);
  const run = await doctor(['--plan', planFile, '--json']);
  assert.equal(run.status, 1, `${run.stdout}\n${run.stderr}`);
  const report = JSON.parse(run.stdout) as DoctorReport;
  assert.equal(report.failed, true);
  const bucket = checkOf(report, 'primary', 'bucket');
  assert.equal(bucket.state, 'fail');
  assert.match(bucket.message, /bucket no-such-bucket does not exist/);
  assert.match(bucket.fix ?? '', /create-bucket --bucket no-such-bucket/);
});

test('doctor replica on dead port fails', async () => {
  const deadPort = await freePort();
  const planFile = writePlan('dead-replica', [
    `destination: ${s3Destination('versioned')}`,
    'replicas:',
    `  - { name: far-away, ${s3Destination('versioned', `http://127.0.0.1:${deadPort}`).slice(2)}`,
  ]);
  const run = await doctor(['--plan', planFile]);
  assert.equal(run.status, 1, `${run.stdout}\n${run.stderr}`);
  assert.match(run.stdout, new RegExp(`^far-away: s3://versioned/team/ at http://127\\.0\\.0\\.1:${deadPort}$`, 'm'));
  assert.match(run.stdout, new RegExp(`bucket +fail +endpoint http://127\\.0\\.0\\.1:${deadPort} is unreachable`));
  assert.match(run.stdout, /^failed: far-away \(bucket\)$/m);

  const json = JSON.parse((await doctor(['--plan', planFile, '--json'])).stdout) as DoctorReport;
  assert.equal(checkOf(json, 'primary', 'bucket').state, 'ok');
  assert.equal(checkOf(json, 'far-away', 'bucket').state, 'fail');
  assert.deepEqual(
    json.destinations.find((entry) => entry.name === 'far-away')!.checks.map((check) => check.check),
    ['bucket', 'separation'],
  );
});

test('doctor local destinations', async () => {
  const primary = path.join(folder, 'local-primary');
  mkdirSync(primary);
  const planFile = writePlan('local-folders', [
    `destination: { local: { path: ${primary} } }`,
    'replicas:',
    `  - { name: same-disk, local: { path: ${path.join(folder, 'not-yet', 'created')} } }`,
  ]);
  const run = await doctor(['--plan', planFile, '--json', '--min-free', '1MiB']);
  assert.equal(run.status, 0, `${run.stdout}\n${run.stderr}`);
  const report = JSON.parse(run.stdout) as DoctorReport;
  assert.equal(checkOf(report, 'primary', 'folder').state, 'ok');
  assert.equal(checkOf(report, 'primary', 'write').state, 'ok');
  assert.equal(checkOf(report, 'primary', 'free space').state, 'ok');
  assert.match(checkOf(report, 'primary', 'free space').message, /GiB free of/);
  const missing = checkOf(report, 'same-disk', 'folder');
  assert.equal(missing.state, 'ok');
  assert.match(missing.message, /does not exist yet; the first backup creates it/);
  for (const name of ['primary', 'same-disk']) {
    const separation = checkOf(report, name, 'separation');
    assert.equal(separation.state, 'warn');
    assert.match(separation.message, /same filesystem as destination/);
  }

  const tight = JSON.parse((await doctor(['--plan', planFile, '--json', '--min-free', '1024TiB'])).stdout) as DoctorReport;
  assert.equal(checkOf(tight, 'primary', 'free space').state, 'warn');
  assert.match(checkOf(tight, 'primary', 'free space').message, /under the 1048576\.0 GiB threshold/);

  const blocked = path.join(folder, 'a-file');
  writeFileSync(blocked, 'not a folder');
  const filePlan = writePlan('local-file', [`destination: { local: { path: ${blocked} } }`]);
  const failed = await doctor(['--plan', filePlan, '--json']);
  assert.equal(failed.status, 1, failed.stdout);
  assert.equal(checkOf(JSON.parse(failed.stdout) as DoctorReport, 'primary', 'folder').state, 'fail');

  const usage = await doctor(['--plan', planFile, '--min-free', 'lots']);
  assert.equal(usage.status, 2);
  assert.match(usage.stderr, /invalid size "lots"/);
});
