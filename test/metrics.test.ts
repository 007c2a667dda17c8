// The worker's Prometheus endpoint: the project's backup metrics next to
// the Temporal SDK's own, scraped from a worker that ran real backups.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { WorkflowFailedError } from '@temporalio/client';
import { Runtime } from '@temporalio/worker';
import { recordDrillMetrics } from '../activities/metrics';
import { metricsTelemetryOptions, startProjectMetrics } from '../worker/metrics';
import type { Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startOpa, type OpaServer } from './harness/opa';
import { freePort } from './harness/ports';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { toolsBin } from './harness/tools';

let stack: Stack;
let opa: OpaServer;
let folder: string;
let metricsUrl: string;

before(async () => {
  const port = await freePort();
  metricsUrl = `http://127.0.0.1:${port}/metrics`;
  // opa on PATH lets the worker run a restore drill.
  stack = await startStack('metrics', { OPA_BACKUP_METRICS_ADDRESS: `127.0.0.1:${port}`, PATH: `${toolsBin}:${process.env.PATH}` });
  folder = mkdtempSync(path.join(runsDirectory, 'metrics-'));
  opa = await startOpa('metrics-opa');
  await opa.putPolicy('authz.rego', 'package authz\n\nallow if input.user == "alice"\n');
  await opa.putData('roles', JSON.stringify({ alice: ['admin'], bob: ['viewer'] }));
});

after(async () => {
  await opa?.stop();
  await stack?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text format's sample lines; comments and blank lines are skipped. */
function parseSamples(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels: Record<string, string> = {};
    for (const label of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[label[1]] = label[2];
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

/** Returns the value of the one sample with this name and these labels (others may exist), or undefined. */
function valueOf(samples: Sample[], name: string, labels: Record<string, string>): number | undefined {
  const found = samples.filter((sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value));
  assert.ok(found.length <= 1, `${name} ${JSON.stringify(labels)} matches ${found.length} samples`);
  return found[0]?.value;
}

/** Scrapes until `ready` holds for the samples (the exporter may lag a recording), or fails after 15 s. */
async function scrapeUntil(ready: (samples: Sample[]) => boolean, what: string): Promise<{ text: string; samples: Sample[] }> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const response = await fetch(metricsUrl);
    assert.equal(response.status, 200);
    const text = await response.text();
    const samples = parseSamples(text);
    if (ready(samples)) return { text, samples };
    if (Date.now() > deadline) assert.fail(`${what} not on ${metricsUrl} after 15 s:\n${text.slice(0, 3000)}`);
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function readManifest(plan: string, backupId: string): Manifest {
  return JSON.parse(readFileSync(path.join(folder, plan, backupId, 'manifest.json'), 'utf8')) as Manifest;
}

const fastRetries = { opaSnapshot: { retry: { initialInterval: '200ms', maximumInterval: '200ms', maximumAttempts: 2 } } };

test('backup metrics of a complete backup', async () => {
  const plan: Plan = {
    name: 'metrics',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'edge', url: opa.url }] },
  };
  const windowStart = Date.now() / 1000;
  const result = await stack.backup(plan);
  const windowEnd = Date.now() / 1000;
  assert.equal(result.status, 'complete');
  const manifest = readManifest(plan.name, result.backupId);
  const labels = { plan: 'metrics', kind: 'opa', source: 'edge' };

  const { text, samples } = await scrapeUntil(
    (current) => valueOf(current, 'opa_backup_last_success_timestamp_seconds', labels) !== undefined,
    'opa_backup_last_success_timestamp_seconds',
  );
  const lastSuccess = valueOf(samples, 'opa_backup_last_success_timestamp_seconds', labels)!;
  assert.ok(lastSuccess >= windowStart, `last success ${lastSuccess} before the backup started at ${windowStart}`);
  assert.ok(lastSuccess <= windowEnd, `last success ${lastSuccess} after the backup returned at ${windowEnd}`);
  assert.equal(lastSuccess, Date.parse(manifest.completedAt) / 1000);
  assert.equal(valueOf(samples, 'opa_backup_artifact_bytes', labels), manifest.artifacts[0].size);
  assert.equal(valueOf(samples, 'opa_backup_last_status', { plan: 'metrics', status: 'complete' }), 1);
  assert.equal(valueOf(samples, 'opa_backup_last_status', { plan: 'metrics', status: 'partial' }), 0);
  assert.equal(valueOf(samples, 'opa_backup_step_duration_seconds_count', labels), 1);
  const age = valueOf(samples, 'opa_backup_age_seconds', labels);
  assert.ok(age !== undefined, 'no opa_backup_age_seconds sample');
  assert.ok(age >= 0, `backup age ${age}`);
  assert.ok(age < 60, `backup age ${age}`);
  assert.equal(valueOf(samples, 'opa_backup_step_failures_total', labels), undefined);

  // The Temporal SDK's own worker metrics share the endpoint.
  assert.match(text, /^temporal_worker_task_slots_available\{/m);
  assert.match(text, /^temporal_activity_execution_latency_count\{/m);
});

test('failure counter of a partial backup', async () => {
  const deadPort = await freePort();
  const plan: Plan = {
    name: 'metrics-partial',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: {
      opa: [
        { name: 'up', url: opa.url },
        { name: 'down', url: `http://127.0.0.1:${deadPort}` },
      ],
    },
    settings: fastRetries,
  };
  const first = await stack.backup(plan);
  assert.equal(first.status, 'partial');
  const down = { plan: 'metrics-partial', kind: 'opa', source: 'down' };
  const up = { plan: 'metrics-partial', kind: 'opa', source: 'up' };
  let scraped = await scrapeUntil((samples) => valueOf(samples, 'opa_backup_step_failures_total', down) === 1, 'one failure of source down');
  assert.equal(valueOf(scraped.samples, 'opa_backup_last_status', { plan: 'metrics-partial', status: 'partial' }), 1);
  assert.equal(valueOf(scraped.samples, 'opa_backup_last_status', { plan: 'metrics-partial', status: 'complete' }), 0);
  assert.equal(valueOf(scraped.samples, 'opa_backup_last_success_timestamp_seconds', down), undefined);
  assert.equal(valueOf(scraped.samples, 'opa_backup_artifact_bytes', up), readManifest(plan.name, first.backupId).artifacts[0].size);

  // The counter adds up across backups.
  const second = await stack.backup(plan);
  assert.equal(second.status, 'partial');
  scraped = await scrapeUntil((samples) => valueOf(samples, 'opa_backup_step_failures_total', down) === 2, 'two failures of source down');
  assert.equal(valueOf(scraped.samples, 'opa_backup_step_failures_total', up), undefined);
  assert.equal(valueOf(scraped.samples, 'opa_backup_last_success_timestamp_seconds', up), Date.parse(readManifest(plan.name, second.backupId).completedAt) / 1000);
});

test('status metric of a backup where every source failed', async () => {
  const deadPort = await freePort();
  const plan: Plan = {
    name: 'metrics-failed',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'gone', url: `http://127.0.0.1:${deadPort}` }] },
    settings: fastRetries,
  };
  await assert.rejects(stack.backup(plan, `metrics-failed-${randomBytes(4).toString('hex')}`), WorkflowFailedError);
  const { samples } = await scrapeUntil(
    (current) => valueOf(current, 'opa_backup_last_status', { plan: 'metrics-failed', status: 'failed' }) === 1,
    'status failed of plan metrics-failed',
  );
  assert.equal(valueOf(samples, 'opa_backup_step_failures_total', { plan: 'metrics-failed', kind: 'opa', source: 'gone' }), 1);
  assert.equal(valueOf(samples, 'opa_backup_last_status', { plan: 'metrics-failed', status: 'complete' }), 0);
});

test('drill metrics of recordDrillMetrics', async () => {
  // The activity records into the runtime of the process it runs in, so
  // this test installs one here, as worker/main.ts does.
  const port = await freePort();
  Runtime.install({ telemetryOptions: { metrics: metricsTelemetryOptions({ OPA_BACKUP_METRICS_ADDRESS: `127.0.0.1:${port}` }) } });
  startProjectMetrics();
  const url = `http://127.0.0.1:${port}/metrics`;

  await recordDrillMetrics({ plan: 'drilled', backupId: '20261204T194512Z-3f9a1c2b', outcome: 'passed', completedAt: '2026-12-04T20:00:00.000Z', rtoSeconds: 42.5 });
  await recordDrillMetrics({ plan: 'drilled', backupId: '20261204T194512Z-3f9a1c2b', outcome: 'failed', completedAt: '2026-12-04T21:00:00.000Z' });

  const deadline = Date.now() + 15_000;
  let samples: Sample[] = [];
  while (valueOf(samples, 'opa_backup_drills_total', { plan: 'drilled', outcome: 'failed' }) === undefined) {
    if (Date.now() > deadline) assert.fail(`drill metrics not on ${url} after 15 s`);
    await new Promise((resolve) => setTimeout(resolve, 250));
    samples = parseSamples(await (await fetch(url)).text());
  }
  assert.equal(valueOf(samples, 'opa_backup_drills_total', { plan: 'drilled', outcome: 'passed' }), 1);
  // A failed drill leaves the time and recovery time of the last passed one.
  assert.equal(valueOf(samples, 'opa_backup_last_drill_success_timestamp_seconds', { plan: 'drilled' }), Date.parse('2026-12-04T20:00:00.000Z') / 1000);
  assert.equal(valueOf(samples, 'opa_backup_drill_rto_seconds', { plan: 'drilled' }), 42.5);
});

test('a restore drill records its metrics on the worker', async () => {
  const plan: Plan = {
    name: 'metrics-drilled',
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources: { opa: [{ name: 'edge', url: opa.url, probes: [{ path: 'authz/allow', input: { user: 'alice' } }] }] },
  };
  const backup = await stack.backup(plan);
  const drill = (await stack.client.workflow.execute('restoreDrillWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `metrics-drill-${randomBytes(4).toString('hex')}`,
    args: [{ plan, backup: backup.backupId }],
  })) as { outcome: string; rtoSeconds?: number };
  assert.equal(drill.outcome, 'passed');
  const { samples } = await scrapeUntil(
    (current) => valueOf(current, 'opa_backup_drills_total', { plan: 'metrics-drilled', outcome: 'passed' }) === 1,
    'the drill counter',
  );
  assert.ok((valueOf(samples, 'opa_backup_last_drill_success_timestamp_seconds', { plan: 'metrics-drilled' }) ?? 0) > Date.now() / 1000 - 300);
  assert.equal(valueOf(samples, 'opa_backup_drill_rto_seconds', { plan: 'metrics-drilled' }), drill.rtoSeconds);
});
