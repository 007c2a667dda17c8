// Faults during a backup: a worker killed mid-step, an OPA that is down and
// comes back, credentials an OPA rejects, and secrets that must stay out of
// workflow history and logs.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { randomBytes, createHash } from 'node:crypto';
import type { WorkflowHandle } from '@temporalio/client';
import { makeBackupId } from '../common/layout';
import type { Plan } from '../common/plan';
import type { BackupWorkflowResult } from '../common/workflow-types';
import { listBackups } from '../client/backups';
import { startOpa } from './harness/opa';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startSlowProxy } from './harness/slow-proxy';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot } from './harness/tools';

const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
const goodToken = `good-${randomBytes(12).toString('hex')}`;
const badToken = `bad-${randomBytes(12).toString('hex')}`;
const tokenEnvironment = { OPA_FAULTS_GOOD_TOKEN: goodToken, OPA_FAULTS_BAD_TOKEN: badToken };

let stack: Stack;
let folder: string;

before(async () => {
  stack = await startStack('faults', tokenEnvironment);
  folder = mkdtempSync(path.join(runsDirectory, 'faults-'));
});

after(async () => {
  await stack?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

const fastRetries = {
  opaSnapshot: {
    heartbeatTimeout: '2s',
    attemptTimeout: '1m',
    retry: { initialInterval: '500ms', maximumInterval: '1s', maximumAttempts: 0 },
  },
};

async function loadRbac(opa: { putPolicy: (id: string, text: string) => Promise<void>; putData: (p: string, j: string) => Promise<void> }): Promise<void> {
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
}

function manifestsOf(plan: Plan): string[] {
  const planFolder = path.join(folder, plan.name);
  if (!existsSync(planFolder)) return [];
  return readdirSync(planFolder).filter((backupId) => existsSync(path.join(planFolder, backupId, 'manifest.json')));
}

async function waitFor(condition: () => boolean | Promise<boolean>, what: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function pendingAttempt(handle: WorkflowHandle, activityId: string): Promise<number> {
  const description = await handle.describe();
  const pending = (description.raw.pendingActivities ?? []).find((activity) => activity.activityId === activityId);
  return pending?.attempt ?? 0;
}

/** Attempt number of the last start of an activity, from the workflow history. */
async function startedAttempt(handle: WorkflowHandle, activityId: string): Promise<number | undefined> {
  const history = await handle.fetchHistory();
  const events = history.events ?? [];
  const scheduled = events.find((event) => event.activityTaskScheduledEventAttributes?.activityId === activityId);
  if (!scheduled) return undefined;
  const started = events.find(
    (event) => String(event.activityTaskStartedEventAttributes?.scheduledEventId) === String(scheduled.eventId),
  );
  return started?.activityTaskStartedEventAttributes?.attempt ?? undefined;
}

test('worker killed mid-snapshot: a new worker completes the backup once', async () => {
  const opa = await startOpa('faults-kill-opa');
  const proxy = await startSlowProxy(opa.url, 700);
  try {
    await loadRbac(opa);
    const plan: Plan = {
      name: 'kill',
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: { opa: [{ name: 'slow', url: proxy.url }] },
      settings: fastRetries,
    };
    const handle = await stack.client.workflow.start('backupWorkflow', {
      taskQueue: stack.taskQueue,
      workflowId: `kill-${randomBytes(4).toString('hex')}`,
      args: [{ plan }],
    });
    const first = stack.worker;
    await waitFor(() => first.log().includes('"OPA snapshot started"'), 'the snapshot to start');
    await waitFor(() => proxy.requests >= 2, 'the snapshot to be under way');
    await first.stop('SIGKILL');
    assert.equal(first.log().includes('"OPA snapshot stored"'), false, 'the first worker finished before it was killed');

    const second = await stack.restartWorker('faults-worker-2');
    const result = (await handle.result()) as BackupWorkflowResult;
    assert.equal(result.status, 'complete');
    assert.match(second.log(), /"OPA snapshot stored"/);
    assert.ok(((await startedAttempt(handle, 'opa-slow')) ?? 0) >= 2, 'the snapshot was not retried');

    assert.deepEqual(manifestsOf(plan), [result.backupId]);
    const listed = await listBackups(plan);
    assert.deepEqual(
      listed.map((backup) => backup.backupId),
      [result.backupId],
    );
  } finally {
    await proxy.close();
    await opa.stop();
  }
});

test('OPA that is down is retried and backed up once it is up', async () => {
  const port = await freePort();
  const plan: Plan = {
    name: 'down',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'late', url: `http://127.0.0.1:${port}` }] },
    settings: fastRetries,
  };
  const handle = await stack.client.workflow.start('backupWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `down-${randomBytes(4).toString('hex')}`,
    args: [{ plan }],
  });
  await waitFor(async () => (await pendingAttempt(handle, 'opa-late')) >= 3, 'three failed attempts');
  const description = await handle.describe();
  const pending = description.raw.pendingActivities?.find((activity) => activity.activityId === 'opa-late');
  assert.match(pending?.lastFailure?.message ?? '', /snapshot of OPA "late" failed: .*ECONNREFUSED/);

  const opa = await startOpa('faults-late-opa', { port });
  try {
    await loadRbac(opa);
    const result = (await handle.result()) as BackupWorkflowResult;
    assert.equal(result.status, 'complete');
    assert.ok(((await startedAttempt(handle, 'opa-late')) ?? 0) >= 3);
  } finally {
    await opa.stop();
  }
});

test('OPA answering 401 fails at once, naming source and token reference', async () => {
  const policyDirectory = mkdtempSync(path.join(runsDirectory, 'faults-authz-'));
  const digest = createHash('sha256').update(goodToken).digest('hex');
  writeFileSync(
    path.join(policyDirectory, 'authz.rego'),
    `package system.authz\n\ndefault allow := false\n\nallow if input.path == ["health"]\n\nallow if crypto.sha256(input.identity) == "${digest}"\n`,
  );
  const opa = await startOpa('faults-auth-opa', {
    args: ['--authentication=token', '--authorization=basic', path.join(policyDirectory, 'authz.rego')],
  });
  try {
    const plan: Plan = {
      name: 'auth',
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: {
        opa: [
          { name: 'good', url: opa.url, token: 'env:OPA_FAULTS_GOOD_TOKEN' },
          { name: 'bad', url: opa.url, token: 'env:OPA_FAULTS_BAD_TOKEN' },
        ],
      },
      settings: fastRetries,
    };
    const handle = await stack.client.workflow.start('backupWorkflow', {
      taskQueue: stack.taskQueue,
      workflowId: `auth-${randomBytes(4).toString('hex')}`,
      args: [{ plan }],
    });
    const result = (await handle.result()) as BackupWorkflowResult;
    assert.equal(result.status, 'partial');
    assert.deepEqual(
      result.artifacts.map((artifact) => artifact.source),
      ['good'],
    );
    assert.equal(result.failures.length, 1);
    assert.equal(result.failures[0].source, 'bad');
    assert.equal(result.failures[0].type, 'Unauthorized');
    assert.match(result.failures[0].message, /snapshot of OPA "bad" failed: GET \/v1\/policies returned 401; check the token in env OPA_FAULTS_BAD_TOKEN/);
    assert.equal(await startedAttempt(handle, 'opa-bad'), 1, 'a 401 was retried');

    const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8'));
    assert.equal(manifest.status, 'partial');
    assert.equal(manifest.failures[0].source, 'bad');

    // No token value in the workflow history or the worker's log.
    const history = JSON.stringify(await handle.fetchHistory());
    for (const token of [goodToken, badToken]) {
      assert.equal(history.includes(token), false, 'a token is in the workflow history');
      assert.equal(stack.worker.log().includes(token), false, 'a token is in the worker log');
    }
  } finally {
    await opa.stop();
    rmSync(policyDirectory, { recursive: true, force: true });
  }
});

test('CLI waits, prints the result and exits 3 on a partial backup', async () => {
  const opa = await startOpa('faults-cli-opa');
  try {
    await loadRbac(opa);
    const deadPort = await freePort();
    const planFile = path.join(folder, 'cli-plan.yaml');
    writeFileSync(
      planFile,
      [
        'name: cli',
        'destination:',
        `  local: { path: ${JSON.stringify(folder)} }`,
        'encryption: { unencrypted: true }',
        'sources:',
        '  opa:',
        `    - { name: up, url: ${JSON.stringify(opa.url)} }`,
        `    - { name: down, url: "http://127.0.0.1:${deadPort}" }`,
        'settings:',
        '  opaSnapshot:',
        '    retry: { initialInterval: 200ms, maximumInterval: 200ms, maximumAttempts: 2 }',
      ].join('\n'),
    );
    const cli = path.join(repositoryRoot, 'bin', 'opa-backup');
    const environment = { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue };
    const run = spawnSync(process.execPath, [cli, 'backup', '--plan', planFile, '--wait', '--json'], {
      env: environment,
      encoding: 'utf8',
      timeout: 120_000,
    });
    assert.equal(run.status, 3, run.stderr);
    const result = JSON.parse(run.stdout) as BackupWorkflowResult;
    assert.equal(result.status, 'partial');
    assert.equal(result.failures[0].source, 'down');
    assert.match(run.stderr, /opa down: failed: snapshot of OPA "down" failed/);
    assert.doesNotMatch(run.stderr, /no worker polls/);

    // A folder that is not named as a backup is not one, even with a manifest in it.
    mkdirSync(path.join(folder, 'cli', 'not-a-backup'));
    copyFileSync(path.join(folder, 'cli', result.backupId, 'manifest.json'), path.join(folder, 'cli', 'not-a-backup', 'manifest.json'));
    const listing = spawnSync(process.execPath, [cli, 'list', '--plan', planFile, '--json'], { env: environment, encoding: 'utf8' });
    assert.equal(listing.status, 0, listing.stderr);
    const listed = JSON.parse(listing.stdout) as { backups: Array<{ backupId: string; status: string }> };
    assert.deepEqual(
      listed.backups.map((backup) => [backup.backupId, backup.status]),
      [[result.backupId, 'partial']],
    );

    // verify latest checks the newest backup with a manifest even when that manifest is unreadable.
    const broken = makeBackupId(new Date(Date.now() + 60_000), 'ffffffff');
    mkdirSync(path.join(folder, 'cli', broken));
    writeFileSync(path.join(folder, 'cli', broken, 'manifest.json'), '{ not json');
    const verify = spawnSync(process.execPath, [cli, 'verify', 'latest', '--plan', planFile], { env: environment, encoding: 'utf8' });
    assert.equal(verify.status, 4, verify.stdout + verify.stderr);
    assert.match(verify.stdout, /DAMAGED .*manifest/);
    assert.match(verify.stdout, new RegExp(`verifying backup ${broken}`));
  } finally {
    await opa.stop();
  }
});

test('CLI shows each step progress from heartbeats', async () => {
  const opa = await startOpa('faults-progress-opa');
  const proxy = await startSlowProxy(opa.url, 400);
  try {
    await loadRbac(opa);
    const planFile = path.join(folder, 'progress-plan.yaml');
    writeFileSync(
      planFile,
      [
        'name: progress',
        `destination: { local: { path: ${JSON.stringify(folder)} } }`,
        'encryption: { unencrypted: true }',
        'sources:',
        '  opa:',
        `    - { name: slow, url: ${JSON.stringify(proxy.url)} }`,
        'settings:',
        '  opaSnapshot: { heartbeatTimeout: 1s }',
      ].join('\n'),
    );
    const cli = path.join(repositoryRoot, 'bin', 'opa-backup');
    // The proxy runs in this process, so the CLI must run without blocking it.
    const child = spawn(process.execPath, [cli, 'backup', '--plan', planFile, '--wait'], {
      env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
    });
    const run = { stdout: '', stderr: '', status: null as number | null };
    child.stdout.setEncoding('utf8').on('data', (text: string) => (run.stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (run.stderr += text));
    run.status = await new Promise<number | null>((resolve) => child.once('close', resolve));
    assert.equal(run.status, 0, run.stdout + run.stderr);
    // Heartbeats come every third of the 1 s timeout, and each request through the proxy takes 400 ms.
    assert.match(run.stdout, /^ {2}opa-slow: (policies|data|probes)\b/m);
  } finally {
    await proxy.close();
    await opa.stop();
  }
});

test('CLI shows why the worker rejected the plan', async () => {
  const planFile = path.join(folder, 'worker-secret.yaml');
  writeFileSync(
    planFile,
    [
      'name: worker-secret',
      `destination: { local: { path: ${JSON.stringify(folder)} } }`,
      'encryption: { unencrypted: true }',
      'sources:',
      '  opa:',
      '    - { name: edge, url: "http://127.0.0.1:9", token: env:OPA_FAULTS_SET_ONLY_FOR_THE_CLI }',
    ].join('\n'),
  );
  const cli = path.join(repositoryRoot, 'bin', 'opa-backup');
  const run = spawnSync(process.execPath, [cli, 'backup', '--plan', planFile, '--wait', '--no-secret-check'], {
    env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(run.status, 1, run.stderr);
  assert.match(run.stderr, /backup failed: .*sources\.opa\[0\]\.token: environment variable OPA_FAULTS_SET_ONLY_FOR_THE_CLI .*is not set/);
});

test('CLI warns without polling worker', async () => {
  const taskQueue = `nobody-polls-${randomBytes(4).toString('hex')}`;
  const planFile = path.join(folder, 'no-worker-plan.yaml');
  writeFileSync(
    planFile,
    [
      'name: no-worker',
      `destination: { local: { path: ${JSON.stringify(folder)} } }`,
      'encryption: { unencrypted: true }',
      'sources: { opa: [{ name: edge, url: "http://127.0.0.1:9" }] }',
    ].join('\n'),
  );
  const cli = path.join(repositoryRoot, 'bin', 'opa-backup');
  const run = spawnSync(process.execPath, [cli, 'backup', '--plan', planFile], {
    env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: taskQueue },
    encoding: 'utf8',
    timeout: 60_000,
  });
  try {
    assert.equal(run.status, 0, run.stderr);
    assert.match(run.stderr, new RegExp(`warning: no worker polls task queue "${taskQueue}"`));
    // A second start, on the polled queue, names the queue the stuck run waits on.
    const second = spawnSync(process.execPath, [cli, 'backup', '--plan', planFile], {
      env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
      encoding: 'utf8',
      timeout: 60_000,
    });
    assert.equal(second.status, 75, second.stderr);
    assert.match(second.stderr, new RegExp(`If no worker polls task queue "${taskQueue}", start one, or end that run with: temporal workflow terminate`));
  } finally {
    await stack.client.workflow.getHandle('opa-backup/no-worker/backup').terminate('test cleanup');
  }
});
