// restoreDrillWorkflow: prove that a backup restores. It resolves the backup
// (an id, the latest or a random recent one), fetches and verifies every
// artifact, restores each source into an ephemeral server in parallel and
// compares it with the manifest, then writes a drill report beside the
// backup. Cleanup of servers and scratch files runs on success, failure and
// cancellation. Workflow code is replayed: it imports only types of
// activities and pure helpers.
import {
  ActivityCancellationType,
  ActivityFailure,
  ApplicationFailure,
  CancellationScope,
  defineQuery,
  executeChild,
  isCancellation,
  proxyActivities,
  setHandler,
  workflowInfo,
  type ActivityOptions,
} from '@temporalio/workflow';
import type * as activities from '../activities';
import { DRILL_TOOL_MISSING, NON_RETRYABLE_FAILURES } from '../common/failures';
import type { Plan } from '../common/plan';
import type {
  CheckResult,
  DrillCheck,
  DrillProgress,
  DrillReport,
  DrillStep,
  DrillWorkflowInput,
  DrillWorkflowResult,
} from '../activities/drill/types';

/** Query that returns each check with its state while the drill runs. */
export const drillProgressQuery = defineQuery<DrillProgress>('progress');
/** Query that returns the plan and the backup the drill reads, so retention can spare that backup. */
export const drillTargetQuery = defineQuery<{ plan: string; backupId?: string }>('drillTarget');

/** Failure types of drill activities that a retry cannot fix. */
const DRILL_NON_RETRYABLE = [...NON_RETRYABLE_FAILURES, 'BackupNotFound', 'ManifestChanged'];

const shortActivities = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 5, nonRetryableErrorTypes: DRILL_NON_RETRYABLE },
});

/**
 * Options of the steps that fetch and restore. Heartbeats deliver
 * cancellation, and the workflow waits until a cancelled step has stopped its
 * servers before it cleans up.
 */
const stepOptions: ActivityOptions = {
  startToCloseTimeout: '2h',
  heartbeatTimeout: '10s',
  cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
  retry: { initialInterval: '1s', maximumInterval: '30s', maximumAttempts: 3, nonRetryableErrorTypes: DRILL_NON_RETRYABLE },
};

/** Returns the innermost failure's message, which names what to fix. */
function failureMessage(error: unknown): string {
  let current: unknown = error;
  if (current instanceof ActivityFailure && current.cause) current = current.cause;
  return (current as Error)?.message ?? String(current);
}

/** Builds the workflow's failure from an activity's, keeping its type and message rather than "activity task failed". */
function workflowFailure(error: unknown): ApplicationFailure {
  const cause = error instanceof ActivityFailure ? error.cause : error;
  const type = cause instanceof ApplicationFailure ? (cause.type ?? 'DrillFailed') : 'DrillFailed';
  return ApplicationFailure.create({ type, nonRetryable: true, message: failureMessage(error) });
}

export async function restoreDrillWorkflow(input: DrillWorkflowInput): Promise<DrillWorkflowResult> {
  const info = workflowInfo();
  const startedAt = info.runStartTime;
  const drillId = `drill-${info.runId}`;
  const progress: DrillProgress = { checks: [] };
  setHandler(drillProgressQuery, () => progress);
  setHandler(drillTargetQuery, () => ({ plan: progress.plan ?? input?.plan?.name ?? '', backupId: progress.backupId }));

  let plan: Plan;
  try {
    plan = await shortActivities.loadPlan({ plan: input?.plan, planFile: input?.planFile });
  } catch (error) {
    throw workflowFailure(error);
  }
  progress.plan = plan.name;

  let target;
  try {
    target = await shortActivities.resolveDrillBackup({ plan, backup: input?.backup ?? 'latest', randomWithinDays: input?.randomWithinDays });
  } catch (error) {
    throw workflowFailure(error);
  }
  progress.backupId = target.backupId;
  const { backupId, manifestSha256 } = target;
  const base = { plan, backupId, manifestSha256, drillId };

  const checkOf = (name: string, object: string): DrillCheck => {
    let check = progress.checks.find((entry) => entry.name === name && entry.object === object);
    if (!check) {
      check = { name, object, state: 'pending' };
      progress.checks.push(check);
    }
    return check;
  };
  for (const key of target.artifactKeys) checkOf('artifact-digest', key);
  for (const step of target.steps) for (const check of step.checks) checkOf(check.name, check.object);
  const apply = (results: CheckResult[]): void => {
    for (const result of results) {
      const check = checkOf(result.name, result.object);
      check.state = result.outcome;
      check.message = result.message;
      check.durationSeconds = result.durationSeconds;
    }
  };
  const failAll = (checks: Array<{ name: string; object: string }>, message: string): void => {
    for (const { name, object } of checks) Object.assign(checkOf(name, object), { state: 'failed', message, durationSeconds: 0 });
  };

  let lastRestoreAt: number | undefined;
  // Set when the worker lacks a server binary: the drill then has no verdict on the backup.
  let cannotRun: string | undefined;
  try {
    const fetchChecks = target.artifactKeys.map((key) => ({ name: 'artifact-digest', object: key }));
    for (const { name, object } of fetchChecks) checkOf(name, object).state = 'running';
    try {
      apply(await proxyActivities<typeof activities>({ ...stepOptions, activityId: 'fetch' }).drillFetchArtifacts(base));
    } catch (error) {
      if (isCancellation(error)) throw error;
      failAll(fetchChecks, `fetching the artifacts failed: ${failureMessage(error)}`);
    }
    const damaged = new Set(progress.checks.filter((check) => check.name === 'artifact-digest' && check.state === 'failed').map((check) => check.object));

    const runStep = async (step: DrillStep): Promise<void> => {
      const broken = step.keys.filter((key) => damaged.has(key));
      if (broken.length > 0) {
        failAll(step.checks, `not restored: ${broken.join(', ')} failed its digest check`);
        return;
      }
      for (const { name, object } of step.checks) checkOf(name, object).state = 'running';
      // Keys, not sources, name the activity: a Redis Cluster source has one artifact per master.
      const stepActivities = proxyActivities<typeof activities>({ ...stepOptions, activityId: `${step.kind}:${step.keys.join(',')}` });
      try {
        let results: CheckResult[];
        if (step.kind === 'opa') results = await stepActivities.drillOpa({ ...base, key: step.keys[0] });
        else if (step.kind === 'postgres') results = await stepActivities.drillPostgres({ ...base, keys: step.keys });
        else if (step.kind === 'bundle') results = await stepActivities.drillServedBundle({ ...base, key: step.keys[0] });
        else if (step.kind === 'git') results = await stepActivities.drillGit({ ...base, key: step.keys[0] });
        else results = await stepActivities.drillRedis({ ...base, key: step.keys[0] });
        apply(results);
        if (results.every((result) => result.outcome === 'passed')) lastRestoreAt = Date.now();
      } catch (error) {
        if (isCancellation(error)) throw error;
        const cause = error instanceof ActivityFailure ? error.cause : error;
        if (cause instanceof ApplicationFailure && cause.type === DRILL_TOOL_MISSING) {
          cannotRun ??= failureMessage(error);
          failAll(step.checks, `not checked: ${failureMessage(error)}`);
          return;
        }
        failAll(step.checks, `the ${step.kind} restore step failed: ${failureMessage(error)}`);
      }
    };
    await Promise.all(target.steps.map(runStep));
  } finally {
    // Runs even when the drill is cancelled: it must not leave servers or files behind.
    await CancellationScope.nonCancellable(() => shortActivities.cleanupDrill({ drillId }));
  }
  if (cannotRun !== undefined) {
    throw ApplicationFailure.create({ type: DRILL_TOOL_MISSING, nonRetryable: true, message: `the drill could not run on this worker: ${cannotRun}` });
  }

  const outcome = progress.checks.every((check) => check.state === 'passed') ? 'passed' : 'failed';
  const report: DrillReport = {
    format: 'opa-backup.drill-report',
    version: 1,
    plan: plan.name,
    backupId,
    workflow: { workflowId: info.workflowId, runId: info.runId },
    startedAt: startedAt.toISOString(),
    completedAt: new Date().toISOString(),
    outcome,
    rtoSeconds: lastRestoreAt === undefined ? undefined : (lastRestoreAt - startedAt.getTime()) / 1000,
    checks: progress.checks.map((check) => ({
      name: check.name,
      object: check.object,
      outcome: check.state === 'passed' ? 'passed' : 'failed',
      message: check.message ?? '',
      durationSeconds: check.durationSeconds ?? 0,
    })),
  };
  const { reportKey, destination } = await shortActivities.writeDrillReport({ plan, report });
  // Metrics are a side channel: a worker without a metrics endpoint, or a
  // failure here, must not fail a drill whose report is stored.
  try {
    await shortActivities.recordDrillMetrics({
      plan: plan.name,
      backupId,
      outcome,
      completedAt: report.completedAt,
      rtoSeconds: report.rtoSeconds,
    });
  } catch {
    // The report is the record; the gauges catch up at the next drill.
  }
  progress.outcome = outcome;
  progress.reportKey = reportKey;
  return { plan: plan.name, backupId, outcome, rtoSeconds: report.rtoSeconds, reportKey, destination, checks: report.checks };
}

/**
 * Runs a drill of a backup that just completed, as a child workflow, and
 * returns its outcome. A drill that cannot run is reported as failed with
 * its error; the backup itself stays valid either way.
 */
export async function drillAfterBackup(plan: Plan, backupId: string): Promise<{ outcome: 'passed' | 'failed'; reportKey?: string; error?: string }> {
  try {
    const result = await executeChild(restoreDrillWorkflow, {
      args: [{ plan, backup: backupId }],
      workflowId: `${workflowInfo().workflowId}-drill`,
    });
    return { outcome: result.outcome, reportKey: result.reportKey };
  } catch (error) {
    let current: unknown = error;
    while ((current as { cause?: unknown })?.cause) current = (current as { cause?: unknown }).cause;
    return { outcome: 'failed', error: (current as Error)?.message ?? String(error) };
  }
}
