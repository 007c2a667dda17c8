// Plan validation: every invalid plan under test/cases/plans is rejected by
// the CLI before any workflow starts, naming the file, the field path and
// the reason; valid plans load with their relative paths resolved.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { loadPlanFile, PlanError, validatePlan } from '../activities/plan-loader';
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
        { name: 'p', destination: { local: { path: '/tmp/x' } }, sources: { opa: [{ name: 'a', url: 'http://x', token: 'hunter2' }] } },
        'inline',
      ),
    (error: unknown) => error instanceof PlanError && /sources\.opa\[0\]\.token: must be a secret reference/.test(error.message),
  );
});

test('plan without sources is rejected', () => {
  assert.throws(
    () => validatePlan({ name: 'p', destination: { local: { path: '/tmp/x' } }, sources: {} }, 'inline'),
    /sources: must list at least one source/,
  );
});

test('plan with two destination kinds is rejected', () => {
  assert.throws(
    () =>
      validatePlan(
        {
          name: 'p',
          destination: { local: { path: '/tmp/x' }, s3: { bucket: 'backups' } },
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
        { name: 'p', destination: { local: { path: '/tmp/x' } }, sources: { opa: [{ name: 'a', url: 'ftp://host' }] } },
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
