// The backup starts from the `temporal` CLI too, with the workflow input as
// JSON: a plan file the worker reads.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot, tool } from './harness/tools';

let stack: Stack;
let opa: OpaServer;
let folder: string;

before(async () => {
  stack = await startStack('temporal-cli');
  opa = await startOpa('temporal-cli-opa');
  const rbac = path.join(repositoryRoot, 'test', 'cases', 'opa', 'rbac-basic');
  await opa.putPolicy('authz.rego', readFileSync(path.join(rbac, 'authz.rego'), 'utf8'));
  await opa.putData('', readFileSync(path.join(rbac, 'data.json'), 'utf8'));
  folder = mkdtempSync(path.join(runsDirectory, 'temporal-cli-'));
});

after(async () => {
  await opa?.stop();
  await stack?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function temporal(args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(tool('temporal'), [...args, '--address', stack.temporal.address], { encoding: 'utf8', timeout: 120_000 });
}

test('temporal workflow execute runs a backup from a plan file', () => {
  const planFile = path.join(folder, 'plan.yaml');
  writeFileSync(
    planFile,
    ['name: from-cli', 'destination:', '  local: { path: ./backups }', 'encryption: { unencrypted: true }', 'sources:', '  opa:', `    - { name: edge-1, url: "${opa.url}" }`].join('\n'),
  );
  const run = temporal([
    'workflow',
    'execute',
    '--type',
    'backupWorkflow',
    '--task-queue',
    stack.taskQueue,
    '--workflow-id',
    'backup-from-cli',
    '--input',
    JSON.stringify({ planFile }),
    '--output',
    'json',
  ]);
  assert.equal(run.status, 0, run.stderr);
  const output = JSON.parse(run.stdout) as { result: { status: string; manifestKey: string } };
  assert.equal(output.result.status, 'complete');
  assert.ok(existsSync(path.join(folder, 'backups', output.result.manifestKey)));
});

test('temporal workflow execute with a relative plan file names the fix', () => {
  const run = temporal([
    'workflow',
    'execute',
    '--type',
    'backupWorkflow',
    '--task-queue',
    stack.taskQueue,
    '--workflow-id',
    'backup-relative-plan',
    '--input',
    JSON.stringify({ planFile: 'plan.yaml' }),
  ]);
  assert.notEqual(run.status, 0);
  assert.match(run.stdout + run.stderr, /planFile: "plan\.yaml" must be an absolute path that the worker can read/);
});

test('temporal workflow execute without input names the fields', () => {
  const run = temporal(['workflow', 'execute', '--type', 'backupWorkflow', '--task-queue', stack.taskQueue, '--workflow-id', 'backup-no-input']);
  assert.notEqual(run.status, 0);
  assert.match(run.stdout + run.stderr, /missing "plan" \(the plan document\) or "planFile"/);
});

test('temporal workflow execute with an invalid plan fails without retrying', () => {
  const planFile = path.join(folder, 'invalid.yaml');
  writeFileSync(planFile, 'name: Bad Name\n');
  const run = temporal([
    'workflow',
    'execute',
    '--type',
    'backupWorkflow',
    '--task-queue',
    stack.taskQueue,
    '--workflow-id',
    'backup-invalid-plan',
    '--input',
    JSON.stringify({ planFile }),
  ]);
  assert.notEqual(run.status, 0);
  assert.match(run.stdout + run.stderr, /name: must be 1 to 63 characters/);
});
