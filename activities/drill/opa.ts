// The OPA part of a restore drill. It extracts the bundle safely and starts a
// fresh `opa run --server` with it on a loopback port. Then it compares that
// OPA's policies, base documents and decisions with the manifest's records.
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { connectOpa, opaJson } from '../opa/client';
import { recordProbe, snapshotOpa } from '../opa/snapshot';
import type { OpaFacts, RecordedProbe } from '../../common/manifest';
import { CheckFailure, notRun, runCheck } from './checks';
import { startTracked, type DrillProcess, type Scratch } from './scratch';
import { extractTarGz, UnsafeArchiveError, type ExtractLimits } from './tar';
import { findTool, freeLoopbackPort, sleep } from './tools';
import type { CheckResult } from './types';

export const OPA_CHECKS = ['opa-bundle', 'opa-policies', 'opa-data', 'opa-probes'];

/** Time OPA gets to load a bundle and return 200 on GET /health. */
const OPA_READY_TIMEOUT_MS = 60_000;
const START_ATTEMPTS = 3;

/** Returns the extraction limits: env OPA_BACKUP_DRILL_MAX_BUNDLE_BYTES and OPA_BACKUP_DRILL_MAX_BUNDLE_ENTRIES, or 4 GiB and 100,000. */
export function bundleLimits(environment: NodeJS.ProcessEnv = process.env): ExtractLimits {
  const read = (name: string, fallback: number): number => {
    const text = environment[name];
    if (text === undefined || text === '') return fallback;
    const value = Number(text);
    if (!Number.isSafeInteger(value) || value <= 0) throw new Error(`invalid ${name} "${text}": expected a positive whole number`);
    return value;
  };
  return {
    maxBytes: read('OPA_BACKUP_DRILL_MAX_BUNDLE_BYTES', 4 * 1024 ** 3),
    maxEntries: read('OPA_BACKUP_DRILL_MAX_BUNDLE_ENTRIES', 100_000),
  };
}

async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

const sha256Text = (text: string): string => createHash('sha256').update(text).digest('hex');

interface RestoredOpa {
  url: string;
  process: DrillProcess;
}

/**
 * Starts `opa run --server` with `extraArgs` (the bundle and its flags) on a
 * free loopback port, registered in the drill's scratch registry, and waits
 * for GET /health. Returns undefined and OPA's output when OPA exits before
 * it is healthy for a reason other than a port taken in the meantime.
 */
export async function startDrillOpa(
  scratch: Scratch,
  extraArgs: string[],
  workDirectory: string,
  signal?: AbortSignal,
): Promise<{ opa?: RestoredOpa; output: string }> {
  const opaBinary = findTool('opa');
  for (let attempt = 1; ; attempt++) {
    const port = await freeLoopbackPort();
    const args = ['run', '--server', '--addr', `127.0.0.1:${port}`, '--log-level', 'error', ...extraArgs];
    const started = await startTracked(scratch, opaBinary, args, path.join(workDirectory, `opa-${attempt}.log`), { cwd: workDirectory });
    const url = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + OPA_READY_TIMEOUT_MS;
    try {
      for (;;) {
        if (started.child.exitCode !== null || started.child.signalCode !== null) {
          const output = started.logTail();
          await started.stop();
          if (/address already in use/i.test(output) && attempt < START_ATTEMPTS) break;
          return { output };
        }
        try {
          const response = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2_000) });
          if (response.ok) return { opa: { url, process: started }, output: '' };
        } catch {
          // Not listening yet.
        }
        if (Date.now() > deadline) throw new Error(`the drill's OPA at ${url} was not healthy within ${OPA_READY_TIMEOUT_MS} ms: ${started.logTail()}`);
        await sleep(50, signal);
      }
    } catch (error) {
      await started.stop('SIGKILL');
      throw error;
    }
  }
}

/** Starts the restored OPA with the snapshot bundle, in the bundle's Rego version. */
function startRestoredOpa(
  scratch: Scratch,
  bundleFile: string,
  regoVersion: number,
  workDirectory: string,
  signal?: AbortSignal,
): Promise<{ opa?: RestoredOpa; output: string }> {
  return startDrillOpa(scratch, [...(regoVersion === 0 ? ['--v0-compatible'] : []), '--bundle', bundleFile], workDirectory, signal);
}

function decisionText(probe: RecordedProbe): string {
  if (probe.errorCodes) return `status ${probe.status}, error codes ${probe.errorCodes.join(', ')}`;
  if (probe.undefinedResult) return `status ${probe.status}, undefined result`;
  const result = probe.resultJson ?? '';
  return `status ${probe.status}, result ${result.length > 200 ? `${result.slice(0, 200)}…` : result}`;
}

function sameDecision(recorded: RecordedProbe, restored: RecordedProbe): boolean {
  return (
    recorded.status === restored.status &&
    recorded.resultJson === restored.resultJson &&
    (recorded.undefinedResult ?? false) === (restored.undefinedResult ?? false) &&
    JSON.stringify(recorded.errorCodes ?? null) === JSON.stringify(restored.errorCodes ?? null)
  );
}

export interface OpaDrillOptions {
  scratch: Scratch;
  /** Verified local copy of the bundle. */
  bundleFile: string;
  /** Key of the artifact, the object of every check. */
  key: string;
  facts: OpaFacts;
  limits?: ExtractLimits;
  signal?: AbortSignal;
  /** Called between checks, for heartbeats. */
  onCheck?: (result: CheckResult) => void;
}

/**
 * Runs the four OPA checks of one bundle and returns their results:
 * opa-bundle (extracts safely and loads into OPA), opa-policies, opa-data and
 * opa-probes. The OPA it starts and the extracted files are removed before it
 * returns, also when it fails or the signal aborts.
 */
export async function drillOpaBundle(options: OpaDrillOptions): Promise<CheckResult[]> {
  const { scratch, key, facts, signal } = options;
  const workDirectory = path.join(scratch.directory, `opa-${createHash('sha256').update(key).digest('hex').slice(0, 12)}`);
  await rm(workDirectory, { recursive: true, force: true });
  const extracted = path.join(workDirectory, 'bundle');
  await mkdir(extracted, { recursive: true });
  const results: CheckResult[] = [];
  const record = (result: CheckResult): CheckResult => {
    results.push(result);
    options.onCheck?.(result);
    return result;
  };
  let restored: RestoredOpa | undefined;

  try {
    let bundleManifest: Record<string, unknown> = {};
    const bundle = record(
      await runCheck('opa-bundle', key, async () => {
        let entries;
        try {
          entries = await extractTarGz(createReadStream(options.bundleFile), extracted, options.limits ?? bundleLimits(), signal);
        } catch (error) {
          if (error instanceof UnsafeArchiveError) throw new CheckFailure(`the bundle was rejected: ${error.message}`);
          throw error;
        }
        const manifestFile = path.join(extracted, '.manifest');
        if (!existsSync(manifestFile)) throw new CheckFailure('the bundle has no .manifest file');
        try {
          bundleManifest = JSON.parse(await readFile(manifestFile, 'utf8')) as Record<string, unknown>;
        } catch (error) {
          throw new CheckFailure(`the bundle's .manifest is not valid JSON: ${(error as Error).message}`);
        }
        const bundleRego = bundleManifest.rego_version ?? 1;
        if (bundleRego !== facts.regoVersion) {
          throw new CheckFailure(`the bundle's .manifest has rego_version ${JSON.stringify(bundleRego)}, the manifest records ${facts.regoVersion}`);
        }
        const { opa, output } = await startRestoredOpa(scratch, options.bundleFile, facts.regoVersion, workDirectory, signal);
        if (!opa) throw new CheckFailure(`OPA did not load the bundle: ${output}`);
        restored = opa;
        const files = entries.filter((entry) => entry.type === 'file').length;
        return `extracted ${files} files safely; OPA loaded the bundle${facts.regoVersion === 0 ? ' with --v0-compatible' : ''}`;
      }),
    );
    if (bundle.outcome === 'failed' || !restored) {
      for (const result of notRun(OPA_CHECKS.slice(1), key, 'the bundle did not load')) record(result);
      return results;
    }
    const connection = connectOpa({ name: `restored ${key}`, url: restored.url }, 0, 120_000);

    record(
      await runCheck('opa-policies', key, async () => {
        const problems: string[] = [];
        const policyIds = ((bundleManifest.metadata as { opa_backup?: { policy_ids?: Record<string, string> } } | undefined)?.opa_backup
          ?.policy_ids ?? {}) as Record<string, string>;
        const { body } = await opaJson<{ result?: Array<{ id: string; raw: string }> }>(connection, 'GET', 'v1/policies', { signal });
        const modules = body.result ?? [];
        const matched = new Set<string>();
        for (const policy of facts.policies) {
          const file = path.join(extracted, ...policy.file.split('/'));
          if (!existsSync(file)) {
            problems.push(`policy ${JSON.stringify(policy.id)} (${policy.file}) is missing from the bundle`);
            continue;
          }
          const fileSha256 = await sha256File(file);
          if (fileSha256 !== policy.sha256) problems.push(`policy ${JSON.stringify(policy.id)} (${policy.file}) has sha256 ${fileSha256}, the manifest records ${policy.sha256}`);
          if (policyIds[policy.file] !== policy.id) {
            problems.push(`the bundle's .manifest maps ${policy.file} to policy id ${JSON.stringify(policyIds[policy.file])}, the manifest records ${JSON.stringify(policy.id)}`);
          }
          const loaded = modules.find((module) => module.id.endsWith(`/${policy.file}`));
          if (!loaded) problems.push(`the restored OPA has no module for ${policy.file} (policy ${JSON.stringify(policy.id)})`);
          else {
            matched.add(loaded.id);
            if (sha256Text(loaded.raw) !== policy.sha256) problems.push(`the restored OPA's module ${loaded.id} differs from policy ${JSON.stringify(policy.id)}`);
          }
        }
        for (const module of modules) {
          if (!matched.has(module.id)) problems.push(`the restored OPA has module ${module.id}, which the manifest does not list`);
        }
        if (problems.length > 0) throw new CheckFailure(problems.join('; '));
        return `${facts.policies.length} ${facts.policies.length === 1 ? 'policy matches its' : 'policies match their'} recorded sha256 in the bundle and in the restored OPA`;
      }),
    );

    record(
      await runCheck('opa-data', key, async () => {
        const problems: string[] = [];
        const dataFile = path.join(extracted, 'data.json');
        const bundleSha256 = existsSync(dataFile) ? await sha256File(dataFile) : undefined;
        if (bundleSha256 === undefined) problems.push('the bundle has no data.json');
        else if (bundleSha256 !== facts.dataSha256) {
          problems.push(`data.json in the bundle has sha256 ${bundleSha256}, the manifest records ${facts.dataSha256}: the base documents differ from the backup`);
        }
        // Read the restored OPA the way the backup read the live one, so its
        // base documents come back byte for byte in the same order.
        const restoredData = path.join(workDirectory, 'restored-data.json');
        const snapshot = await snapshotOpa(connection, { probes: [], dataFile: restoredData, signal });
        const restoredSha256 = await sha256File(restoredData);
        if (restoredSha256 !== facts.dataSha256) {
          problems.push(`the restored OPA's base documents have sha256 ${restoredSha256}, the manifest records ${facts.dataSha256}`);
        }
        const recordedRules = JSON.stringify([...facts.rulePaths].sort());
        const restoredRules = JSON.stringify([...snapshot.rulePaths].sort());
        if (recordedRules !== restoredRules) {
          problems.push(`the restored OPA's rule paths ${restoredRules} differ from the recorded ${recordedRules}`);
        }
        if (problems.length > 0) throw new CheckFailure(problems.join('; '));
        return `base documents (${snapshot.dataBytes} bytes, rule paths excluded) match sha256 ${facts.dataSha256}`;
      }),
    );

    record(
      await runCheck('opa-probes', key, async () => {
        const problems: string[] = [];
        for (const [index, probe] of facts.probes.entries()) {
          const decision = await recordProbe(connection, probe, signal);
          if (!sameDecision(probe, decision)) {
            problems.push(`probe ${index + 1} (${probe.path}) decided ${decisionText(decision)}; recorded ${decisionText(probe)}`);
          }
        }
        if (problems.length > 0) throw new CheckFailure(`${problems.length} of ${facts.probes.length} probes differ: ${problems.join('; ')}`);
        return `${facts.probes.length} probes decide as recorded`;
      }),
    );
    return results;
  } finally {
    await (restored as RestoredOpa | undefined)?.process.stop();
    await rm(workDirectory, { recursive: true, force: true });
  }
}
