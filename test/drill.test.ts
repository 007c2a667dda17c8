// Restore drills of OPA backups through Temporal: a drill passes on a backup
// of every case in test/cases/opa, and fails, naming the check and the
// object, on each kind of damage that digests alone cannot show.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { reapDrillLeftovers } from '../activities/drill/scratch';
import type { DrillReport, DrillWorkflowResult } from '../activities/drill/types';
import type { OpaFacts } from '../common/manifest';
import type { Plan, Probe } from '../common/plan';
import {
  drillLeftovers,
  readManifestFile,
  rewriteBundle,
  runDrill,
  writeManifestFile,
} from './harness/drill';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { startWorker } from './harness/worker';
import { repositoryRoot, toolsBin } from './harness/tools';

const casesDirectory = path.join(repositoryRoot, 'test', 'cases', 'opa');
const caseNames = readdirSync(casesDirectory, { withFileTypes: true })
  .filter((entry) => entry.isDirectory())
  .map((entry) => entry.name)
  .sort();
const BUNDLE_LIMIT = 32 * 1024 * 1024;

let stack: Stack;
let folder: string;
let drillRoot: string;
let counter: http.Server;
let counterUrl: string;

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'drill-'));
  drillRoot = path.join(folder, 'scratch');
  stack = await startStack('drill', {
    PATH: `${toolsBin}:${process.env.PATH}`,
    OPA_BACKUP_DRILL_DIR: drillRoot,
    OPA_BACKUP_DRILL_MAX_BUNDLE_BYTES: String(BUNDLE_LIMIT),
  });
  // The http-send-rule case calls this server from a rule; a drill must not depend on it.
  counter = http.createServer((_request, response) => response.end('{"profile":"fetched"}'));
  await new Promise<void>((resolve) => counter.listen(0, '127.0.0.1', resolve));
  counterUrl = `http://127.0.0.1:${(counter.address() as { port: number }).port}/profile`;
});

after(async () => {
  counter?.close();
  await stack?.stop();
  // A failed test may leave a drill whose worker is gone: its servers lead their own process groups.
  if (drillRoot) {
    process.env.OPA_BACKUP_DRILL_DIR = drillRoot;
    await reapDrillLeftovers();
  }
  if (folder) rmSync(folder, { recursive: true, force: true });
});

async function loadCase(name: string, opa: OpaServer): Promise<Probe[]> {
  const directory = path.join(casesDirectory, name);
  const idFile = path.join(directory, 'policy-id');
  const explicitId = existsSync(idFile) ? readFileSync(idFile, 'utf8').trim() : undefined;
  for (const file of readdirSync(directory).filter((entry) => entry.endsWith('.rego'))) {
    await opa.putPolicy(explicitId ?? file, readFileSync(path.join(directory, file), 'utf8'));
  }
  const dataFile = path.join(directory, 'data.json');
  if (existsSync(dataFile)) await opa.putData('', readFileSync(dataFile, 'utf8'));
  const probesFile = path.join(directory, 'probes.json');
  return existsSync(probesFile) ? (JSON.parse(readFileSync(probesFile, 'utf8')) as Probe[]) : [];
}

function caseFlags(name: string): string[] {
  const file = path.join(casesDirectory, name, 'opa-flags');
  return existsSync(file) ? readFileSync(file, 'utf8').trim().split(/\s+/) : [];
}

/** Starts a live OPA with a case, backs it up and stops it; returns the plan and backup id. */
async function backupCase(name: string, planName: string): Promise<{ plan: Plan; backupId: string }> {
  const live = await startOpa(`drill-${planName}-live`, { args: caseFlags(name), env: { COUNTER_URL: counterUrl } });
  try {
    const probes = await loadCase(name, live);
    const plan: Plan = {
      name: planName,
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: { opa: [{ name: 'live', url: live.url, probes }] },
    };
    const result = await stack.backup(plan);
    assert.equal(result.status, 'complete', JSON.stringify(result.failures));
    return { plan, backupId: result.backupId };
  } finally {
    await live.stop();
  }
}

function check(result: DrillWorkflowResult, name: string, object = 'opa/live.tar.gz'): DrillWorkflowResult['checks'][number] {
  const found = result.checks.find((entry) => entry.name === name && entry.object === object);
  assert.ok(found, `no check ${name} of ${object} in ${JSON.stringify(result.checks)}`);
  return found;
}

function assertNoLeftovers(): void {
  assert.deepEqual(drillLeftovers(drillRoot), [], 'the drill left files behind');
}

for (const name of caseNames) {
  test(`drill passes on case ${name}`, async () => {
    const { plan, backupId } = await backupCase(name, `drill-case-${name}`);
    const result = await runDrill(stack, { plan, backup: 'latest' });
    assert.equal(result.backupId, backupId);
    assert.deepEqual(
      result.checks.filter((entry) => entry.outcome !== 'passed'),
      [],
      'some checks failed',
    );
    assert.deepEqual(result.checks.map((entry) => entry.name).sort(), ['artifact-digest', 'opa-bundle', 'opa-data', 'opa-policies', 'opa-probes']);
    assert.equal(result.outcome, 'passed');
    assert.ok(result.rtoSeconds !== undefined && result.rtoSeconds > 0, `rtoSeconds is ${result.rtoSeconds}`);
    assert.match(result.reportKey, new RegExp(`^${plan.name}/${backupId}/drills/\\d{8}T\\d{6}Z-[0-9a-f]{8}\\.json$`));

    const report = JSON.parse(readFileSync(path.join(folder, result.reportKey), 'utf8')) as DrillReport;
    assert.equal(report.outcome, 'passed');
    assert.equal(report.backupId, backupId);
    assert.equal(report.rtoSeconds, result.rtoSeconds);
    assert.equal(report.checks.length, 5);
    for (const entry of report.checks) assert.ok(entry.durationSeconds >= 0 && entry.message.length > 0, JSON.stringify(entry));
    assertNoLeftovers();
  });
}

test('changed data document fails opa-data', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-changed-data');
  await rewriteBundle(folder, plan.name, backupId, 'opa/live.tar.gz', (files) => {
    const data = JSON.parse(files.get('data.json')!.toString('utf8'));
    data.app.users.bob.roles = ['admin'];
    files.set('data.json', Buffer.from(JSON.stringify(data)));
  });
  const result = await runDrill(stack, { plan, backup: backupId });
  assert.equal(result.outcome, 'failed');
  assert.equal(check(result, 'artifact-digest').outcome, 'passed', 'the digests were recomputed, so only the semantic check may fail');
  const data = check(result, 'opa-data');
  assert.equal(data.outcome, 'failed');
  assert.match(data.message, /data\.json in the bundle has sha256 [0-9a-f]{64}, the manifest records/);
  assert.match(data.message, /the restored OPA's base documents have sha256/);
  assert.equal(check(result, 'opa-policies').outcome, 'passed');
  assertNoLeftovers();
});

test('removed policy fails opa-policies', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-removed-policy');
  const facts = readManifestFile(folder, plan.name, backupId).artifacts[0].facts as OpaFacts;
  await rewriteBundle(folder, plan.name, backupId, 'opa/live.tar.gz', (files) => {
    assert.ok(files.delete(facts.policies[0].file));
  });
  const result = await runDrill(stack, { plan, backup: backupId });
  assert.equal(result.outcome, 'failed');
  const policies = check(result, 'opa-policies');
  assert.equal(policies.outcome, 'failed');
  assert.equal(policies.message, `policy "${facts.policies[0].id}" (${facts.policies[0].file}) is missing from the bundle`);
  // Without the policy, the decisions change too.
  assert.equal(check(result, 'opa-probes').outcome, 'failed');
});

test('differing probe decision fails opa-probes', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-probe');
  const manifest = readManifestFile(folder, plan.name, backupId);
  const facts = manifest.artifacts[0].facts as OpaFacts;
  assert.equal(facts.probes[0].resultJson, 'true');
  facts.probes[0].resultJson = 'false';
  writeManifestFile(folder, plan.name, backupId, manifest);

  const result = await runDrill(stack, { plan, backup: backupId });
  assert.equal(result.outcome, 'failed');
  const probes = check(result, 'opa-probes');
  assert.equal(probes.outcome, 'failed');
  assert.match(probes.message, /^1 of 4 probes differ: probe 1 \(app\/authz\/allow\) decided status 200, result true; recorded status 200, result false$/);
  assert.equal(check(result, 'opa-data').outcome, 'passed');
});

test('bundle with a dot-dot entry fails opa-bundle', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-dot-dot');
  await rewriteBundle(folder, plan.name, backupId, 'opa/live.tar.gz', () => [{ name: '../escape.rego', body: Buffer.from('package escape\n') }]);
  const result = await runDrill(stack, { plan, backup: backupId });
  assert.equal(result.outcome, 'failed');
  const bundle = check(result, 'opa-bundle');
  assert.equal(bundle.outcome, 'failed');
  assert.match(bundle.message, /the bundle was rejected: unsafe entry "\.\.\/escape\.rego": "\.\." components are not allowed/);
  for (const name of ['opa-policies', 'opa-data', 'opa-probes']) {
    assert.match(check(result, name).message, /not checked: the bundle did not load/);
  }
  assert.equal(existsSync(path.join(drillRoot, 'escape.rego')), false);
  assertNoLeftovers();
});

test('gzip bomb fails opa-bundle', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-bomb');
  // Twice the worker's limit, of zeros: about 64 KB once compressed.
  await rewriteBundle(folder, plan.name, backupId, 'opa/live.tar.gz', () => [{ name: 'policies/zeros.rego', body: Buffer.alloc(2 * BUNDLE_LIMIT) }]);
  const result = await runDrill(stack, { plan, backup: backupId });
  const bundle = check(result, 'opa-bundle');
  assert.equal(bundle.outcome, 'failed');
  assert.match(bundle.message, new RegExp(`expands to more than ${BUNDLE_LIMIT} bytes, the limit for a bundle; it may be a gzip bomb`));
  assertNoLeftovers();
});

test('damaged artifact fails artifact-digest', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-damaged');
  const file = path.join(folder, plan.name, backupId, 'opa', 'live.tar.gz');
  const bytes = readFileSync(file);
  bytes[bytes.length - 10] ^= 0xff;
  writeFileSync(file, bytes);
  const result = await runDrill(stack, { plan, backup: backupId });
  const digest = check(result, 'artifact-digest');
  assert.equal(digest.outcome, 'failed');
  assert.match(digest.message, /digest mismatch/);
  assert.match(check(result, 'opa-bundle').message, /not restored: opa\/live\.tar\.gz failed its digest check/);
  assert.equal(result.rtoSeconds, undefined);
});

test('drill of an unknown backup id fails to start', async () => {
  const { plan } = await backupCase('empty', 'drill-unknown');
  await assert.rejects(runDrill(stack, { plan, backup: '20200101T000000Z-00000000' }), (error: Error) => {
    let current = error as Error & { cause?: Error };
    while (current.cause) current = current.cause as Error & { cause?: Error };
    assert.match(current.message, /backup 20200101T000000Z-00000000 of plan drill-unknown has no manifest/);
    return true;
  });
});

test('backup with drillAfter runs a drill', async () => {
  const live = await startOpa('drill-after-live');
  try {
    const probes = await loadCase('rbac-basic', live);
    const plan: Plan = {
      name: 'drill-after',
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: { opa: [{ name: 'live', url: live.url, probes }] },
    };
    const result = await stack.client.workflow.execute('backupWorkflow', {
      taskQueue: stack.taskQueue,
      workflowId: `drill-after-${Date.now()}`,
      args: [{ plan, drillAfter: true }],
    });
    assert.equal(result.drill?.outcome, 'passed', JSON.stringify(result.drill));
    assert.ok(result.drill?.reportKey?.startsWith(`drill-after/${result.backupId}/drills/`), result.drill?.reportKey);
    assert.ok(existsSync(path.join(folder, result.drill!.reportKey!)));
  } finally {
    await live.stop();
  }
});

function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [path.join(repositoryRoot, 'bin', 'opa-backup'), ...args],
      { env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue }, timeout: 120_000 },
      (error, stdout, stderr) => resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

test('drill command prints checks and exit codes', async () => {
  const { plan, backupId } = await backupCase('rbac-basic', 'drill-cli');
  const planFile = path.join(folder, 'drill-cli.yaml');
  writeFileSync(planFile, JSON.stringify({ ...plan, destination: { local: { path: '.' } } }));

  const passed = await runCli(['drill', '--plan', planFile, '--backup', 'latest']);
  assert.equal(passed.code, 0, passed.stderr + passed.stdout);
  assert.match(passed.stdout, new RegExp(`drilling backup ${backupId} of plan drill-cli`));
  assert.match(passed.stdout, /opa-probes opa\/live\.tar\.gz: passed: 4 probes decide as recorded/);
  assert.match(passed.stdout, /drill of backup \S+: passed, 5 of 5 checks passed/);

  const manifest = readManifestFile(folder, plan.name, backupId);
  (manifest.artifacts[0].facts as OpaFacts).probes[1].resultJson = 'true';
  writeManifestFile(folder, plan.name, backupId, manifest);
  const failed = await runCli(['drill', '--plan', planFile, '--backup', backupId, '--json']);
  assert.equal(failed.code, 6, failed.stderr);
  const result = JSON.parse(failed.stdout) as DrillWorkflowResult;
  assert.equal(result.outcome, 'failed');
  assert.equal(check(result, 'opa-probes').outcome, 'failed');

  const usage = await runCli(['drill', '--plan', planFile, '--backup', 'latest', '--within-days', '3']);
  assert.equal(usage.code, 2);
  assert.match(usage.stderr, /--within-days applies only with --backup random/);
  const badId = await runCli(['drill', '--plan', planFile, '--backup', 'nonsense']);
  assert.equal(badId.code, 2, badId.stderr);
  assert.match(badId.stderr, /invalid --backup "nonsense": expected a backup id/);

  const random = await runCli(['drill', '--plan', planFile, '--backup', 'random', '--within-days', '1']);
  assert.equal(random.code, 6, 'the only recent backup is the damaged one');
});

test('drillTarget names the backup', async () => {
  const { plan, backupId } = await backupCase('empty', 'drill-target');
  const handle = await stack.client.workflow.start('restoreDrillWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `drill-target-${Date.now()}`,
    args: [{ plan, backup: 'latest' }],
  });
  await handle.result();
  assert.deepEqual(await handle.query('drillTarget'), { plan: plan.name, backupId });
});

test('drill on a worker without opa cannot run', async () => {
  const opa = await startOpa('drill-no-tool-opa');
  const taskQueue = `${stack.taskQueue}-no-opa`;
  // A worker whose PATH lacks .tools/bin, where the tests' opa lives.
  const worker = await startWorker('drill-no-tool-worker', {
    address: stack.temporal.address,
    taskQueue,
    env: { PATH: '/usr/bin:/bin', OPA_BACKUP_DRILL_DIR: drillRoot },
  });
  try {
    await opa.putPolicy('authz.rego', 'package authz\n\nallow if input.user == "alice"\n');
    const plan: Plan = {
      name: 'drill-no-tool',
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: { opa: [{ name: 'edge', url: opa.url }] },
    };
    const backup = await stack.backup(plan);
    await assert.rejects(
      stack.client.workflow.execute('restoreDrillWorkflow', {
        taskQueue,
        workflowId: `drill-no-tool-${backup.backupId}`,
        args: [{ plan, backup: backup.backupId }],
      }),
      (error: unknown) => /the drill could not run on this worker: opa not found on the worker's PATH/.test(String((error as { cause?: Error }).cause?.message)),
    );
    assert.deepEqual(
      existsSync(path.join(folder, plan.name, backup.backupId, 'drills')) ? readdirSync(path.join(folder, plan.name, backup.backupId, 'drills')) : [],
      [],
      'a drill that could not run stored a report',
    );
  } finally {
    await worker.stop('SIGTERM');
    await opa.stop();
  }
});
