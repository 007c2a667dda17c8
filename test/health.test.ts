// Health checks and `opa-backup status` against a real Temporal stack, real
// OPAs that loaded bundles (one from a bundle service with the status
// plugin, one from a file) and backups in a local folder.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { HealthCheck, HealthReport } from '../activities/health';
import type { Plan } from '../common/plan';
import { startBundleServer, type BundleServer } from './harness/bundle-server';
import { startOpa, type OpaServer } from './harness/opa';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool } from './harness/tools';

const cli = path.join(repositoryRoot, 'bin', 'opa-backup');

let stack: Stack;
let folder: string;
let bundleServer: BundleServer;
let polled: OpaServer;
let fromFile: OpaServer;

/** Builds a bundle with `opa build` and returns its file. */
function buildBundle(name: string, revision: string, rego: string): string {
  const source = path.join(folder, `${name}-src`);
  mkdirSync(source, { recursive: true });
  writeFileSync(path.join(source, 'policy.rego'), rego);
  const output = path.join(folder, `${name}.tar.gz`);
  execFileSync(tool('opa'), ['build', '--bundle', source, '--revision', revision, '--output', output]);
  return output;
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'health-'));
  stack = await startStack('health');
  bundleServer = await startBundleServer({});
  bundleServer.serve('authz', { file: buildBundle('authz', 'authz-rev-7', 'package authz\n\nallow if input.user == "alice"\n') });
  const config = path.join(folder, 'opa-config.yaml');
  writeFileSync(
    config,
    [
      'services:',
      `  bundles: { url: ${JSON.stringify(bundleServer.url)} }`,
      'bundles:',
      '  authz:',
      '    service: bundles',
      '    resource: bundles/authz',
      '    polling: { min_delay_seconds: 1, max_delay_seconds: 2 }',
      // The status plugin needs an output; Prometheus is the one without a service.
      'status: { prometheus: true }',
      '',
    ].join('\n'),
  );
  polled = await startOpa('health-opa-polled', { args: ['--config-file', config] });
  fromFile = await startOpa('health-opa-file', { args: ['--bundle', buildBundle('billing', 'billing-rev-3', 'package billing\n\nlimit := 10\n')] });
  // The bundle plugin activates after OPA reports healthy; wait for it.
  const deadline = Date.now() + 30_000;
  for (;;) {
    const response = await fetch(`${polled.url}/v1/data/system/bundles`);
    const body = (await response.json()) as { result?: Record<string, unknown> };
    if (body.result?.authz) break;
    if (Date.now() > deadline) throw new Error(`OPA did not activate bundle authz within 30 s:\n${polled.process.log()}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
});

after(async () => {
  await polled?.stop();
  await fromFile?.stop();
  await bundleServer?.stop();
  await stack?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function planOf(name: string, health: Plan['health']): Plan {
  return {
    name,
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: {
      opa: [
        { name: 'polled', url: polled.url },
        { name: 'file', url: fromFile.url },
      ],
    },
    health,
  };
}

/** Writes the plan as a YAML file (JSON is YAML) for the CLI. */
function writePlanFile(plan: Plan): string {
  const file = path.join(folder, `${plan.name}-${randomBytes(3).toString('hex')}.yaml`);
  writeFileSync(file, JSON.stringify(plan, null, 2));
  return file;
}

/** Stores a drill report as restoreDrillWorkflow writes it: <plan>/<backupId>/drills/<start>-<suffix>.json. */
function writeDrillReport(plan: string, backupId: string, outcome: 'passed' | 'failed', started: Date): void {
  const stamp = started.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z');
  const drills = path.join(folder, plan, backupId, 'drills');
  mkdirSync(drills, { recursive: true });
  const report = {
    format: 'opa-backup.drill-report',
    version: 1,
    plan,
    backupId,
    workflow: { workflowId: `drill-${outcome}`, runId: randomBytes(16).toString('hex') },
    startedAt: started.toISOString(),
    completedAt: new Date(started.getTime() + 1000).toISOString(),
    outcome,
    rtoSeconds: 1,
    checks: [],
  };
  writeFileSync(path.join(drills, `${stamp}-${randomBytes(4).toString('hex')}.json`), JSON.stringify(report));
}

function check(report: HealthReport, name: string): HealthCheck {
  const found = report.checks.find((candidate) => candidate.name === name);
  assert.ok(found, `no check "${name}" in ${report.checks.map((candidate) => candidate.name).join(', ')}`);
  return found;
}

async function runHealthWorkflow(plan: Plan): Promise<HealthReport> {
  return stack.client.workflow.execute('healthWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `health-${randomBytes(4).toString('hex')}`,
    args: [{ plan }],
  });
}

test('health of a fresh backup is ok', async () => {
  const plan = planOf('health-fresh', { maxBackupAge: '1h', maxDrillAge: '8d', maxBundleAge: '1h' });
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete');
  const now = Date.now();
  writeDrillReport(plan.name, backup.backupId, 'passed', new Date(now - 60_000));
  writeDrillReport(plan.name, backup.backupId, 'failed', new Date(now - 5_000));

  const report = await runHealthWorkflow(plan);
  assert.equal(report.ranBy, 'temporal');
  assert.deepEqual(report.stale, []);

  const newest = check(report, 'backup');
  assert.equal(newest.state, 'ok');
  assert.equal(newest.backupId, backup.backupId);
  assert.ok(newest.ageSeconds !== undefined, 'no backup age');
  assert.ok(newest.ageSeconds >= 0, `backup age ${newest.ageSeconds}`);
  assert.ok(newest.ageSeconds < 600, `backup age ${newest.ageSeconds}`);
  assert.equal(check(report, 'source opa/polled').state, 'ok');
  assert.equal(check(report, 'source opa/file').state, 'ok');

  const drill = check(report, 'drill');
  assert.equal(drill.state, 'ok');
  assert.equal(drill.backupId, backup.backupId);
  assert.match(drill.reason, /1 newer drill report\(s\) did not pass/);

  // The status plugin reports the revision and when OPA last fetched it.
  const served = check(report, 'bundle polled/authz');
  assert.equal(served.state, 'ok');
  assert.equal(served.revision, 'authz-rev-7');
  assert.ok(served.activatedAt, 'no activation time');
  assert.ok(served.ageSeconds !== undefined, 'no bundle age');
  assert.ok(served.ageSeconds < 60, `bundle age ${served.ageSeconds}`);

  // A bundle loaded from a file has a revision but no fetch time.
  const loaded = report.checks.find((candidate) => candidate.name.startsWith('bundle file/'));
  assert.ok(loaded, 'no bundle check of OPA "file"');
  assert.equal(loaded.revision, 'billing-rev-3');
  assert.equal(loaded.state, 'unknown');
  assert.match(loaded.reason, /status plugin is off/);
});

test('status exits 6 naming stale checks', async () => {
  const plan = planOf('health-stale', { maxBackupAge: '1s', maxDrillAge: '1s', maxBundleAge: '1h' });
  const backup = await stack.backup(plan);
  writeDrillReport(plan.name, backup.backupId, 'passed', new Date());
  await new Promise((resolve) => setTimeout(resolve, 2_500));
  const planFile = writePlanFile(plan);
  const environment = { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue };

  const table = spawnSync(process.execPath, [cli, 'status', '--plan', planFile], { env: environment, encoding: 'utf8', timeout: 120_000 });
  assert.equal(table.status, 6, table.stderr);
  assert.match(table.stdout, /by healthWorkflow/);
  assert.match(table.stdout, /^backup\s+STALE\s/m);
  assert.match(table.stdout, /^drill\s+STALE\s/m);
  assert.match(table.stdout, /^bundle polled\/authz\s+ok\s.*authz-rev-7/m);
  assert.match(table.stdout, /^stale: backup, source opa\/polled, source opa\/file, drill$/m);

  const json = spawnSync(process.execPath, [cli, 'status', '--plan', planFile, '--json', '--local'], { env: environment, encoding: 'utf8', timeout: 120_000 });
  assert.equal(json.status, 6, json.stderr);
  const report = JSON.parse(json.stdout) as HealthReport;
  assert.equal(report.ranBy, 'local');
  assert.deepEqual(report.stale, ['backup', 'source opa/polled', 'source opa/file', 'drill']);
  assert.match(check(report, 'backup').reason, /more than the limit of 1s/);
});

test('status without Temporal checks locally', async () => {
  const plan = planOf('health-local', { maxBundleAge: '1h' });
  const planFile = writePlanFile(plan);
  const deadPort = await freePort();
  const run = spawnSync(process.execPath, [cli, 'status', '--plan', planFile, '--json'], {
    env: { ...process.env, TEMPORAL_ADDRESS: `127.0.0.1:${deadPort}` },
    encoding: 'utf8',
    timeout: 120_000,
  });
  // Without limits on backups and drills, a plan with no backup is unknown, not stale.
  assert.equal(run.status, 0, run.stderr);
  assert.match(run.stderr, /cannot connect to Temporal .* running the checks here/);
  const report = JSON.parse(run.stdout) as HealthReport;
  assert.equal(report.ranBy, 'local');
  assert.equal(check(report, 'backup').state, 'unknown');
  assert.equal(check(report, 'drill').state, 'unknown');
  assert.equal(check(report, 'bundle polled/authz').revision, 'authz-rev-7');
});

test('unreachable OPA is unknown, not stale', async () => {
  const deadPort = await freePort();
  const plan: Plan = {
    name: 'health-down',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'gone', url: `http://127.0.0.1:${deadPort}` }] },
    health: { maxBundleAge: '1h' },
  };
  const report = await runHealthWorkflow(plan);
  const opa = check(report, 'opa gone');
  assert.equal(opa.state, 'unknown');
  assert.match(opa.reason, /ECONNREFUSED/);
  assert.deepEqual(report.stale, []);
});

test('health checks each replica', async () => {
  const mirror = path.join(folder, 'mirror');
  const plan: Plan = {
    ...planOf('health-replicas', { maxBackupAge: '1h' }),
    replicas: [{ name: 'mirror', local: { path: mirror } }],
  };
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete');

  // A replica added after the backup contains none of it: stale, and named.
  const widened: Plan = { ...plan, replicas: [...plan.replicas!, { name: 'late', local: { path: path.join(folder, 'late-mirror') } }] };
  const report = await runHealthWorkflow(widened);
  const copy = check(report, 'backup mirror');
  assert.equal(copy.state, 'ok');
  assert.equal(copy.backupId, backup.backupId);
  const late = check(report, 'backup late');
  assert.equal(late.state, 'stale');
  assert.match(late.reason, /no complete backup of plan health-replicas in local folder .*late-mirror/);
  assert.equal(check(report, 'backup').state, 'ok');
  assert.deepEqual(report.stale, ['backup late']);

  const local = spawnSync(process.execPath, [cli, 'status', '--plan', writePlanFile(widened), '--local'], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(local.status, 6, local.stderr);
  assert.match(local.stdout, /^backup mirror\s+ok\s/m);
  assert.match(local.stdout, /^backup late\s+STALE\s/m);
});

test('replica-missed backup complete in primary', async () => {
  // The replica's path is a file, so every put to it fails.
  const blocked = path.join(folder, 'blocked-replica');
  writeFileSync(blocked, 'not a folder');
  const plan: Plan = {
    ...planOf('health-missed', { maxBackupAge: '1h' }),
    replicas: [{ name: 'blocked', local: { path: blocked } }],
  };
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'partial');

  const report = await runHealthWorkflow(plan);
  const primary = check(report, 'backup');
  assert.equal(primary.state, 'ok', primary.reason);
  assert.equal(primary.backupId, backup.backupId);
  assert.equal(check(report, 'backup blocked').state, 'stale');
  assert.deepEqual(report.stale, ['backup blocked'], 'only the replica that missed the backup is stale');
});

test('status exits 7 on unreadable destination', async () => {
  const deadPort = await freePort();
  const plan: Plan = {
    ...planOf('health-unreachable', {}),
    replicas: [{ name: 'gone', s3: { bucket: 'opa-backups', endpoint: `http://127.0.0.1:${deadPort}`, region: 'us-east-1' } }],
  };
  await stack.backup(plan);
  const run = spawnSync(process.execPath, [cli, 'status', '--plan', writePlanFile(plan)], {
    env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue, AWS_ACCESS_KEY_ID: 'unused', AWS_SECRET_ACCESS_KEY: 'unused' },
    encoding: 'utf8',
    timeout: 180_000,
  });
  assert.equal(run.status, 7, run.stdout + run.stderr);
  assert.match(run.stdout, /^backup gone\s+UNKNOWN\s.*cannot read the backups of plan health-unreachable/m);
  assert.match(run.stdout, /^failed: backup gone$/m);
});
