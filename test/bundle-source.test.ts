// Bundle sources through Temporal. A bundle served over HTTP with a token
// and an ETag, and one in an S3 bucket, are stored byte for byte, and the
// stored bundle starts a fresh OPA (with --verification-key when signed).
// An unchanged bundle is not stored twice. A wrong token fails at once and
// a server that is down is retried. The CI example script runs against the
// same servers.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash, generateKeyPairSync } from 'node:crypto';
import { createReadStream, createWriteStream, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGunzip, createGzip } from 'node:zlib';
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import tar from 'tar-stream';
import { PlanError, validatePlan } from '../activities/plan-loader';
import { inspectBundle } from '../activities/sources/bundle';
import type { BundleFacts, Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startBundleServer, type BundleServer } from './harness/bundle-server';
import { startOpa } from './harness/opa';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startS3Server, type S3Server } from './harness/s3-server';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool, toolsBin } from './harness/tools';
import { startWorker } from './harness/worker';

const TOKEN = 'bundle-test-token-6b1f';
const HMAC_SECRET = 'bundle-test-hmac-secret';
const POLICY = 'package app.authz\n\ndefault allow := false\n\nallow if input.user in data.admins\n';

let stack: Stack;
let server: BundleServer;
let s3: S3Server;
let folder: string;
let keys: { rsaPublic: string; rsaPrivate: string; ecPublic: string; ecPrivate: string; otherRsaPublic: string };
/** Bundles built by `opa build`, by name. */
const bundles: Record<string, string> = {};

function opaBuild(name: string, admins: string[], extra: string[] = []): string {
  const source = path.join(folder, `${name}-src`);
  mkdirSync(source, { recursive: true });
  writeFileSync(path.join(source, 'authz.rego'), POLICY);
  writeFileSync(path.join(source, 'data.json'), JSON.stringify({ admins, limit: 1.0 }).replace('1}', '1.0}'));
  const output = path.join(folder, `${name}.tar.gz`);
  execFileSync(tool('opa'), ['build', '--bundle', source, '--revision', `${name}-rev`, '--output', output, ...extra]);
  return output;
}

/** Rewrites a bundle with data.json replaced, keeping every other file, .signatures.json included. */
async function tamper(file: string, output: string): Promise<void> {
  const extract = tar.extract();
  const pack = tar.pack();
  const written = pipeline(pack, createGzip(), createWriteStream(output));
  const reading = pipeline(createReadStream(file), createGunzip(), extract);
  for await (const entry of extract) {
    const chunks: Buffer[] = [];
    for await (const chunk of entry) chunks.push(chunk as Buffer);
    const body = entry.header.name.endsWith('data.json') ? Buffer.from('{"admins":["mallory"],"limit":1.0}') : Buffer.concat(chunks);
    pack.entry({ name: entry.header.name, size: body.length }, body);
  }
  await reading;
  pack.finalize();
  await written;
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'bundle-source-'));
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const otherRsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  keys = {
    rsaPublic: path.join(folder, 'rsa-public.pem'),
    rsaPrivate: path.join(folder, 'rsa-private.pem'),
    ecPublic: path.join(folder, 'ec-public.pem'),
    ecPrivate: path.join(folder, 'ec-private.pem'),
    otherRsaPublic: path.join(folder, 'other-rsa-public.pem'),
  };
  writeFileSync(keys.rsaPublic, rsa.publicKey.export({ type: 'spki', format: 'pem' }));
  writeFileSync(keys.rsaPrivate, rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  writeFileSync(keys.ecPublic, ec.publicKey.export({ type: 'spki', format: 'pem' }));
  writeFileSync(keys.ecPrivate, ec.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  writeFileSync(keys.otherRsaPublic, otherRsa.publicKey.export({ type: 'spki', format: 'pem' }));

  bundles.plain = opaBuild('plain', ['alice']);
  bundles.changed = opaBuild('changed', ['alice', 'bob']);
  bundles.rs256 = opaBuild('rs256', ['alice'], ['--signing-key', keys.rsaPrivate]);
  bundles.es256 = opaBuild('es256', ['alice'], ['--signing-alg', 'ES256', '--signing-key', keys.ecPrivate]);
  bundles.hs256 = opaBuild('hs256', ['alice'], ['--signing-alg', 'HS256', '--signing-key', HMAC_SECRET]);
  bundles.tampered = path.join(folder, 'tampered.tar.gz');
  await tamper(bundles.rs256, bundles.tampered);
  writeFileSync(path.join(folder, 'hmac-secret'), HMAC_SECRET);

  server = await startBundleServer({ token: TOKEN });
  s3 = await startS3Server({ name: 'bundle-source-s3' });
  await s3.createBucket('published');
  const credentials = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region };
  stack = await startStack('bundle-source', {
    ...credentials,
    BUNDLE_TEST_TOKEN: TOKEN,
    BUNDLE_TEST_WRONG_TOKEN: 'not-the-token',
    BUNDLE_TEST_PASSPHRASE: 'bundle-test-passphrase',
  });
});

after(async () => {
  await stack?.stop();
  await server?.stop();
  await s3?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

const sha256 = (file: string): string => createHash('sha256').update(readFileSync(file)).digest('hex');

const fastRetries = {
  bundleFetch: { heartbeatTimeout: '5s', attemptTimeout: '1m', retry: { initialInterval: '200ms', maximumInterval: '500ms', maximumAttempts: 20 } },
};

function planFor(name: string, sources: NonNullable<Plan['sources']['bundle']>): Plan {
  return {
    name,
    destination: { local: { path: path.join(folder, 'store') } },
    encryption: { unencrypted: true },
    sources: { bundle: sources },
    settings: fastRetries,
  } as Plan;
}

function readManifest(plan: Plan, manifestKey: string): Manifest {
  return JSON.parse(readFileSync(path.join(folder, 'store', manifestKey), 'utf8')) as Manifest;
}

/** Files stored in a backup's folder, relative to it. */
function storedFiles(plan: Plan, backupId: string): string[] {
  const root = path.join(folder, 'store', plan.name, backupId);
  return (readdirSync(root, { recursive: true }) as string[]).filter((name) => !name.endsWith('/') && name.includes('.')).sort();
}

/** Starts OPA with the stored bundle and returns its decision for `user`. */
async function decide(file: string, name: string, user: string, args: string[] = []): Promise<unknown> {
  const opa = await startOpa(name, { args: ['--bundle', file, ...args] });
  try {
    const response = await fetch(`${opa.url}/v1/data/app/authz/allow`, { method: 'POST', body: JSON.stringify({ input: { user } }) });
    return ((await response.json()) as { result?: unknown }).result;
  } finally {
    await opa.stop();
  }
}

test('http bundle stored unchanged and restores', async () => {
  server.serve('plain.tar.gz', { file: bundles.plain });
  const plan = planFor('http-bundle', [{ name: 'authz', url: `${server.url}/bundles/plain.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));

  const artifact = readManifest(plan, result.manifestKey).artifacts[0];
  assert.equal(artifact.kind, 'bundle');
  assert.equal(artifact.key, 'bundle/authz.tar.gz');
  const facts = artifact.facts as BundleFacts;
  assert.equal(facts.revision, 'plain-rev');
  assert.deepEqual(facts.roots, ['']);
  assert.equal(facts.etag, `"${sha256(bundles.plain)}"`);
  assert.equal(facts.bundleSha256, sha256(bundles.plain));
  assert.deepEqual(facts.signature, { signed: false, verified: 'not checked' });
  assert.equal(facts.unchanged, undefined);

  const stored = path.join(folder, 'store', plan.name, result.backupId, artifact.key);
  assert.equal(sha256(stored), sha256(bundles.plain));
  assert.equal(artifact.sha256, sha256(bundles.plain));
  assert.equal(await decide(stored, 'bundle-source-restored-http', 'alice'), true);
  assert.equal(await decide(stored, 'bundle-source-restored-http-2', 'bob'), false);
});

test('unchanged bundle reused via ETag', async () => {
  server.serve('etag.tar.gz', { file: bundles.plain });
  const plan = planFor('etag-reuse', [{ name: 'authz', url: `${server.url}/bundles/etag.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]);
  const first = await stack.backup(plan);
  const second = await stack.backup(plan);
  assert.equal(second.status, 'complete', JSON.stringify(second.failures));

  assert.equal(server.requests('etag.tar.gz').get(304), 1);
  const artifact = readManifest(plan, second.manifestKey).artifacts[0];
  assert.equal(artifact.storedIn, first.backupId);
  assert.equal(artifact.key, 'bundle/authz.tar.gz');
  assert.equal(artifact.sha256, sha256(bundles.plain));
  const facts = artifact.facts as BundleFacts;
  assert.equal(facts.unchanged, true);
  assert.equal(facts.unchangedBy, 'etag');
  assert.equal(facts.revision, 'plain-rev');
  assert.deepEqual(storedFiles(plan, second.backupId), ['manifest.json']);
  assert.deepEqual(storedFiles(plan, first.backupId), ['bundle/authz.tar.gz', 'manifest.json']);

  // A third backup still points at the first one's bytes.
  const third = await stack.backup(plan);
  assert.equal(readManifest(plan, third.manifestKey).artifacts[0].storedIn, first.backupId);

  // A changed bundle is stored again.
  server.serve('etag.tar.gz', { file: bundles.changed });
  const fourth = await stack.backup(plan);
  const changed = readManifest(plan, fourth.manifestKey).artifacts[0];
  assert.equal(changed.storedIn, undefined);
  assert.equal((changed.facts as BundleFacts).revision, 'changed-rev');
  assert.deepEqual(storedFiles(plan, fourth.backupId), ['bundle/authz.tar.gz', 'manifest.json']);
});

test('unchanged bundle reused via digest', async () => {
  server.serve('no-etag.tar.gz', { file: bundles.plain, etag: false });
  const plan = planFor('digest-reuse', [{ name: 'authz', url: `${server.url}/bundles/no-etag.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]);
  const first = await stack.backup(plan);
  const second = await stack.backup(plan);
  assert.equal(second.status, 'complete', JSON.stringify(second.failures));

  assert.equal(server.conditionalRequests('no-etag.tar.gz'), 0);
  assert.equal(server.requests('no-etag.tar.gz').get(200), 2);
  const artifact = readManifest(plan, second.manifestKey).artifacts[0];
  assert.equal(artifact.storedIn, first.backupId);
  const facts = artifact.facts as BundleFacts;
  assert.equal(facts.unchanged, true);
  assert.equal(facts.unchangedBy, 'sha256');
  assert.equal(facts.etag, undefined);
  assert.deepEqual(storedFiles(plan, second.backupId), ['manifest.json']);

  // When the earlier backup lost its bytes, the next backup stores them again.
  rmSync(path.join(folder, 'store', plan.name, first.backupId, 'bundle', 'authz.tar.gz'));
  const third = await stack.backup(plan);
  const restored = readManifest(plan, third.manifestKey).artifacts[0];
  assert.equal(restored.storedIn, undefined);
  assert.equal((restored.facts as BundleFacts).unchanged, undefined);
  assert.deepEqual(storedFiles(plan, third.backupId), ['bundle/authz.tar.gz', 'manifest.json']);
});

test('encrypted backups reuse unchanged bundles', async () => {
  server.serve('sealed.tar.gz', { file: bundles.plain });
  const plan: Plan = {
    ...planFor('encrypted-reuse', [{ name: 'authz', url: `${server.url}/bundles/sealed.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]),
    encryption: { passphrase: 'env:BUNDLE_TEST_PASSPHRASE' },
  };
  const first = await stack.backup(plan);
  const second = await stack.backup(plan);
  assert.equal(second.status, 'complete', JSON.stringify(second.failures));

  const stored = readManifest(plan, first.manifestKey).artifacts[0];
  assert.equal(stored.key, 'bundle/authz.tar.gz.age');
  assert.equal(stored.encryption, 'age');
  assert.equal(stored.plaintext.sha256, sha256(bundles.plain));
  const reused = readManifest(plan, second.manifestKey).artifacts[0];
  assert.equal(reused.storedIn, first.backupId);
  assert.equal(reused.key, stored.key);
  assert.equal(reused.sha256, stored.sha256);
  assert.deepEqual(reused.plaintext, stored.plaintext);
  assert.equal(reused.encryption, 'age');
  assert.deepEqual(storedFiles(plan, second.backupId).filter((name) => name.startsWith('bundle')), []);
});

test('s3 bundle stored unchanged and restores', async () => {
  const client = new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    forcePathStyle: true,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
  });
  try {
    await client.send(new PutObjectCommand({ Bucket: 'published', Key: 'authz/bundle.tar.gz', Body: readFileSync(bundles.plain) }));
  } finally {
    client.destroy();
  }
  const plan = planFor('s3-bundle', [{ name: 'authz', url: 's3://published/authz/bundle.tar.gz', s3: { endpoint: s3.endpoint, region: s3.region } }]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  const artifact = readManifest(plan, result.manifestKey).artifacts[0];
  const facts = artifact.facts as BundleFacts;
  assert.equal(facts.revision, 'plain-rev');
  assert.match(facts.etag ?? '', /^"[0-9a-f-]+"$/);
  const stored = path.join(folder, 'store', plan.name, result.backupId, artifact.key);
  assert.equal(sha256(stored), sha256(bundles.plain));
  assert.equal(await decide(stored, 'bundle-source-restored-s3', 'alice'), true);

  const second = await stack.backup(plan);
  const reused = readManifest(plan, second.manifestKey).artifacts[0];
  assert.equal(reused.storedIn, result.backupId);
  assert.equal((reused.facts as BundleFacts).unchanged, true);
  assert.equal((reused.facts as BundleFacts).unchangedBy, 'etag');
  assert.deepEqual(storedFiles(plan, second.backupId), ['manifest.json']);
});

test('signed bundle keeps its signature', async () => {
  server.serve('signed.tar.gz', { file: bundles.rs256 });
  const plan = planFor('signed-bundle', [
    { name: 'signed', url: `${server.url}/bundles/signed.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN', verificationKey: `file:${keys.rsaPublic}` },
  ]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  const artifact = readManifest(plan, result.manifestKey).artifacts[0];
  assert.deepEqual((artifact.facts as BundleFacts).signature, { signed: true, verified: true, algorithm: 'RS256', keyId: 'default', files: 3 });
  const stored = path.join(folder, 'store', plan.name, result.backupId, artifact.key);
  assert.equal(sha256(stored), sha256(bundles.rs256));
  assert.equal(await decide(stored, 'bundle-source-restored-signed', 'alice', ['--verification-key', keys.rsaPublic]), true);
});

test('signature checks per algorithm', async () => {
  const check = (file: string, verificationKey?: string, scope = '') => inspectBundle(file, { verificationKey, scope });
  const rsaPublic = readFileSync(keys.rsaPublic, 'utf8');

  const rs256 = await check(bundles.rs256, rsaPublic);
  assert.equal(rs256.signature.verified, true, rs256.signature.reason);
  const es256 = await check(bundles.es256, readFileSync(keys.ecPublic, 'utf8'));
  assert.equal(es256.signature.verified, true, es256.signature.reason);
  assert.equal(es256.signature.algorithm, 'ES256');
  const hs256 = await check(bundles.hs256, HMAC_SECRET);
  assert.equal(hs256.signature.verified, true, hs256.signature.reason);

  const wrongKey = await check(bundles.rs256, readFileSync(keys.otherRsaPublic, 'utf8'));
  assert.equal(wrongKey.signature.verified, false);
  assert.match(wrongKey.signature.reason ?? '', /does not verify/);

  const tampered = await check(bundles.tampered, rsaPublic);
  assert.equal(tampered.signature.verified, false);
  assert.match(tampered.signature.reason ?? '', /data\.json: digest mismatch/);

  // An HMAC secret cannot check an RS256 token, and a public key cannot stand in for an HMAC secret.
  const confused = await check(bundles.hs256, rsaPublic);
  assert.equal(confused.signature.verified, false);
  assert.match(confused.signature.reason ?? '', /HS256.*cannot check/);

  const scoped = await check(bundles.rs256, rsaPublic, 'write');
  assert.equal(scoped.signature.verified, false);
  assert.match(scoped.signature.reason ?? '', /scope/);

  const unchecked = await check(bundles.rs256);
  assert.equal(unchecked.signature.signed, true);
  assert.equal(unchecked.signature.verified, 'not checked');
  const unsigned = await check(bundles.plain, rsaPublic);
  assert.equal(unsigned.signature.signed, false);
  assert.equal(unsigned.signature.verified, 'not checked');
});

/** Writes a CA, a server certificate for 127.0.0.1 and a client certificate, and returns their files. */
function writeCertificates(): Record<'ca' | 'serverKey' | 'serverCert' | 'clientKey' | 'clientCert', string> {
  const directory = path.join(folder, 'tls');
  mkdirSync(directory, { recursive: true });
  const file = (name: string): string => path.join(directory, name);
  const openssl = (...args: string[]): void => {
    execFileSync('openssl', args, { stdio: 'ignore' });
  };
  const ecKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl('req', '-x509', ...ecKey, '-keyout', file('ca.key'), '-out', file('ca.pem'), '-days', '1', '-subj', '/CN=bundle test CA');
  writeFileSync(file('server.ext'), 'subjectAltName=IP:127.0.0.1\n');
  writeFileSync(file('client.ext'), 'extendedKeyUsage=clientAuth\n');
  for (const name of ['server', 'client']) {
    openssl('req', ...ecKey, '-keyout', file(`${name}.key`), '-out', file(`${name}.csr`), '-subj', `/CN=${name}`);
    openssl('x509', '-req', '-in', file(`${name}.csr`), '-CA', file('ca.pem'), '-CAkey', file('ca.key'), '-CAcreateserial',
      '-out', file(`${name}.pem`), '-days', '1', '-extfile', file(`${name}.ext`));
  }
  return {
    ca: file('ca.pem'),
    serverKey: file('server.key'),
    serverCert: file('server.pem'),
    clientKey: file('client.key'),
    clientCert: file('client.pem'),
  };
}

test('client certificate authenticates https', async () => {
  const certificates = writeCertificates();
  const tlsServer = await startBundleServer({
    tls: {
      key: readFileSync(certificates.serverKey, 'utf8'),
      cert: readFileSync(certificates.serverCert, 'utf8'),
      ca: readFileSync(certificates.ca, 'utf8'),
    },
  });
  try {
    tlsServer.serve('mtls.tar.gz', { file: bundles.plain });
    const url = `${tlsServer.url}/bundles/mtls.tar.gz`;
    const plan = planFor('mtls', [
      { name: 'with-cert', url, tls: { caFile: certificates.ca, certFile: certificates.clientCert, key: `file:${certificates.clientKey}` } },
      { name: 'without-cert', url, tls: { caFile: certificates.ca } },
    ]);
    const result = await stack.backup(plan);
    assert.equal(result.status, 'partial');
    assert.deepEqual(
      result.artifacts.map((artifact) => artifact.source),
      ['with-cert'],
    );
    assert.equal(result.artifacts[0].sha256, sha256(bundles.plain));
    const [failure] = result.failures;
    assert.equal(failure.source, 'without-cert');
    assert.equal(failure.type, 'Unauthorized', failure.message);
    assert.match(failure.message, /requires a client certificate/);
    assert.equal(tlsServer.requests('mtls.tar.gz').get(200), 1);
  } finally {
    await tlsServer.stop();
  }
});

test('wrong token fails at once, naming the source', async () => {
  server.serve('plain.tar.gz', { file: bundles.plain });
  server.serve('guarded.tar.gz', { file: bundles.plain });
  const plan = planFor('wrong-token', [
    { name: 'good', url: `${server.url}/bundles/plain.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' },
    { name: 'wrong', url: `${server.url}/bundles/guarded.tar.gz`, token: 'env:BUNDLE_TEST_WRONG_TOKEN' },
  ]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'partial');
  assert.equal(result.failures.length, 1);
  const [failure] = result.failures;
  assert.equal(failure.kind, 'bundle');
  assert.equal(failure.source, 'wrong');
  assert.equal(failure.type, 'Unauthorized');
  assert.match(failure.message, /bundle source "wrong".*returned 401; check the token in env BUNDLE_TEST_WRONG_TOKEN/);
  assert.equal(server.requests('guarded.tar.gz').get(401), 1);
});

test('server errors are retried until it answers', async () => {
  server.serve('flaky.tar.gz', { file: bundles.plain });
  server.failNext('flaky.tar.gz', 2, 503);
  const plan = planFor('flaky', [{ name: 'authz', url: `${server.url}/bundles/flaky.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  assert.equal(server.requests('flaky.tar.gz').get(503), 2);
  assert.equal(server.requests('flaky.tar.gz').get(200), 1);
});

test('server that is down is retried', async () => {
  const port = await freePort();
  const plan = planFor('down', [{ name: 'authz', url: `http://127.0.0.1:${port}/bundles/late.tar.gz`, token: 'env:BUNDLE_TEST_TOKEN' }]);
  const handle = await stack.client.workflow.start('backupWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `backup-down-${Date.now()}`,
    args: [{ plan }],
  });
  // Wait until the first attempt failed with connection refused, then start the server.
  const deadline = Date.now() + 30_000;
  for (;;) {
    const description = await handle.describe();
    const pending = (description.raw.pendingActivities ?? []) as Array<{ attempt?: number | null; lastFailure?: { message?: string | null } | null }>;
    const failed = pending.find((activity) => (activity.attempt ?? 1) > 1);
    if (failed) {
      assert.match(failed.lastFailure?.message ?? '', /ECONNREFUSED/);
      break;
    }
    assert.ok(Date.now() < deadline, 'no retry of the bundle download within 30 s');
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const late = await startBundleServer({ token: TOKEN, port });
  try {
    late.serve('late.tar.gz', { file: bundles.plain });
    const result = await handle.result();
    assert.equal(result.status, 'complete', JSON.stringify(result.failures));
    assert.equal(late.requests('late.tar.gz').get(200), 1);
  } finally {
    await late.stop();
  }
});

test('ci script checks exit codes and JSON', async () => {
  server.serve('ci.tar.gz', { file: bundles.plain });
  // The script's drill runs on the worker, which needs opa on PATH: this worker has it, on a task queue of its own.
  const taskQueue = `${stack.taskQueue}-ci`;
  const worker = await startWorker('bundle-source-ci-worker', {
    address: stack.temporal.address,
    taskQueue,
    env: {
      PATH: `${toolsBin}:${process.env.PATH}`,
      OPA_BACKUP_DRILL_DIR: path.join(folder, 'ci-drills'),
      BUNDLE_TEST_TOKEN: TOKEN,
      BUNDLE_TEST_WRONG_TOKEN: 'not-the-token',
    },
  });
  const writePlan = (file: string, tokenVariable: string, bundle = 'ci.tar.gz'): void => {
    writeFileSync(
      file,
      [
        'name: ci-plan',
        'destination:',
        `  local: { path: ${JSON.stringify(path.join(folder, 'store'))} }`,
        'encryption: { unencrypted: true }',
        'sources:',
        '  bundle:',
        `    - { name: authz, url: "${server.url}/bundles/${bundle}", token: "env:${tokenVariable}" }`,
        'settings:',
        '  bundleFetch: { retry: { initialInterval: 200ms, maximumAttempts: 2 } }',
      ].join('\n'),
    );
  };
  // Asynchronous, because the bundle server runs in this process and must keep serving requests.
  const run = (planFile: string, source: string): Promise<{ status: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      const child = spawn('bash', [path.join(repositoryRoot, 'scripts', 'ci-pipeline-example.sh'), planFile, source], {
        timeout: 120_000,
        env: {
          ...process.env,
          TEMPORAL_ADDRESS: stack.temporal.address,
          OPA_BACKUP_TASK_QUEUE: taskQueue,
          BUNDLE_TEST_TOKEN: TOKEN,
          BUNDLE_TEST_WRONG_TOKEN: 'not-the-token',
        },
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
      child.on('close', (status) => resolve({ status, stdout, stderr }));
    });

  try {
    const good = path.join(folder, 'ci-good.yaml');
    writePlan(good, 'BUNDLE_TEST_TOKEN');
    const success = await run(good, 'authz');
    assert.equal(success.status, 0, success.stderr);
    assert.match(success.stdout, /^backup_id=\d{8}T\d{6}Z-[0-9a-f]+$/m);
    assert.match(success.stderr, /ci: backup \S+ of .* restores: the drill passed \(ci-plan\/\S+\/drills\/\S+\.json\)/);

    // A published bundle that OPA cannot load is backed up, but the drill fails the pipeline.
    const brokenSource = path.join(folder, 'broken.tar');
    const pack = tar.pack();
    const packed = pipeline(pack, createGzip(), createWriteStream(`${brokenSource}.gz`));
    pack.entry({ name: '.manifest' }, '{"revision": "broken-rev", "roots": [""]}');
    pack.entry({ name: 'policies/authz.rego' }, 'package app.authz\n\nallow if {\n');
    pack.finalize();
    await packed;
    server.serve('ci-broken.tar.gz', { file: `${brokenSource}.gz` });
    const broken = path.join(folder, 'ci-broken.yaml');
    writePlan(broken, 'BUNDLE_TEST_TOKEN', 'ci-broken.tar.gz');
    const unrestorable = await run(broken, 'authz');
    assert.equal(unrestorable.status, 6, unrestorable.stderr);
    assert.match(unrestorable.stderr, /ci: backup \S+ does not restore; these drill checks failed:\n  bundle-activation bundle\/authz\.tar\.gz: OPA did not load the bundle: .*rego_parse_error/);
    assert.doesNotMatch(unrestorable.stdout, /backup_id=/);

    const missing = await run(good, 'other');
    assert.equal(missing.status, 4, missing.stderr);
    assert.match(missing.stderr, /contains no served bundle of source "other"/);

    const wrong = path.join(folder, 'ci-wrong.yaml');
    writePlan(wrong, 'BUNDLE_TEST_WRONG_TOKEN');
    const failed = await run(wrong, 'authz');
    assert.equal(failed.status, 1, failed.stderr);
    assert.match(failed.stderr, /ci: backup of .* failed: .*bundle source "authz".*401/);

    const invalid = path.join(folder, 'ci-invalid.yaml');
    writeFileSync(invalid, 'name: ci-plan\nsources: {}\n');
    const rejected = await run(invalid, 'authz');
    assert.equal(rejected.status, 2, rejected.stderr);
  } finally {
    await worker.stop('SIGTERM');
  }
});

test('bundle plan fields are checked', () => {
  const issues = (source: Record<string, unknown>): string[] => {
    try {
      validatePlan({ name: 'fields', destination: { local: { path: '/srv' } }, encryption: { unencrypted: true }, sources: { bundle: [source] } }, 'plan.yaml');
      return [];
    } catch (error) {
      assert.ok(error instanceof PlanError);
      return error.issues.map((issue) => `${issue.path}: ${issue.message}`);
    }
  };
  assert.deepEqual(issues({ name: 'ok', url: 's3://bucket/key.tar.gz', s3: { region: 'eu-central-1' } }), []);
  assert.deepEqual(issues({ name: 's3-token', url: 's3://bucket/key', token: 'env:TOKEN' }), [
    'sources.bundle[0].token: applies to http(s):// URLs only; s3:// URLs use the AWS credentials of the worker',
  ]);
  assert.deepEqual(issues({ name: 'http-s3', url: 'https://bundles.internal/b.tar.gz', s3: {} }), ['sources.bundle[0].s3: applies to s3:// URLs only']);
  assert.match(issues({ name: 'userinfo', url: 'https://user:secret@bundles.internal/b.tar.gz' })[0], /must not contain credentials/);
  assert.match(issues({ name: 'ftp', url: 'ftp://bundles.internal/b.tar.gz' })[0], /must be an http:\/\/ or https:\/\/ URL, or s3:\/\/BUCKET\/KEY/);
  assert.match(issues({ name: 'key', url: 'https://b.internal/b.tar.gz', verificationKey: '-----BEGIN PUBLIC KEY-----' })[0], /must be a secret reference/);
});
