// Plan validation: every invalid plan under test/cases/plans is rejected by
// the CLI before any workflow starts, naming the file, the field path and
// the reason. Valid plans load with their relative paths resolved.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { generateIdentity } from '../activities/crypto/age';
import { checkPlanReferences, loadPlanFile, PlanError, validatePlan } from '../activities/plan-loader';
import { runsDirectory } from './harness/process';
import { repositoryRoot } from './harness/tools';

const plansDirectory = path.join(repositoryRoot, 'test', 'cases', 'plans');
const cli = path.join(repositoryRoot, 'bin', 'opa-backup');

const invalidPlans: Array<{ file: string; expected: RegExp[] }> = [
  {
    file: 'bad-schedule.yaml',
    expected: [/schedule\.backup: 61 is not a valid minute/, /schedule\.timezone: "Europe\/Atlantis" is not a known IANA time zone/],
  },
  { file: 'duplicate-sources.yaml', expected: [/sources\.opa\[1\]\.name: duplicate source name "edge"/] },
  {
    file: 'missing-secret.yaml',
    expected: [/sources\.opa\[0\]\.token: environment variable OPA_TOKEN_THAT_IS_NOT_SET .*is not set/],
  },
  { file: 'typo-field.yaml', expected: [/retension: unknown field "retension"; did you mean "retention"\?/] },
];

/** A TCP listener that counts connections, standing in for a Temporal server that must not be called. */
async function connectionCounter(): Promise<{ address: string; connections: () => number; close: () => void }> {
  let connections = 0;
  const server = net.createServer((socket) => {
    connections++;
    socket.destroy();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return { address: `127.0.0.1:${port}`, connections: () => connections, close: () => server.close() };
}

for (const { file, expected } of invalidPlans) {
  test(`plan ${file} is rejected before any workflow starts`, async () => {
    const temporal = await connectionCounter();
    try {
      const planPath = path.join(plansDirectory, file);
      const run = spawnSync(process.execPath, [cli, 'backup', '--plan', planPath, '--wait'], {
        env: { ...process.env, TEMPORAL_ADDRESS: temporal.address },
        encoding: 'utf8',
      });
      assert.equal(run.status, 2, `exit status; stderr: ${run.stderr}`);
      assert.match(run.stderr, /invalid plan/);
      for (const pattern of expected) {
        assert.match(run.stderr, new RegExp(`${planPath.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: ${pattern.source}`));
      }
      assert.equal(temporal.connections(), 0, 'the CLI contacted Temporal');
      assert.equal(existsSync(path.join(plansDirectory, 'never-written')), false);
    } finally {
      temporal.close();
    }
  });
}

test('plan with a plain token is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { opa: [{ name: 'a', url: 'http://x', token: 'hunter2' }] } },
        'inline',
      ),
    (error: unknown) => error instanceof PlanError && /sources\.opa\[0\]\.token: must be a secret reference/.test(error.message),
  );
});

test('plan without sources is rejected', () => {
  assert.throws(
    () => validatePlan({ name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: {} }, 'inline'),
    /sources: must list at least one source/,
  );
});

test('plan with two destination kinds is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        {
          name: 'p',
          destination: { local: { path: '/tmp/x' }, s3: { bucket: 'backups' } }, encryption: { unencrypted: true },
          sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:8181' }] },
        },
        'inline',
      ),
    /destination: must set exactly one of "local" or "s3"/,
  );
});

test('plan with a non-http url is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { opa: [{ name: 'a', url: 'ftp://host' }] } },
        'inline',
      ),
    /sources\.opa\[0\]\.url: must be an http:\/\/ or https:\/\/ URL/,
  );
});

test('plan file with invalid YAML names the line', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const file = path.join(directory, 'broken.yaml');
  writeFileSync(file, 'name: p\nsources:\n  opa: [\n');
  assert.throws(() => loadPlanFile(file), (error: unknown) => error instanceof PlanError && /invalid YAML/.test(error.message) && error.message.startsWith(file));
});

test('plan file resolves relative paths from its folder', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const file = path.join(directory, 'plan.yaml');
  writeFileSync(
    file,
    [
      'name: relative',
      'destination:',
      '  local:',
      '    path: ./backups',
      'encryption: { unencrypted: true }',
      'sources:',
      '  opa:',
      '    - name: edge-1',
      '      url: https://opa.example.internal:8181',
      '      token: file:./token',
      '      tls:',
      '        caFile: ca.pem',
      'schedule:',
      '  backup: "*/15 * * * *"',
      '  timezone: Europe/Berlin',
      'retention:',
      '  keepDaily: 7',
    ].join('\n'),
  );
  const plan = loadPlanFile(file);
  assert.equal(plan.destination.local?.path, path.join(directory, 'backups'));
  assert.equal(plan.sources.opa?.[0].token, `file:${path.join(directory, 'token')}`);
  assert.equal(plan.sources.opa?.[0].tls?.caFile, path.join(directory, 'ca.pem'));
});

test('plan file resolves key and source references from its folder', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const file = path.join(directory, 'plan.yaml');
  writeFileSync(
    file,
    [
      'name: references',
      'destination: { local: { path: /srv/backups } }',
      'encryption:',
      '  passphrase: file:keys/passphrase',
      '  identity: file:./keys/identity.txt',
      'signing: { key: file:keys/signing.pem, publicKeyFile: keys/signing.pub.pem }',
      'sources:',
      '  bundle:',
      '    - { name: authz, url: "https://bundles.internal/authz.tar.gz", token: file:token, verificationKey: file:keys/bundle.pem }',
      '  git:',
      '    - { name: policy-repo, url: "ssh://git@git.internal/policy.git", sshKey: file:keys/id_ed25519, knownHostsFile: known_hosts }',
    ].join('\n'),
  );
  const plan = loadPlanFile(file);
  const inside = (name: string): string => path.join(directory, name);
  assert.equal(plan.encryption.passphrase, `file:${inside('keys/passphrase')}`);
  assert.equal(plan.encryption.identity, `file:${inside('keys/identity.txt')}`);
  assert.equal(plan.signing?.key, `file:${inside('keys/signing.pem')}`);
  assert.equal(plan.signing?.publicKeyFile, inside('keys/signing.pub.pem'));
  assert.equal(plan.sources.bundle?.[0].token, `file:${inside('token')}`);
  assert.equal(plan.sources.bundle?.[0].verificationKey, `file:${inside('keys/bundle.pem')}`);
  assert.equal(plan.sources.git?.[0].sshKey, `file:${inside('keys/id_ed25519')}`);
  assert.equal(plan.sources.git?.[0].knownHostsFile, inside('known_hosts'));
});

test('encryption must name exactly one mode', () => {
  const base = { name: 'p', destination: { local: { path: '/tmp/x' } }, sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] } };
  assert.throws(
    () => validatePlan({ ...base, encryption: { unencrypted: true, passphrase: 'env:P' } }, 'inline'),
    /encryption: must set exactly one of "recipients" \(age1… public keys\), "passphrase" \(a secret reference\) or "unencrypted: true"/,
  );
  assert.throws(() => validatePlan({ ...base, encryption: { recipients: ['age1notakey'] } }, 'inline'), /encryption\.recipients\[0\]: must be an age X25519 recipient/);
  assert.throws(() => validatePlan({ ...base, encryption: { unencrypted: false } }, 'inline'), /encryption\.unencrypted/);
});

test('a recipient with a bad checksum is named with the fix', () => {
  // A valid recipient with its last character changed: the bech32 checksum fails.
  const recipient = 'age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q';
  const plan = validatePlan(
    { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { recipients: [recipient] }, sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] } },
    'inline',
  );
  const issues = checkPlanReferences(plan);
  assert.equal(issues.length, 1);
  assert.equal(issues[0].path, 'encryption.recipients[0]');
  assert.match(issues[0].message, /copy the public key again from age-keygen's output/);
});

test('plan field of the wrong type names the type', () => {
  assert.throws(
    () => validatePlan({ name: 1, destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] } }, 'inline'),
    /inline: name: must be of type string, not number 1/,
  );
});

test('empty plan file says what a plan needs', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const file = path.join(directory, 'empty.yaml');
  writeFileSync(file, '');
  assert.throws(() => loadPlanFile(file), /empty\.yaml: the plan must be a mapping with name, destination and sources/);
});

test('plan with a zero timeout is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        {
          name: 'p',
          destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true },
          sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
          settings: { opaSnapshot: { attemptTimeout: '0s' } },
        },
        'inline',
      ),
    /settings\.opaSnapshot\.attemptTimeout: must be a positive duration/,
  );
});

test('plan url with credentials is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { opa: [{ name: 'a', url: 'http://user:pw@127.0.0.1:1' }] } },
        'inline',
      ),
    /sources\.opa\[0\]\.url: must not contain credentials/,
  );
});

test('plan integer beyond 2^53 is rejected', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const file = path.join(directory, 'big.yaml');
  writeFileSync(
    file,
    [
      'name: big',
      'destination: { local: { path: ./b } }',
      'encryption: { unencrypted: true }',
      'sources:',
      '  opa:',
      '    - name: a',
      '      url: http://127.0.0.1:1',
      '      probes:',
      '        - { path: p/q, input: { n: 9007199254740993 } }',
      '        - { path: p/q, inputJson: \'{"n": 9007199254740993}\' }',
    ].join('\n'),
  );
  assert.throws(() => loadPlanFile(file), /sources\.opa\[0\]\.probes\[0\]\.input\.n: 9007199254740993 is beyond 2\^53/);
});

test('plan with a missing CA file fails the reference check', () => {
  const plan = validatePlan(
    {
      name: 'p',
      destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true },
      sources: { opa: [{ name: 'a', url: 'https://127.0.0.1:1', tls: { caFile: '/nonexistent/ca.pem' } }] },
    },
    'inline',
  );
  assert.deepEqual(checkPlanReferences(plan), [
    { path: 'sources.opa[0].tls.caFile', message: 'file /nonexistent/ca.pem is missing or not readable' },
  ]);
});

test('plan with a password in a PostgreSQL url is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { postgres: [{ name: 'db', url: 'postgres://u:secret@127.0.0.1:5432/postgres' }] } },
        'inline',
      ),
    /sources\.postgres\[0\]\.url: must not contain a password; use password: env:NAME/,
  );
});

test('plan source names are unique across kinds', () => {
  assert.throws(
    () =>
      validatePlan(
        {
          name: 'p',
          destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true },
          sources: { opa: [{ name: 'main', url: 'http://127.0.0.1:1' }], postgres: [{ name: 'main', url: 'postgres://u@127.0.0.1:5432/postgres' }] },
        },
        'inline',
      ),
    /sources\.postgres\[0\]\.name: duplicate source name "main" \(also at sources\.opa\[0\]\.name\)/,
  );
});

test('plan with an unknown Redis mode is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        { name: 'p', destination: { local: { path: '/tmp/x' } }, encryption: { unencrypted: true }, sources: { redis: [{ name: 'cache', url: 'redis://127.0.0.1:6379', mode: 'aof' }] } },
        'inline',
      ),
    /sources\.redis\[0\]\.mode: /,
  );
});

test('an identity that matches no recipient is named', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'plan-'));
  const identity = generateIdentity();
  const other = generateIdentity();
  writeFileSync(path.join(directory, 'identity.txt'), `${identity.encodeSecret()}\n`);
  const plan = validatePlan(
    {
      name: 'p',
      destination: { local: { path: '/tmp/x' } },
      encryption: { recipients: [other.recipient.toString()], identity: `file:${path.join(directory, 'identity.txt')}` },
      sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
    },
    'inline',
  );
  const issues = checkPlanReferences(plan);
  assert.equal(issues.length, 1);
  assert.equal(issues[0].path, 'encryption.identity');
  assert.match(issues[0].message, new RegExp(`its public key ${identity.recipient.toString()} is not among encryption.recipients`));
  // The matching recipient clears the issue.
  const matching = { ...plan, encryption: { ...plan.encryption, recipients: [other.recipient.toString(), identity.recipient.toString()] } };
  assert.deepEqual(checkPlanReferences(matching), []);
});

test('schedule offset shorter than interval', () => {
  const base = {
    name: 'p',
    destination: { local: { path: '/tmp/x' } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
  };
  assert.throws(
    () => validatePlan({ ...base, schedule: { backup: { every: '1h', offset: '1h' } } }, 'inline'),
    /schedule\.backup\.offset: "1h" must be shorter than every "1h"/,
  );
  assert.doesNotThrow(() => validatePlan({ ...base, schedule: { backup: { every: '1h', offset: '59m' } } }, 'inline'));
});

test('retention count below one rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        {
          name: 'p',
          destination: { local: { path: '/tmp/x' } },
          encryption: { unencrypted: true },
          sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
          retention: { keepLast: 0 },
        },
        'inline',
      ),
    /retention\.keepLast: must be a whole number of at least 1; remove the rule/,
  );
});

test('replica at destination folder rejected', () => {
  const base = {
    name: 'p',
    destination: { local: { path: '/srv/backups' } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
  };
  assert.throws(
    () => validatePlan({ ...base, replicas: [{ name: 'copy', local: { path: '/srv/backups/' } }] }, 'inline'),
    /replicas\[0\]: is the same location as the destination, so it adds no copy/,
  );
  const bucket = { bucket: 'opa-backups', endpoint: 'http://127.0.0.1:9000', prefix: 'team' };
  assert.throws(
    () =>
      validatePlan(
        { ...base, replicas: [{ name: 'one', s3: bucket }, { name: 'two', s3: { ...bucket, endpoint: 'http://127.0.0.1:9000/' } }] },
        'inline',
      ),
    /replicas\[1\]: is the same location as replica "one"/,
  );
  assert.doesNotThrow(() => validatePlan({ ...base, replicas: [{ name: 'one', s3: bucket }, { name: 'two', s3: { ...bucket, prefix: 'other' } }] }, 'inline'));
});

test('cron that never runs rejected', () => {
  const base = {
    name: 'p',
    destination: { local: { path: '/tmp/x' } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'a', url: 'http://127.0.0.1:1' }] },
  };
  assert.throws(
    () => validatePlan({ ...base, schedule: { backup: { cron: '0 2 30 2 *' } } }, 'inline'),
    /schedule\.backup\.cron: "0 2 30 2 \*" never runs: no chosen month has day 30/,
  );
  assert.doesNotThrow(() => validatePlan({ ...base, schedule: { backup: { cron: '0 2 29 2 *' } } }, 'inline'));
  // With a day of the week as well, cron runs on either, so the date alone does not decide.
  assert.doesNotThrow(() => validatePlan({ ...base, schedule: { backup: { cron: '0 2 30 2 1' } } }, 'inline'));
});

test('replica folder compared after resolving', () => {
  const directory = mkdtempSync(path.join(runsDirectory, 'same-folder-'));
  const file = path.join(directory, 'plan.yaml');
  writeFileSync(
    file,
    [
      'name: same-folder',
      'destination: { local: { path: ./backups } }',
      `replicas: [{ name: copy, local: { path: ${JSON.stringify(path.join(directory, 'other', '..', 'backups'))} } }]`,
      'encryption: { unencrypted: true }',
      'sources: { opa: [{ name: a, url: "http://127.0.0.1:1" }] }',
    ].join('\n'),
  );
  assert.throws(() => loadPlanFile(file), /replicas\[0\]: is the same location as the destination/);
});
