// Benchmark of restore drills on the demo plan (examples/demo, the OPA that
// scripts/demo.sh backs up, with the same three probes). It starts a Temporal
// dev server, a worker and the demo OPA on loopback ports, takes one backup,
// and then times, in turn:
//
//   - a full drill: restoreDrillWorkflow from start to result, as the client
//     sees it (resolve, fetch and verify, OPA restore and checks, report,
//     cleanup);
//   - the OPA step alone: drillOpaBundle in this process on the verified
//     bundle (extract, start OPA, compare policies, data and probes, stop).
//
//   npx tsc -p . && node dist/bench/drill.js [--runs 5]
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { drillOpaBundle } from '../activities/drill/opa';
import { openScratch, removeScratch } from '../activities/drill/scratch';
import type { DrillWorkflowResult } from '../activities/drill/types';
import type { Manifest, OpaFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startOpa } from '../test/harness/opa';
import { startStack } from '../test/harness/stack';
import { repositoryRoot, toolsBin } from '../test/harness/tools';

/** Targets: a full drill of the demo plan, and its OPA step alone, in seconds. */
const FULL_DRILL_TARGET_SECONDS = 10;
const OPA_STEP_TARGET_SECONDS = 2;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' } } });
  const runs = Number(values.runs);
  process.env.PATH = `${toolsBin}:${process.env.PATH}`;
  const folder = mkdtempSync(path.join(tmpdir(), 'opa-backup-bench-drill-'));
  const drillRoot = path.join(folder, 'scratch');
  process.env.OPA_BACKUP_DRILL_DIR = drillRoot;

  const stack = await startStack('bench-drill', { PATH: process.env.PATH, OPA_BACKUP_DRILL_DIR: drillRoot });
  const opa = await startOpa('bench-drill-opa', { args: [path.join(repositoryRoot, 'examples', 'demo')] });
  try {
    const plan: Plan = {
      name: 'demo',
      destination: { local: { path: folder } },
      encryption: { unencrypted: true },
      sources: {
        opa: [
          {
            name: 'sample-opa',
            url: opa.url,
            probes: [
              { path: 'app/authz/allow', input: { user: 'bob', action: 'read', resource: '/reports/q3' } },
              { path: 'app/authz/allow', input: { user: 'bob', action: 'delete', resource: '/reports/q3' } },
              { path: 'app/authz/reasons', input: { user: 'mallory', action: 'read', resource: '/x' } },
            ],
          },
        ],
      },
    };
    const backup = await stack.backup(plan);
    console.log(`backup ${backup.backupId}: ${backup.artifacts.map((artifact) => `${artifact.key} ${artifact.size} bytes`).join(', ')}`);
    const load = [loadavg()[0]];

    const fullSeconds: number[] = [];
    const rtoSeconds: number[] = [];
    for (let run = 0; run < runs; run++) {
      const started = performance.now();
      const result: DrillWorkflowResult = await stack.client.workflow.execute('restoreDrillWorkflow', {
        taskQueue: stack.taskQueue,
        workflowId: `bench-drill-${randomBytes(4).toString('hex')}`,
        args: [{ plan, backup: backup.backupId }],
      });
      fullSeconds.push((performance.now() - started) / 1000);
      if (result.outcome !== 'passed') throw new Error(`the drill failed: ${JSON.stringify(result.checks)}`);
      rtoSeconds.push(result.rtoSeconds ?? NaN);
    }

    const manifest = JSON.parse(readFileSync(path.join(folder, backup.manifestKey), 'utf8')) as Manifest;
    const record = manifest.artifacts[0];
    const bundleFile = path.join(folder, plan.name, backup.backupId, record.key);
    const opaSeconds: number[] = [];
    for (let run = 0; run < runs; run++) {
      const drillId = `bench-opa-${run}`;
      const scratch = await openScratch(drillId);
      const started = performance.now();
      const results = await drillOpaBundle({ scratch, bundleFile, key: record.key, facts: record.facts as OpaFacts });
      opaSeconds.push((performance.now() - started) / 1000);
      await removeScratch(drillId);
      if (results.some((result) => result.outcome !== 'passed')) throw new Error(`the OPA step failed: ${JSON.stringify(results)}`);
    }
    load.push(loadavg()[0]);

    const verdict = (value: number, target: number): string => `${value.toFixed(3)} s (target < ${target} s): ${value < target ? 'PASS' : 'FAIL'}`;
    console.log(`runs: ${runs}; 1-minute load average ${load[0].toFixed(2)} before, ${load[1].toFixed(2)} after`);
    console.log('| measure | value |');
    console.log('| --- | --- |');
    console.log(`| full drill, median | ${verdict(median(fullSeconds), FULL_DRILL_TARGET_SECONDS)} |`);
    console.log(`| full drill, min / max | ${Math.min(...fullSeconds).toFixed(3)} s / ${Math.max(...fullSeconds).toFixed(3)} s |`);
    console.log(`| rtoSeconds in the report, median | ${median(rtoSeconds).toFixed(3)} s |`);
    console.log(`| OPA step alone, median | ${verdict(median(opaSeconds), OPA_STEP_TARGET_SECONDS)} |`);
    console.log(`| OPA step alone, min / max | ${Math.min(...opaSeconds).toFixed(3)} s / ${Math.max(...opaSeconds).toFixed(3)} s |`);
  } finally {
    await opa.stop();
    await stack.stop();
    rmSync(folder, { recursive: true, force: true });
  }
}

main().catch((error: unknown) => {
  console.error((error as Error).stack ?? String(error));
  process.exitCode = 1;
});
