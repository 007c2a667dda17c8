// Activities of restoreDrillWorkflow: resolve the backup to drill, fetch and
// verify its artifacts, restore each source into an ephemeral server and
// compare it with the manifest, write the drill report, and clean up.
//
// A check that finds a difference is a result, not an error: the activity
// returns it as a failed check. Errors (a store or server that cannot be
// reached) fail the activity, and Temporal retries it.
import { Readable } from 'node:stream';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { backupIdTime, isBackupId, manifestKey } from '../../common/layout';
import type { ArtifactRecord, BundleFacts, GitFacts, OpaFacts, PostgresFacts, RedisFacts } from '../../common/manifest';
import type { Plan } from '../../common/plan';
import { heartbeatTimer } from '../backup';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { openReadStore, openWriteStore, type BlobStore } from '../storage';
import { ArtifactDigestError, findArtifact, localArtifact, readManifest } from './artifacts';
import { notRun } from './checks';
import { drillGitBundle, GIT_CHECKS } from './git';
import { drillOpaBundle, OPA_CHECKS } from './opa';
import { drillPostgresSource, type PostgresArtifact } from './postgres';
import { drillRedisArtifact } from './redis';
import { BUNDLE_ACTIVATION_CHECK, BUNDLE_DRIFT_CHECK, checkBundleActivation, checkBundleDrift, pairLoadedBundles, type LiveOpaBundles } from './served-bundle';
import { openScratch, removeScratch, type Scratch } from './scratch';
import type { CheckResult, DrillActivityInput, DrillReport, DrillStep, DrillTarget, DrillWorkflowInput } from './types';

/** Failure type when no backup matches the drill's `backup` input. */
export const BACKUP_NOT_FOUND = 'BackupNotFound';
const DEFAULT_RANDOM_WITHIN_DAYS = 7;

function notFound(message: string): ApplicationFailure {
  return ApplicationFailure.create({ type: BACKUP_NOT_FOUND, nonRetryable: true, message });
}

/** Lists the ids of the plan's backups that have a manifest, oldest first. */
async function committedBackups(store: BlobStore, plan: Plan): Promise<string[]> {
  const ids: string[] = [];
  for await (const backupId of store.listFolders(`${plan.name}/`)) {
    if (isBackupId(backupId) && (await store.stat(manifestKey(plan.name, backupId)))) ids.push(backupId);
  }
  return ids.sort();
}

/** Returns the live OPA snapshots of a manifest whose facts list loaded bundles, for the drift check of served bundles. */
function liveOpaBundles(artifacts: ArtifactRecord[]): LiveOpaBundles[] {
  return artifacts
    .filter((artifact) => artifact.kind === 'opa-bundle' && artifact.facts)
    .map((artifact) => ({ source: artifact.source, loadedBundles: (artifact.facts as OpaFacts).loadedBundles ?? {} }))
    .filter((opa) => Object.keys(opa.loadedBundles).length > 0);
}

/** Returns the checks of a served bundle: bundle-drift only when a live OPA of the backup had loaded a bundle that pairs with it. */
function servedBundleChecks(artifact: ArtifactRecord, artifacts: ArtifactRecord[]): Array<{ name: string; object: string }> {
  const checks = [{ name: BUNDLE_ACTIVATION_CHECK, object: artifact.key }];
  const served = artifacts.filter((entry) => entry.kind === 'bundle').length;
  if (pairLoadedBundles(artifact.source, served, liveOpaBundles(artifacts)).length > 0) checks.push({ name: BUNDLE_DRIFT_CHECK, object: artifact.key });
  return checks;
}

/** Lists the restore steps of a manifest: one per OPA bundle, PostgreSQL source, Redis artifact, served bundle and Git bundle. */
function planSteps(artifacts: ArtifactRecord[]): DrillStep[] {
  const steps: DrillStep[] = [];
  for (const artifact of artifacts) {
    if (artifact.kind === 'bundle') {
      steps.push({ kind: 'bundle', source: artifact.source, keys: [artifact.key], checks: servedBundleChecks(artifact, artifacts) });
    } else if (artifact.kind === 'git-bundle') {
      steps.push({ kind: 'git', source: artifact.source, keys: [artifact.key], checks: GIT_CHECKS.map((name) => ({ name, object: artifact.key })) });
    } else if (artifact.kind === 'opa-bundle') {
      steps.push({ kind: 'opa', source: artifact.source, keys: [artifact.key], checks: OPA_CHECKS.map((name) => ({ name, object: artifact.key })) });
    } else if (artifact.kind === 'redis-rdb' || artifact.kind === 'redis-keys') {
      steps.push({ kind: 'redis', source: artifact.source, keys: [artifact.key], checks: [{ name: 'redis-restore', object: artifact.key }] });
    }
  }
  const postgres = new Map<string, DrillStep>();
  for (const artifact of artifacts) {
    if (artifact.kind !== 'postgres-dump' && artifact.kind !== 'postgres-globals') continue;
    let step = postgres.get(artifact.source);
    if (!step) {
      step = { kind: 'postgres', source: artifact.source, keys: [], checks: [] };
      postgres.set(artifact.source, step);
      steps.push(step);
    }
    step.keys.push(artifact.key);
    // globals.sql loads first, because dumps refer to its roles.
    const check = { name: artifact.kind === 'postgres-globals' ? 'postgres-globals' : 'postgres-restore', object: artifact.key };
    if (artifact.kind === 'postgres-globals') step.checks.unshift(check);
    else step.checks.push(check);
  }
  return steps;
}

/**
 * Picks the backup to drill: an id, "latest" (the newest backup with a
 * manifest) or "random" (any backup of the last `randomWithinDays` days by
 * the time in its id). Choosing here, not in the workflow, keeps replays
 * deterministic.
 */
export async function resolveDrillBackup(input: { plan: Plan } & Pick<DrillWorkflowInput, 'backup' | 'randomWithinDays'>): Promise<DrillTarget> {
  const { plan } = input;
  const store = openReadStore(plan);
  let backupId: string;
  if (input.backup === 'latest' || input.backup === 'random') {
    const ids = await committedBackups(store, plan);
    if (input.backup === 'latest') {
      if (ids.length === 0) throw notFound(`plan ${plan.name} has no backup with a manifest in ${store.description}; run a backup first`);
      backupId = ids[ids.length - 1];
    } else {
      const days = input.randomWithinDays ?? DEFAULT_RANDOM_WITHIN_DAYS;
      if (!(days > 0)) throw notFound(`invalid randomWithinDays ${days}: expected a positive number of days`);
      const since = Date.now() - days * 24 * 60 * 60 * 1000;
      const recent = ids.filter((id) => (backupIdTime(id)?.getTime() ?? 0) >= since);
      if (recent.length === 0) {
        throw notFound(`plan ${plan.name} has no backup of the last ${days} days in ${store.description}; widen the window or run a backup`);
      }
      backupId = recent[Math.floor(Math.random() * recent.length)];
    }
  } else {
    if (!isBackupId(input.backup)) {
      throw notFound(`invalid backup "${input.backup}": expected a backup id such as 20261204T194512Z-01a2429e, "latest" or "random"`);
    }
    backupId = input.backup;
    if (!(await store.stat(manifestKey(plan.name, backupId)))) {
      throw notFound(`backup ${backupId} of plan ${plan.name} has no manifest in ${store.description}; list the backups with: opa-backup list --plan FILE`);
    }
  }
  const { manifest, sha256 } = await readManifest(store, plan, backupId);
  return {
    plan: plan.name,
    backupId,
    manifestSha256: sha256,
    steps: planSteps(manifest.artifacts),
    artifactKeys: manifest.artifacts.map((artifact) => artifact.key),
  };
}

interface StepContext {
  store: BlobStore;
  scratch: Scratch;
  signal: AbortSignal;
  heartbeat: (details: unknown) => void;
  stop: () => void;
}

/** Opens the step's store and scratch directory and starts heartbeats, which also deliver cancellation. */
async function stepContext(input: DrillActivityInput, details: () => unknown): Promise<StepContext> {
  const context = Context.current();
  const stop = heartbeatTimer(details);
  try {
    return {
      store: openReadStore(input.plan),
      scratch: await openScratch(input.drillId),
      signal: context.cancellationSignal,
      heartbeat: (value) => context.heartbeat(value),
      stop,
    };
  } catch (error) {
    stop();
    throw error;
  }
}

/** Copies every artifact into the scratch directory and checks its size and SHA-256 against the manifest. */
export async function drillFetchArtifacts(input: DrillActivityInput): Promise<CheckResult[]> {
  let progress = { key: '', bytes: 0 };
  const step = await stepContext(input, () => progress);
  const log = activityLogger({ plan: input.plan.name, backupId: input.backupId });
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const results: CheckResult[] = [];
    for (const record of manifest.artifacts) {
      const started = performance.now();
      progress = { key: record.key, bytes: 0 };
      try {
        await localArtifact(step.scratch, step.store, input.plan, input.backupId, record, {
          signal: step.signal,
          onBytes: (bytes) => {
            progress.bytes = bytes;
          },
        });
        results.push({
          name: 'artifact-digest',
          object: record.key,
          outcome: 'passed',
          message: `${record.size} bytes with sha256 ${record.sha256}`,
          durationSeconds: (performance.now() - started) / 1000,
        });
      } catch (error) {
        if (!(error instanceof ArtifactDigestError) && (error as Error).name !== 'ObjectNotFoundError') throw error;
        results.push({ name: 'artifact-digest', object: record.key, outcome: 'failed', message: (error as Error).message, durationSeconds: (performance.now() - started) / 1000 });
      }
    }
    log.info({ artifacts: results.length, failed: results.filter((result) => result.outcome === 'failed').length }, 'drill artifacts fetched');
    return results;
  } finally {
    step.stop();
  }
}

/**
 * Fetches a verified local copy of `record` for a step. When the copy fails
 * its digest check, returns the step's checks as not run instead.
 */
async function fetchForStep(
  step: StepContext,
  input: DrillActivityInput & { key: string },
  record: ArtifactRecord,
  checks: string[],
): Promise<{ file: string } | { skipped: CheckResult[] }> {
  try {
    return { file: await localArtifact(step.scratch, step.store, input.plan, input.backupId, record, { signal: step.signal }) };
  } catch (error) {
    if (error instanceof ArtifactDigestError) return { skipped: notRun(checks, input.key, error.message) };
    throw error;
  }
}

/** Restores one OPA bundle into a fresh OPA and compares policies, base documents and probe decisions. */
export async function drillOpa(input: DrillActivityInput & { key: string }): Promise<CheckResult[]> {
  let progress: unknown = { phase: 'fetch' };
  const step = await stepContext(input, () => progress);
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const record = findArtifact(manifest, input.key);
    const fetched = await fetchForStep(step, input, record, OPA_CHECKS);
    if ('skipped' in fetched) return fetched.skipped;
    const bundleFile = fetched.file;
    return await drillOpaBundle({
      scratch: step.scratch,
      bundleFile,
      key: input.key,
      facts: record.facts as OpaFacts,
      signal: step.signal,
      onCheck: (result) => {
        progress = { phase: result.name, outcome: result.outcome };
        step.heartbeat(progress);
      },
    });
  } finally {
    step.stop();
  }
}

/** Restores a PostgreSQL source's globals and dumps into a fresh cluster and compares row counts. */
export async function drillPostgres(input: DrillActivityInput & { keys: string[] }): Promise<CheckResult[]> {
  let progress: unknown = { phase: 'fetch' };
  const step = await stepContext(input, () => progress);
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const artifacts: PostgresArtifact[] = [];
    for (const key of input.keys) {
      const record = findArtifact(manifest, key);
      const file = await localArtifact(step.scratch, step.store, input.plan, input.backupId, record, { signal: step.signal });
      artifacts.push({ key, kind: record.kind as PostgresArtifact['kind'], file, facts: record.facts as PostgresFacts });
    }
    progress = { phase: 'restore' };
    return await drillPostgresSource(step.scratch, artifacts, {
      signal: step.signal,
      onCheck: (result) => {
        progress = { phase: result.name, object: result.object, outcome: result.outcome };
        step.heartbeat(progress);
      },
    });
  } catch (error) {
    if (error instanceof ArtifactDigestError) {
      return input.keys.map((key) => ({ name: key.includes('/globals.sql') ? 'postgres-globals' : 'postgres-restore', object: key, outcome: 'failed', message: `not checked: ${error.message}`, durationSeconds: 0 }));
    }
    throw error;
  } finally {
    step.stop();
  }
}

/** Loads a Redis artifact into a fresh redis-server and compares per-database key counts. */
export async function drillRedis(input: DrillActivityInput & { key: string }): Promise<CheckResult[]> {
  const step = await stepContext(input, () => ({ phase: 'redis-restore' }));
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const record = findArtifact(manifest, input.key);
    const fetched = await fetchForStep(step, input, record, ['redis-restore']);
    if ('skipped' in fetched) return fetched.skipped;
    return [await drillRedisArtifact(step.scratch, { key: input.key, file: fetched.file, facts: record.facts as RedisFacts }, step.signal)];
  } finally {
    step.stop();
  }
}

/**
 * Starts OPA with a served bundle and checks the revision it activates, then
 * compares that revision with the bundles the backup's live OPA sources had
 * loaded (bundle-drift, when one of them pairs with this bundle).
 */
export async function drillServedBundle(input: DrillActivityInput & { key: string }): Promise<CheckResult[]> {
  const step = await stepContext(input, () => ({ phase: BUNDLE_ACTIVATION_CHECK }));
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const record = findArtifact(manifest, input.key);
    const facts = record.facts as BundleFacts;
    const served = manifest.artifacts.filter((artifact) => artifact.kind === 'bundle').length;
    const pairs = pairLoadedBundles(record.source, served, liveOpaBundles(manifest.artifacts));
    const fetched = await fetchForStep(step, input, record, pairs.length > 0 ? [BUNDLE_ACTIVATION_CHECK, BUNDLE_DRIFT_CHECK] : [BUNDLE_ACTIVATION_CHECK]);
    if ('skipped' in fetched) return fetched.skipped;
    const file = fetched.file;
    const sources = input.plan.sources.bundle ?? [];
    const index = sources.findIndex((source) => source.name === record.source);
    const source = index >= 0 ? sources[index] : undefined;
    // The key is read only when it is used, so a drill of a bundle the backup did not verify needs no key on the worker.
    const verification =
      source?.verificationKey && facts.signature.verified === true
        ? { key: resolveSecret(source.verificationKey, `sources.bundle[${index}].verificationKey`), scope: source.verificationScope ?? '' }
        : undefined;
    const results = [
      await checkBundleActivation({ scratch: step.scratch, bundleFile: file, key: input.key, facts, verification, signal: step.signal }),
    ];
    if (pairs.length > 0) results.push(await checkBundleDrift(input.key, record.source, facts, pairs));
    return results;
  } finally {
    step.stop();
  }
}

/** Verifies a Git bundle, clones it and compares the clone's refs and HEAD with the manifest. */
export async function drillGit(input: DrillActivityInput & { key: string }): Promise<CheckResult[]> {
  const step = await stepContext(input, () => ({ phase: 'git' }));
  try {
    const { manifest } = await readManifest(step.store, input.plan, input.backupId, input.manifestSha256);
    const record = findArtifact(manifest, input.key);
    const fetched = await fetchForStep(step, input, record, GIT_CHECKS);
    if ('skipped' in fetched) return fetched.skipped;
    return await drillGitBundle({ scratch: step.scratch, bundleFile: fetched.file, key: input.key, facts: record.facts as GitFacts, signal: step.signal });
  } finally {
    step.stop();
  }
}

/** Returns the report's key: <plan>/<backupId>/drills/<UTC time>-<last 8 hex digits of the run id>.json. */
export function drillReportKey(plan: string, backupId: string, startedAt: string, runId: string): string {
  const stamp = startedAt.replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z');
  return `${plan}/${backupId}/drills/${stamp}-${runId.replace(/-/g, '').slice(-8)}.json`;
}

/**
 * Writes the drill report beside the backup it verified, in every
 * destination, so that retention in each finds which backups are verified.
 * Returns its key and the store's description.
 */
export async function writeDrillReport(input: { plan: Plan; report: DrillReport }): Promise<{ reportKey: string; destination: string }> {
  const { plan, report } = input;
  const store = openWriteStore(plan);
  const key = drillReportKey(plan.name, report.backupId, report.startedAt, report.workflow.runId);
  await store.put(key, Readable.from([Buffer.from(JSON.stringify(report, null, 2) + '\n')]), { contentType: 'application/json' });
  activityLogger({ plan: plan.name, backupId: report.backupId }).info({ key, outcome: report.outcome, rtoSeconds: report.rtoSeconds }, 'drill report stored');
  return { reportKey: key, destination: store.description };
}

/**
 * Stops whatever the drill left running on this host and removes its scratch directory.
 * NOTE: with workers on several hosts, cleanup may run on another host than a
 * step did. The copies on that host stay until its worker restarts and reaps them.
 */
export async function cleanupDrill(input: { drillId: string }): Promise<void> {
  await removeScratch(input.drillId);
}
