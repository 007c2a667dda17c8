// Temporal Schedules of a plan, against the real dev server and worker.
// `schedule apply` is idempotent and follows the plan, and the schedules
// work with the `temporal` CLI. A triggered backup stores a manifest, and a
// manual and a scheduled backup of one plan never run at once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync, type ExecFileException } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { WorkflowExecutionInfo } from '@temporalio/client';
import { listBackups } from '../client/backups';
import { loadPlanFile } from '../activities/plan-loader';
import type { ScheduledRunResult } from '../workflows/scheduled';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startSlowProxy, type SlowProxy } from './harness/slow-proxy';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool } from './harness/tools';

let stack: Stack;
let opa: OpaServer;
let proxy: SlowProxy;
let folder: string;

before(async () => {
  stack = await startStack('schedules');
  opa = await startOpa('schedules-opa');
  const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
  // Each request to OPA through the proxy waits 1.5 s, so a backup takes several seconds.
  proxy = await startSlowProxy(opa.url, 1500);
  folder = mkdtempSync(path.join(runsDirectory, 'schedules-'));
});

after(async () => {
  await proxy?.close();
  await opa?.stop();
  await stack?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function writePlan(name: string, lines: string[], opaUrl = opa.url): string {
  const file = path.join(folder, `${name}-${Math.random().toString(16).slice(2, 8)}.yaml`);
  writeFileSync(
    file,
    [
      `name: ${name}`,
      'destination:',
      `  local: { path: ./backups-${name} }`,
      'encryption: { unencrypted: true }',
      'sources:',
      '  opa:',
      `    - { name: edge-1, url: "${opaUrl}" }`,
      ...lines,
      '',
    ].join('\n'),
  );
  return file;
}

/** Returns a child's exit code: 0 without an error, null when a signal ended it. */
function exitStatus(error: ExecFileException | null): number | null {
  if (!error) return 0;
  return typeof error.code === 'number' ? error.code : null;
}

function cli(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [path.join(repositoryRoot, 'bin', 'opa-backup'), ...args],
      {
        encoding: 'utf8',
        timeout: 120_000,
        env: { ...process.env, TEMPORAL_ADDRESS: stack.temporal.address, OPA_BACKUP_TASK_QUEUE: stack.taskQueue },
      },
      (error, stdout, stderr) => resolve({ status: exitStatus(error), stdout, stderr }),
    );
  });
}

function temporal(args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(tool('temporal'), [...args, '--address', stack.temporal.address], { encoding: 'utf8', timeout: 60_000 });
}

async function scheduleIds(plan: string): Promise<string[]> {
  const ids: string[] = [];
  for await (const schedule of stack.client.schedule.list()) {
    if (schedule.scheduleId.startsWith(`opa-backup/${plan}/`)) ids.push(schedule.scheduleId);
  }
  return ids.sort();
}

async function listWorkflows(query: string): Promise<WorkflowExecutionInfo[]> {
  const found: WorkflowExecutionInfo[] = [];
  for await (const execution of stack.client.workflow.list({ query })) found.push(execution);
  return found;
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    assert.ok(Date.now() < deadline, `timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

test('schedule apply twice keeps one per kind', async () => {
  const first = writePlan('sched-apply', [
    'schedule:',
    '  timezone: Europe/Berlin',
    '  backup: "0 2 * * *"',
    '  drill: { cron: "0 5 * * 0", backup: random, randomWithinDays: 7 }',
    'retention: { keepLast: 3 }',
  ]);
  const created = await cli(['schedule', 'apply', '--plan', first, '--json']);
  assert.equal(created.status, 0, created.stderr);
  assert.deepEqual(
    (JSON.parse(created.stdout) as { schedules: Array<{ kind: string; action: string }> }).schedules.map((entry) => `${entry.action} ${entry.kind}`),
    ['created backup', 'created drill', 'created retention'],
  );
  assert.deepEqual(await scheduleIds('sched-apply'), [
    'opa-backup/sched-apply/backup',
    'opa-backup/sched-apply/drill',
    'opa-backup/sched-apply/retention',
  ]);
  const drill = await stack.client.schedule.getHandle('opa-backup/sched-apply/drill').describe();
  assert.equal(drill.action.workflowType, 'restoreDrillWorkflow');
  const drillInput = (drill.action.args ?? [])[0] as { backup?: string; randomWithinDays?: number; plan?: { name: string } };
  assert.equal(drillInput.backup, 'random');
  assert.equal(drillInput.randomWithinDays, 7);
  assert.equal(drillInput.plan?.name, 'sched-apply');

  // The second plan changes the backup spec and drops the drill.
  const second = writePlan('sched-apply', [
    'schedule:',
    '  timezone: Europe/Berlin',
    '  backup: { every: 6h, offset: 30m, jitter: 5m, catchupWindow: 10m, overlap: bufferOne }',
    'retention: { keepLast: 3 }',
  ]);
  for (let round = 0; round < 2; round++) {
    const applied = await cli(['schedule', 'apply', '--plan', second]);
    assert.equal(applied.status, 0, applied.stderr);
    if (round === 0) assert.match(applied.stdout, /deleted drill schedule opa-backup\/sched-apply\/drill/);
    else assert.doesNotMatch(applied.stdout, /deleted/);
  }
  assert.deepEqual(await scheduleIds('sched-apply'), ['opa-backup/sched-apply/backup', 'opa-backup/sched-apply/retention']);

  const backup = await stack.client.schedule.getHandle('opa-backup/sched-apply/backup').describe();
  assert.equal(backup.spec.calendars?.length ?? 0, 0, 'the cron spec of the first apply is gone');
  assert.deepEqual(backup.spec.intervals, [{ every: 6 * 3_600_000, offset: 30 * 60_000 }]);
  assert.equal(backup.spec.jitter, 5 * 60_000);
  assert.equal(backup.spec.timezone, 'Europe/Berlin');
  assert.equal(backup.policies.overlap, 'BUFFER_ONE');
  assert.equal(backup.policies.catchupWindow, 10 * 60_000);
  assert.equal(backup.action.workflowType, 'scheduledBackupWorkflow');
  assert.equal(((backup.action.args ?? [])[0] as { plan?: { name: string } }).plan?.name, 'sched-apply');

  const retention = await stack.client.schedule.getHandle('opa-backup/sched-apply/retention').describe();
  assert.equal(retention.action.workflowType, 'scheduledRetentionWorkflow');
  assert.ok((retention.spec.calendars?.length ?? 0) > 0, 'retention runs @daily by default');
});

test('schedules operable with temporal CLI', async () => {
  const plan = writePlan('sched-cli', ['schedule: { backup: "0 3 * * *" }']);
  assert.equal((await cli(['schedule', 'apply', '--plan', plan])).status, 0);

  const described = temporal(['schedule', 'describe', '--schedule-id', 'opa-backup/sched-cli/backup', '--output', 'json']);
  assert.equal(described.status, 0, described.stderr);
  assert.match(described.stdout, /scheduledBackupWorkflow/);

  const paused = temporal(['schedule', 'toggle', '--schedule-id', 'opa-backup/sched-cli/backup', '--pause', '--reason', 'maintenance']);
  assert.equal(paused.status, 0, paused.stderr);
  // apply keeps a pause made elsewhere, because the plan does not set `paused`.
  assert.equal((await cli(['schedule', 'apply', '--plan', plan])).status, 0);
  const listed = await cli(['schedule', 'list', '--plan', plan, '--json']);
  assert.equal(listed.status, 0, listed.stderr);
  assert.equal((JSON.parse(listed.stdout) as { schedules: Array<{ paused: boolean }> }).schedules[0].paused, true);

  const text = await cli(['schedule', 'describe', '--plan', plan]);
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, /backup opa-backup\/sched-cli\/backup: paused, cron "0 3 \* \* \*" in UTC/);
  assert.doesNotMatch(text.stdout, /\{"second"/);

  const resumed = await cli(['schedule', 'resume', '--plan', plan]);
  assert.equal(resumed.status, 0, resumed.stderr);
  assert.match(resumed.stdout, /resumed backup schedule opa-backup\/sched-cli\/backup/);
  assert.equal((await stack.client.schedule.getHandle('opa-backup/sched-cli/backup').describe()).state.paused, false);

  const missing = await cli(['schedule', 'trigger', '--plan', plan, '--kind', 'drill']);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /no drill schedule for plan sched-cli; create them with: opa-backup schedule apply/);
});

test('trigger runs backup that stores manifest', async () => {
  const planFile = writePlan('sched-trigger', ['schedule: { backup: "0 4 1 1 *" }']);
  assert.equal((await cli(['schedule', 'apply', '--plan', planFile])).status, 0);
  const triggered = temporal(['schedule', 'trigger', '--schedule-id', 'opa-backup/sched-trigger/backup']);
  assert.equal(triggered.status, 0, triggered.stderr);

  const plan = loadPlanFile(planFile);
  const backups = await waitFor('the triggered backup', async () => {
    const list = await listBackups(plan);
    return list.length > 0 ? list : undefined;
  });
  assert.equal(backups.length, 1);
  assert.equal(backups[0].status, 'complete');

  const wrappers = await waitFor('the scheduled run to close', async () => {
    const runs = await listWorkflows(`WorkflowType = 'scheduledBackupWorkflow' AND WorkflowId STARTS_WITH 'opa-backup/sched-trigger/' AND ExecutionStatus = 'Completed'`);
    return runs.length > 0 ? runs : undefined;
  });
  const result = (await stack.client.workflow.getHandle(wrappers[0].workflowId, wrappers[0].runId).result()) as ScheduledRunResult;
  assert.equal(result.outcome, 'completed');
  assert.equal(result.workflowId, 'opa-backup/sched-trigger/backup');
  assert.equal((result.result as { backupId: string }).backupId, backups[0].backupId);

  const described = await cli(['schedule', 'describe', '--plan', planFile]);
  assert.equal(described.status, 0, described.stderr);
  assert.match(described.stdout, /runs started 1, not started because of the overlap policy 0/);
  assert.match(described.stdout, new RegExp(`ran at \\S+: ${wrappers[0].workflowId}, completed, complete$`, 'm'));
});

test('manual and scheduled backups never overlap', async () => {
  const planFile = writePlan('sched-guard', ['schedule: { backup: "0 4 1 1 *" }'], proxy.url);
  const plan = loadPlanFile(planFile);
  assert.equal((await cli(['schedule', 'apply', '--plan', planFile])).status, 0);
  const fixedId = 'opa-backup/sched-guard/backup';

  // A scheduled backup starts and runs slowly behind the proxy.
  assert.equal((await cli(['schedule', 'trigger', '--plan', planFile])).status, 0);
  await waitFor('the scheduled backup to run', async () => {
    try {
      const description = await stack.client.workflow.getHandle(fixedId).describe();
      return description.status.name === 'RUNNING' ? true : undefined;
    } catch {
      return undefined;
    }
  });

  // A manual backup meanwhile is rejected with its own exit code.
  const manual = await cli(['backup', '--plan', planFile, '--wait']);
  assert.equal(manual.status, 75, manual.stdout + manual.stderr);
  assert.match(manual.stderr, /a backup of plan sched-guard is already running as workflow opa-backup\/sched-guard\/backup/);

  // A second scheduled run meanwhile completes as skipped.
  assert.equal((await cli(['schedule', 'trigger', '--plan', planFile])).status, 0);
  const results = await waitFor('both scheduled runs to close', async () => {
    const runs = await listWorkflows(`WorkflowType = 'scheduledBackupWorkflow' AND WorkflowId STARTS_WITH 'opa-backup/sched-guard/' AND ExecutionStatus = 'Completed'`);
    if (runs.length < 2) return undefined;
    return Promise.all(runs.map((run) => stack.client.workflow.getHandle(run.workflowId, run.runId).result() as Promise<ScheduledRunResult>));
  }, 120_000);
  assert.deepEqual(results.map((result) => result.outcome).sort(), ['completed', 'skipped']);
  assert.match(results.find((result) => result.outcome === 'skipped')!.reason!, /a backup of plan sched-guard is already running/);

  // Now that nothing runs, a manual backup starts, with the same fixed id.
  const later = await cli(['backup', '--plan', planFile, '--wait']);
  assert.equal(later.status, 0, later.stdout + later.stderr);
  assert.equal((await listBackups(plan)).length, 2);

  // Every run with the fixed id ran alone: no two time ranges overlap.
  const runs = await listWorkflows(`WorkflowId = '${fixedId}'`);
  assert.equal(runs.length, 2);
  const ranges = runs
    .map((run) => [run.startTime.getTime(), run.closeTime?.getTime() ?? Infinity] as const)
    .sort((a, b) => a[0] - b[0]);
  assert.ok(ranges[0][1] <= ranges[1][0], `runs overlap: ${JSON.stringify(ranges)}`);
});

test('schedule apply rejects invalid timing', async () => {
  const plan = writePlan('sched-invalid', [
    'schedule:',
    '  backup: { cron: "0 2 * * *", every: 6h }',
    '  drill: { every: 1d, randomWithinDays: 3 }',
    '  retention: { every: 1d, overlap: sometimes }',
  ]);
  const run = await cli(['schedule', 'apply', '--plan', plan]);
  assert.equal(run.status, 2, run.stdout + run.stderr);
  assert.match(run.stderr, /schedule\.backup: must set exactly one of "cron" \(such as "0 2 \* \* \*"\) or "every" \(such as "6h"\)/);
  assert.match(run.stderr, /schedule\.drill\.randomWithinDays: is only meaningful with backup: random/);
  assert.match(run.stderr, /schedule\.retention\.overlap: must be one of "skip", "bufferOne", "bufferAll", "cancelOther", "terminateOther", "allowAll"/);

  const number = writePlan('sched-invalid', ['schedule: { backup: 61 }']);
  const numberRun = await cli(['schedule', 'apply', '--plan', number]);
  assert.equal(numberRun.status, 2, numberRun.stdout + numberRun.stderr);
  assert.match(numberRun.stderr, /schedule\.backup: must be a cron expression such as "0 2 \* \* \*" or a mapping/);
  assert.deepEqual(await scheduleIds('sched-invalid'), []);
});
