// The files a user starts the compose demo from: docker-compose.yml, the
// Dockerfile and examples/compose-plan.yaml. No container engine runs
// here, so these tests check what can be checked without one: the plan
// loads, its probe is defined by the mounted policy, the mounted paths
// exist, and the image tags match the versions the tests run.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parse } from 'yaml';
import { loadPlanFile } from '../activities/plan-loader';
import { repositoryRoot, tool } from './harness/tools';

interface ComposeService {
  image?: string;
  build?: string;
  volumes?: string[];
  environment?: Record<string, string>;
}

const compose = parse(readFileSync(path.join(repositoryRoot, 'docker-compose.yml'), 'utf8')) as { services: Record<string, ComposeService> };
const setupScript = readFileSync(path.join(repositoryRoot, 'scripts', 'setup.sh'), 'utf8');

function setupVersion(name: string): string {
  const match = new RegExp(`^${name}=(\\S+)$`, 'm').exec(setupScript);
  assert.ok(match, `scripts/setup.sh sets no ${name}`);
  return match[1];
}

test('compose plan probe is defined', () => {
  const plan = loadPlanFile(path.join(repositoryRoot, 'examples', 'compose-plan.yaml'));
  assert.equal(plan.destination.s3?.endpoint, 'http://minio:9000');
  assert.ok(compose.services.minio, 'the plan writes to the minio service');
  assert.ok(compose.services.opa, 'the plan backs up the opa service');

  const probe = plan.sources.opa![0].probes![0];
  const query = `data.${probe.path.replace(/\//g, '.')}`;
  const output = execFileSync(tool('opa'), ['eval', '--format', 'json', '--data', path.join(repositoryRoot, 'examples', 'demo'), '--stdin-input', query], {
    input: JSON.stringify(probe.input),
    encoding: 'utf8',
  });
  const result = JSON.parse(output) as { result?: Array<{ expressions: Array<{ value: unknown }> }> };
  assert.equal(typeof result.result?.[0]?.expressions[0]?.value, 'boolean', `probe ${probe.path} is undefined: ${output}`);
});

test('compose paths exist', () => {
  for (const [name, service] of Object.entries(compose.services)) {
    for (const volume of service.volumes ?? []) {
      const source = volume.split(':')[0];
      if (!source.startsWith('.')) continue;
      assert.ok(existsSync(path.join(repositoryRoot, source)), `service ${name} mounts ${source}, which does not exist`);
    }
    if (service.build) assert.ok(existsSync(path.join(repositoryRoot, service.build, 'Dockerfile')), `service ${name} builds without a Dockerfile`);
  }
  const worker = compose.services.worker.environment ?? {};
  for (const variable of ['TEMPORAL_ADDRESS', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION']) {
    assert.ok(worker[variable], `the worker service sets no ${variable}`);
  }
});

test('compose images match tested versions', () => {
  const opaVersion = setupVersion('OPA_VERSION');
  const temporalVersion = setupVersion('TEMPORAL_CLI_VERSION');
  assert.equal(compose.services.opa.image, `openpolicyagent/opa:${opaVersion}`);
  assert.equal(compose.services.temporal.image, `temporalio/temporal:${temporalVersion}`);
  const dockerfile = readFileSync(path.join(repositoryRoot, 'Dockerfile'), 'utf8');
  assert.match(dockerfile, new RegExp(`^ARG OPA_IMAGE=openpolicyagent/opa:${opaVersion.replace(/\./g, '\\.')}-static$`, 'm'));
});
