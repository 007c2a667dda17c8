// Every OPA case under test/cases/opa: load it into a live OPA, back it up
// through Temporal, restore the bundle into a fresh `opa run --bundle`, and
// compare policy texts, base documents and probe decisions.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { parse as parseLossless } from 'lossless-json';
import { connectOpa } from '../activities/opa/client';
import { recordProbe, snapshotOpa } from '../activities/opa/snapshot';
import type { Plan, Probe } from '../common/plan';
import type { RecordedProbe } from '../common/manifest';
import { readBundle } from './harness/bundle';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { repositoryRoot } from './harness/tools';

const casesDirectory = path.join(repositoryRoot, 'test', 'cases', 'opa');
const caseNames = readdirSync(casesDirectory, { withFileTypes: true })
  .filter((entry) => entry.isDirectory())
  .map((entry) => entry.name)
  .sort();

let stack: Stack;
let counter: { url: string; requests: number; close(): void };

before(async () => {
  stack = await startStack('opa-cases');
  let requests = 0;
  const server = http.createServer((_request, response) => {
    requests++;
    response.end('{"profile":"fetched"}');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  counter = {
    url: `http://127.0.0.1:${port}/profile`,
    get requests() {
      return requests;
    },
    set requests(value: number) {
      requests = value;
    },
    close: () => server.close(),
  };
});

after(async () => {
  counter?.close();
  await stack?.stop();
});

interface LoadedCase {
  probes: Probe[];
  data: string;
  flags: string[];
}

async function loadCase(name: string, opa: OpaServer): Promise<LoadedCase> {
  const directory = path.join(casesDirectory, name);
  const idFile = path.join(directory, 'policy-id');
  const explicitId = existsSync(idFile) ? readFileSync(idFile, 'utf8').trim() : undefined;
  for (const file of readdirSync(directory).filter((entry) => entry.endsWith('.rego'))) {
    await opa.putPolicy(explicitId ?? file, readFileSync(path.join(directory, file), 'utf8'));
  }
  const dataFile = path.join(directory, 'data.json');
  const data = existsSync(dataFile) ? readFileSync(dataFile, 'utf8') : '{}';
  if (existsSync(dataFile)) await opa.putData('', data);
  const probesFile = path.join(directory, 'probes.json');
  const probes = existsSync(probesFile) ? (JSON.parse(readFileSync(probesFile, 'utf8')) as Probe[]) : [];
  return { probes, data, flags: [] };
}

function caseFlags(name: string): string[] {
  const file = path.join(casesDirectory, name, 'opa-flags');
  return existsSync(file) ? readFileSync(file, 'utf8').trim().split(/\s+/) : [];
}

async function livePolicies(url: string): Promise<Map<string, string>> {
  const response = await fetch(`${url}/v1/policies`);
  const body = (await response.json()) as { result: Array<{ id: string; raw: string }> };
  return new Map(body.result.map((module) => [module.id, module.raw]));
}

function decisionOf(probe: RecordedProbe): unknown {
  return {
    status: probe.status,
    result: probe.resultJson,
    undefinedResult: probe.undefinedResult ?? false,
    errorCodes: probe.errorCodes,
  };
}

for (const name of caseNames) {
  test(`case ${name} backs up and restores`, async () => {
    const flags = caseFlags(name);
    const live = await startOpa(`case-${name}-live`, { args: flags, env: { COUNTER_URL: counter.url } });
    const folder = mkdtempSync(path.join(runsDirectory, `case-${name}-`));
    let restored: OpaServer | undefined;
    try {
      const loaded = await loadCase(name, live);
      const plan: Plan = {
        name: `case-${name}`,
        destination: { local: { path: folder } },
        encryption: { unencrypted: true },
        sources: { opa: [{ name: 'live', url: live.url, probes: loaded.probes }] },
      };

      counter.requests = 0;
      const result = await stack.backup(plan);
      assert.equal(counter.requests, 0, 'the snapshot evaluated a rule that calls http.send');
      assert.equal(result.status, 'complete');
      assert.deepEqual(result.failures, []);

      const bundlePath = path.join(folder, plan.name, result.backupId, 'opa', 'live.tar.gz');
      const manifest = JSON.parse(readFileSync(path.join(folder, result.manifestKey), 'utf8'));
      const recorded = manifest.artifacts[0].facts.probes as RecordedProbe[];
      const bundle = await readBundle(bundlePath);
      assert.equal(bundle.manifest.rego_version, flags.includes('--v0-compatible') ? 0 : 1);

      // Policy texts: each bundle file contains the live module of the id it maps to.
      const policies = await livePolicies(live.url);
      const fileToId = (bundle.manifest.metadata as { opa_backup: { policy_ids: Record<string, string> } }).opa_backup.policy_ids;
      assert.deepEqual(new Set(Object.values(fileToId)), new Set(policies.keys()));
      for (const [file, id] of Object.entries(fileToId)) {
        assert.equal(bundle.files.get(file)?.toString('utf8'), policies.get(id), `policy ${id} differs in ${file}`);
      }

      // Base documents: the bundle's data.json is the case's data, number for number.
      assert.deepEqual(parseLossless(bundle.data), parseLossless(loaded.data));

      // Probes recorded at backup time are what the live OPA decides now.
      assert.equal(recorded.length, loaded.probes.length);
      const liveConnection = connectOpa({ name: 'live', url: live.url }, 0);
      for (const probe of recorded) {
        assert.deepEqual(decisionOf(await recordProbe(liveConnection, probe)), decisionOf(probe), `live probe ${probe.path}`);
      }

      // Restore into a fresh OPA 1.x, without the source's flags.
      restored = await startOpa(`case-${name}-restored`, { args: ['--bundle', bundlePath] });
      const restoredPolicies = await livePolicies(restored.url);
      assert.deepEqual([...restoredPolicies.values()].sort(), [...policies.values()].sort());

      const connection = connectOpa({ name: 'restored', url: restored.url }, 0);
      const restoredData = path.join(folder, 'restored-data.json');
      await snapshotOpa(connection, { probes: [], dataFile: restoredData });
      assert.equal(readFileSync(restoredData, 'utf8'), bundle.data, 'restored base documents differ from the backup');

      counter.requests = 0;
      for (const probe of recorded) {
        assert.deepEqual(decisionOf(await recordProbe(connection, probe)), decisionOf(probe), `restored probe ${probe.path}`);
      }

      // A second backup of the unchanged OPA stores the same data and policy files.
      const again = await stack.backup(plan);
      assert.notEqual(again.backupId, result.backupId);
      const secondManifest = JSON.parse(readFileSync(path.join(folder, again.manifestKey), 'utf8'));
      assert.equal(secondManifest.artifacts[0].facts.dataSha256, manifest.artifacts[0].facts.dataSha256);
      assert.deepEqual(secondManifest.artifacts[0].facts.policies, manifest.artifacts[0].facts.policies);
    } finally {
      await live.stop();
      await restored?.stop();
      rmSync(folder, { recursive: true, force: true });
    }
  });
}
