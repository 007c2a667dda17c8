// Encrypted, signed backups through Temporal. Every stored object is an age
// file and the manifest is signed. `opa-backup verify` reports each kind of
// damage with its own message and exit code, and the README's recovery
// steps restore a backup with standard tools only.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, generateKeyPairSync } from 'node:crypto';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { generateIdentity } from '../activities/crypto/age';
import type { Manifest, OpaFacts, PostgresFacts, RedisFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startOpa, type OpaServer } from './harness/opa';
import { startPostgres, type PostgresServer } from './harness/postgres';
import { runsDirectory } from './harness/process';
import { startRedis, startRedisFromRdb, type RedisServer } from './harness/redis';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool, toolsBin } from './harness/tools';

const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
const cli = path.join(repositoryRoot, 'bin', 'opa-backup');

let stack: Stack;
let opa: OpaServer;
let postgres: PostgresServer;
let redis: RedisServer;
let folder: string;
let keys: { identity: string; otherIdentity: string; recipient: string; signingKey: string; verifyKey: string };
let plan: Plan;
let backupId: string;
let manifest: Manifest;

function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

function yamlPlan(value: Plan): string {
  // JSON is YAML, and a plan file keeps the test's plan exact.
  return JSON.stringify(value, null, 2);
}

function verify(planFile: string, ...extra: string[]): { status: number | null; stdout: string; stderr: string } {
  const run = spawnSync(process.execPath, [cli, 'verify', ...extra, '--plan', planFile], {
    encoding: 'utf8',
    env: { ...process.env, PATH: `${toolsBin}:${process.env.PATH}` },
    timeout: 120_000,
  });
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'encryption-'));
  const identity = generateIdentity();
  const other = generateIdentity();
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  keys = {
    identity: path.join(folder, 'identity.txt'),
    otherIdentity: path.join(folder, 'other-identity.txt'),
    recipient: identity.recipient.toString(),
    signingKey: path.join(folder, 'signing.pem'),
    verifyKey: path.join(folder, 'signing.pub.pem'),
  };
  writeFileSync(keys.identity, `${identity.encodeSecret()}\n`, { mode: 0o600 });
  writeFileSync(keys.otherIdentity, `${other.encodeSecret()}\n`, { mode: 0o600 });
  writeFileSync(keys.signingKey, privateKey.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
  writeFileSync(keys.verifyKey, publicKey.export({ format: 'pem', type: 'spki' }));

  postgres = await startPostgres('encryption-pg');
  await postgres.psql('postgres', 'CREATE DATABASE entitlements');
  await postgres.psql('entitlements', readFileSync(path.join(repositoryRoot, 'test', 'cases', 'postgres', 'entitlements.sql'), 'utf8'));
  redis = await startRedis('encryption-redis', { args: ['--repl-diskless-sync-delay', '0'] });
  execFileSync(tool('redis-cli'), ['-h', '127.0.0.1', '-p', String(redis.port)], {
    input: readFileSync(path.join(repositoryRoot, 'test', 'cases', 'redis', 'load.redis'), 'utf8'),
  });
  opa = await startOpa('encryption-opa');
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
  stack = await startStack('encryption', { ENCRYPTION_TEST_PG_PASSWORD: postgres.password });

  plan = {
    name: 'sealed',
    destination: { local: { path: path.join(folder, 'store') } },
    encryption: { recipients: [keys.recipient] },
    signing: { key: `file:${keys.signingKey}`, publicKeyFile: keys.verifyKey },
    sources: {
      opa: [{ name: 'edge', url: opa.url, probes: JSON.parse(readFileSync(path.join(rbac, 'probes.json'), 'utf8')) }],
      postgres: [{ name: 'upstream', url: postgres.url, password: 'env:ENCRYPTION_TEST_PG_PASSWORD', databases: ['entitlements'] }],
      redis: [{ name: 'cache', url: redis.url, mode: 'rdb' }],
    },
  };
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  backupId = result.backupId;
  manifest = JSON.parse(readFileSync(path.join(plan.destination.local!.path, result.manifestKey), 'utf8')) as Manifest;
  writeFileSync(path.join(folder, 'plan.json'), yamlPlan(plan));
});

after(async () => {
  await stack?.stop();
  await opa?.stop();
  await redis?.stop();
  await postgres?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function backupDirectory(root = plan.destination.local!.path): string {
  return path.join(root, plan.name, backupId);
}

test('encrypted backup stores only age files', () => {
  assert.deepEqual(manifest.encryption, { mode: 'x25519', recipients: [keys.recipient] });
  assert.deepEqual(
    manifest.artifacts.map((artifact) => [artifact.key, artifact.compression ?? '', artifact.encryption]),
    [
      ['opa/edge.tar.gz.age', '', 'age'],
      ['postgres/upstream/entitlements.dump.age', '', 'age'],
      ['postgres/upstream/globals.sql.gz.age', 'gzip', 'age'],
      ['redis/cache.rdb.gz.age', 'gzip', 'age'],
    ],
  );
  const text = readFileSync(path.join(backupDirectory(), 'manifest.json'), 'utf8');
  // Probe inputs and table names are facts, and facts are encrypted.
  assert.doesNotMatch(text, /alice|mallory|user_roles/);
  assert.equal(manifest.facts?.key, 'facts.json.gz.age');
  const stored = readdirSync(backupDirectory(), { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => path.relative(backupDirectory(), path.join(entry.parentPath, entry.name)))
    .sort();
  for (const file of stored.filter((name) => !name.startsWith('manifest.json'))) {
    const head = readFileSync(path.join(backupDirectory(), file)).subarray(0, 21).toString('latin1');
    assert.equal(head, 'age-encryption.org/v1', `${file} is not an age file`);
  }
  assert.deepEqual(stored, [
    'facts.json.gz.age',
    'manifest.json',
    'manifest.json.sig',
    'opa/edge.tar.gz.age',
    'postgres/upstream/entitlements.dump.age',
    'postgres/upstream/globals.sql.gz.age',
    'redis/cache.rdb.gz.age',
  ]);
});

test('the age CLI decrypts every artifact to the plaintext digest in the manifest', () => {
  for (const artifact of manifest.artifacts) {
    const file = path.join(backupDirectory(), artifact.key);
    assert.equal(sha256(file), artifact.sha256, artifact.key);
    let plaintext = execFileSync('age', ['--decrypt', '--identity', keys.identity, file], { maxBuffer: 1 << 30 });
    if (artifact.compression === 'gzip') plaintext = execFileSync('gunzip', [], { input: plaintext, maxBuffer: 1 << 30 });
    assert.equal(plaintext.length, artifact.plaintext.size, artifact.key);
    assert.equal(createHash('sha256').update(plaintext).digest('hex'), artifact.plaintext.sha256, artifact.key);
  }
});

test('verify with the identity checks digests, contents and formats', () => {
  const run = verify(path.join(folder, 'plan.json'), backupId, '--identity', `file:${keys.identity}`, '--json');
  assert.equal(run.status, 0, run.stdout + run.stderr);
  const report = JSON.parse(run.stdout) as { outcome: string; plaintextChecked: boolean; checks: Array<{ object: string; message: string }> };
  assert.equal(report.outcome, 'ok');
  assert.equal(report.plaintextChecked, true);
  const messages = report.checks.map((check) => check.message).join('\n');
  assert.match(messages, /signed by Ed25519 key [0-9a-f]{16}/);
  assert.match(messages, /bundle opens with \d+ files; revision, data\.json and policies match/);
  assert.match(messages, /pg_restore --list reads \d+ entries/);
  assert.match(messages, /RDB version \d+, checksum [0-9a-f]{16} matches/);
  assert.match(messages, /globals script is complete/);
});

test('verify without an identity checks stored digests only and says so', () => {
  const run = verify(path.join(folder, 'plan.json'), 'latest');
  assert.equal(run.status, 0, run.stdout + run.stderr);
  assert.match(run.stdout, /stored digests only: give --identity/);
});

/** Copies the backup into a fresh destination, damages it, and returns a plan file for that destination. */
function damagedCopy(name: string, damage: (directory: string) => void, changes: Partial<Plan> = {}): string {
  const root = path.join(folder, 'damage', name);
  mkdirSync(path.join(root, plan.name), { recursive: true });
  cpSync(backupDirectory(), backupDirectory(root), { recursive: true });
  damage(backupDirectory(root));
  const planFile = path.join(folder, `plan-${name}.json`);
  writeFileSync(planFile, yamlPlan({ ...plan, destination: { local: { path: root } }, ...changes }));
  return planFile;
}

function editManifest(directory: string, edit: (manifest: Manifest) => void): void {
  const file = path.join(directory, 'manifest.json');
  const value = JSON.parse(readFileSync(file, 'utf8')) as Manifest;
  edit(value);
  writeFileSync(file, JSON.stringify(value, null, 2) + '\n');
}

const unsigned: Partial<Plan> = { signing: undefined };

const damageCases: Array<{ name: string; damage: (directory: string) => void; changes?: Partial<Plan>; identity?: 'own' | 'other' | 'none'; status: number; message: RegExp }> = [
  {
    name: 'wrong identity',
    damage: () => undefined,
    identity: 'other',
    status: 5,
    message: /facts\.json\.gz\.age: cannot decrypt \(wrong identity\)/,
  },
  {
    name: 'truncated object',
    damage: (directory) => {
      const file = path.join(directory, 'redis/cache.rdb.gz.age');
      truncateSync(file, statSync(file).size - 100);
    },
    status: 4,
    message: /redis\/cache\.rdb\.gz\.age: truncated: \d+ bytes stored, the manifest recorded \d+/,
  },
  {
    name: 'flipped byte',
    damage: (directory) => {
      const file = path.join(directory, 'postgres/upstream/entitlements.dump.age');
      const bytes = readFileSync(file);
      bytes[Math.floor(bytes.length / 2)] ^= 0x01;
      writeFileSync(file, bytes);
    },
    status: 4,
    message: /postgres\/upstream\/entitlements\.dump\.age: (damaged encryption|digest mismatch)/,
  },
  {
    name: 'missing artifact',
    damage: (directory) => unlinkSync(path.join(directory, 'opa/edge.tar.gz.age')),
    status: 4,
    message: /opa\/edge\.tar\.gz\.age: missing: the manifest lists it/,
  },
  {
    name: 'damaged facts without an identity',
    damage: (directory) => {
      const file = path.join(directory, 'facts.json.gz.age');
      const bytes = readFileSync(file);
      bytes[bytes.length - 5] ^= 0x01;
      writeFileSync(file, bytes);
    },
    identity: 'none',
    status: 4,
    message: /facts\.json\.gz\.age: digest mismatch: stored SHA-256 is [0-9a-f]{64}, the manifest recorded/,
  },
  {
    name: 'changed manifest',
    damage: (directory) => editManifest(directory, (value) => (value.artifacts[0].size += 1)),
    status: 4,
    message: /manifest\.json: signature mismatch: the Ed25519 signature in manifest\.json\.sig does not match/,
  },
  {
    name: 'removed signature',
    damage: (directory) => unlinkSync(path.join(directory, 'manifest.json.sig')),
    status: 4,
    message: /manifest\.json\.sig: signature missing/,
  },
  {
    name: 'unknown format version',
    damage: (directory) => editManifest(directory, (value) => ((value as { version: number }).version = 9)),
    changes: unsigned,
    status: 5,
    message: /manifest\.json: unknown format version: manifest format version 9; this opa-backup reads version 1/,
  },
  {
    name: 'key outside the backup',
    damage: (directory) => editManifest(directory, (value) => (value.artifacts[3].key = '../../other-plan/x/redis/cache.rdb.gz.age')),
    changes: unsigned,
    status: 4,
    message: /key "\.\.\/\.\.\/other-plan\/x\/redis\/cache\.rdb\.gz\.age" leaves the backup's folder/,
  },
  {
    name: 'damaged plaintext under a valid encryption',
    // Replaces the RDB with another age file of the same recipient: the
    // stored digest in the manifest is updated too (the manifest is not
    // signed in this case), so only the plaintext digest catches it.
    damage: (directory) => {
      const file = path.join(directory, 'redis/cache.rdb.gz.age');
      const replacement = execFileSync('age', ['--encrypt', '--recipient', keys.recipient], { input: execFileSync('gzip', [], { input: Buffer.from('REDIS0011 forged') }) });
      writeFileSync(file, replacement);
      editManifest(directory, (value) => {
        const record = value.artifacts.find((artifact) => artifact.key === 'redis/cache.rdb.gz.age')!;
        record.size = replacement.length;
        record.sha256 = createHash('sha256').update(replacement).digest('hex');
      });
    },
    changes: unsigned,
    status: 4,
    message: /redis\/cache\.rdb\.gz\.age: plaintext digest mismatch: the decoded content has 16 bytes/,
  },
];

for (const damageCase of damageCases) {
  test(`verify reports ${damageCase.name}`, () => {
    const planFile = damagedCopy(damageCase.name.replace(/ /g, '-'), damageCase.damage, damageCase.changes);
    const identity = damageCase.identity === 'other' ? keys.otherIdentity : keys.identity;
    const run = damageCase.identity === 'none' ? verify(planFile, backupId) : verify(planFile, backupId, '--identity', `file:${identity}`);
    assert.equal(run.status, damageCase.status, run.stdout + run.stderr);
    assert.match(run.stdout, damageCase.message);
  });
}

test('a passphrase backup does not open with a wrong passphrase', async () => {
  const passphrasePlan: Plan = {
    name: 'passphrase',
    destination: { local: { path: path.join(folder, 'passphrase-store') } },
    encryption: { passphrase: `file:${path.join(folder, 'passphrase.txt')}` },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  writeFileSync(path.join(folder, 'passphrase.txt'), 'correct horse battery staple\n');
  const result = await stack.backup(passphrasePlan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  const planFile = path.join(folder, 'plan-passphrase.json');
  writeFileSync(planFile, yamlPlan(passphrasePlan));
  assert.equal(verify(planFile, result.backupId).status, 0);
  writeFileSync(path.join(folder, 'passphrase.txt'), 'wrong horse\n');
  const run = verify(planFile, result.backupId);
  assert.equal(run.status, 5, run.stdout + run.stderr);
  assert.match(run.stdout, /facts\.json\.gz\.age: cannot decrypt \(wrong passphrase\)/);
});

test('a plan without an encryption choice is rejected before anything starts', () => {
  const planFile = path.join(folder, 'plan-no-encryption.yaml');
  writeFileSync(planFile, ['name: plain', `destination: { local: { path: ${JSON.stringify(folder)} } }`, 'sources:', '  opa:', '    - { name: edge, url: "http://127.0.0.1:9" }'].join('\n'));
  const run = spawnSync(process.execPath, [cli, 'backup', '--plan', planFile], { encoding: 'utf8' });
  assert.equal(run.status, 2, run.stderr);
  assert.match(run.stderr, /encryption: is required: set "recipients" \(age1… public keys\) or "passphrase" \(a secret reference\), or "unencrypted: true"/);
});

test("the README's recovery steps restore the backup with standard tools", async () => {
  const readme = readFileSync(path.join(repositoryRoot, 'README.md'), 'utf8');
  const block = /<!-- recovery:begin -->\n```bash\n([\s\S]*?)```\n<!-- recovery:end -->/.exec(readme);
  assert.ok(block, 'README.md has no recovery block');
  const copy = path.join(folder, 'recovery');
  cpSync(backupDirectory(), copy, { recursive: true });
  const run = spawnSync('bash', ['-c', block[1]], {
    cwd: copy,
    encoding: 'utf8',
    env: { ...process.env, IDENTITY: keys.identity, SIGNING_PUB: keys.verifyKey },
  });
  assert.equal(run.status, 0, run.stdout + run.stderr);
  assert.match(run.stdout, /restored redis\/cache\.rdb\n/);
  const facts = JSON.parse(readFileSync(path.join(copy, 'facts.json'), 'utf8')) as Record<string, unknown>;

  // OPA: the bundle loads and decides as the live OPA did.
  const opaFacts = facts['opa/edge.tar.gz.age'] as OpaFacts;
  const restoredOpa = await startOpa('encryption-recovered-opa', { args: ['--bundle', path.join(copy, 'opa/edge.tar.gz')] });
  try {
    for (const probe of opaFacts.probes) {
      const response = await fetch(`${restoredOpa.url}/v1/data/${probe.path}`, { method: 'POST', body: JSON.stringify({ input: probe.input }) });
      const body = (await response.json()) as { result?: unknown };
      assert.equal(JSON.stringify(body.result), probe.resultJson, probe.path);
    }
  } finally {
    await restoredOpa.stop();
  }

  // PostgreSQL: pg_restore into a new database gives the recorded row counts.
  const pgFacts = facts['postgres/upstream/entitlements.dump.age'] as PostgresFacts;
  await postgres.psql('postgres', 'CREATE DATABASE recovered');
  execFileSync(tool('pg_restore'), ['--dbname', 'recovered', '--no-owner', path.join(copy, 'postgres/upstream/entitlements.dump')], { env: { ...process.env, ...postgres.clientEnvironment } });
  for (const table of pgFacts.tables ?? []) {
    const rows = await postgres.psql('recovered', `SELECT count(*) FROM ONLY "${table.schema.replace(/"/g, '""')}"."${table.name.replace(/"/g, '""')}"`);
    assert.equal(Number(rows.trim()), table.rows, `${table.schema}.${table.name}`);
  }

  // Redis: redis-server loads the RDB with the recorded key counts.
  const redisFacts = facts['redis/cache.rdb.gz.age'] as RedisFacts;
  const restoredRedis = await startRedisFromRdb('encryption-recovered-redis', path.join(copy, 'redis/cache.rdb'));
  try {
    const info = await restoredRedis.client().info('keyspace');
    const counts: Record<string, number> = {};
    for (const match of info.matchAll(/^db(\d+):keys=(\d+)/gm)) counts[match[1]] = Number(match[2]);
    assert.deepEqual(counts, redisFacts.keyspace);
  } finally {
    await restoredRedis.stop();
  }
});

test('verifyBackupWorkflow checks a backup on the worker with the plan identity', async () => {
  const report = (await stack.client.workflow.execute('verifyBackupWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `verify-${backupId}`,
    args: [{ plan: { ...plan, encryption: { ...plan.encryption, identity: `file:${keys.identity}` } }, backupId }],
  })) as { outcome: string; plaintextChecked: boolean; checks: Array<{ object: string }> };
  assert.equal(report.outcome, 'ok');
  assert.equal(report.plaintextChecked, true);
  assert.ok(report.checks.some((check) => check.object.endsWith('redis/cache.rdb.gz.age')));

  const damaged = (await stack.client.workflow.execute('verifyBackupWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `verify-damaged-${backupId}`,
    args: [{ plan: { ...plan, destination: { local: { path: path.join(folder, 'damage', 'missing-artifact') } } }, backupId }],
  })) as { outcome: string; checks: Array<{ reason?: string }> };
  assert.equal(damaged.outcome, 'damaged');
  assert.ok(damaged.checks.some((check) => check.reason === 'missing'));
});

test('verify names a missing or wrong identity file', () => {
  const planFile = path.join(folder, 'plan.json');
  const missing = verify(planFile, backupId, '--identity', `file:${path.join(folder, 'no-such-identity.txt')}`);
  assert.equal(missing.status, 5, missing.stdout + missing.stderr);
  assert.match(missing.stdout, /--identity: cannot read .*no-such-identity\.txt .* here: file not found/);
  const recipientFile = path.join(folder, 'recipient.txt');
  writeFileSync(recipientFile, `${keys.recipient}\n`);
  const wrongKind = verify(planFile, backupId, '--identity', `file:${recipientFile}`);
  assert.equal(wrongKind.status, 5, wrongKind.stdout + wrongKind.stderr);
  assert.match(wrongKind.stdout, /--identity file:.*recipient\.txt: invalid identity on line 1.*give the age identity file \(AGE-SECRET-KEY-1…\), not the recipient/);
});
