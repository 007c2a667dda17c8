// retentionWorkflow prunes every destination of a plan (the primary and each
// replica) at the same time. In each it decides which backups to keep from
// that destination's own backups and keeps those that running restore
// drills use. Then it deletes the rest in batches and removes folders of
// backups that never committed and abandoned uploads. A destination that fails is reported as
// failed and the others go on. A dry run stops after the decisions. Start
// it with the plan's fixed retention workflow id
// (planWorkflowId(plan, 'retention')) so that two runs never delete at once.
import { ActivityFailure, ApplicationFailure, log, proxyActivities } from '@temporalio/workflow';
import type * as activities from '../activities';
import type { DestinationRetention, RetentionRunReport } from '../activities/retention';
import { compareStrings } from '../common/compare';
import { NON_RETRYABLE_FAILURES } from '../common/failures';
import { PRIMARY_DESTINATION, type Destination, type Plan } from '../common/plan';
import type { RetentionWorkflowInput } from '../common/retention';

/** Backups deleted per activity call, which bounds each call's payload and time. */
const DELETE_BATCH = 5000;

const quick = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 5, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

// Listing and deleting thousands of objects takes minutes on a slow store;
// heartbeats tell a dead worker from a slow one.
const storage = proxyActivities<typeof activities>({
  startToCloseTimeout: '30m',
  heartbeatTimeout: '1m',
  retry: { initialInterval: '2s', maximumInterval: '1m', maximumAttempts: 5, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

export async function retentionWorkflow(input: RetentionWorkflowInput): Promise<RetentionRunReport> {
  let plan;
  try {
    plan = await quick.loadPlan({ plan: input?.plan, planFile: input?.planFile });
  } catch (error) {
    // Fail with the plan's own message, not "activity task failed".
    const cause = error instanceof ActivityFailure && error.cause instanceof ApplicationFailure ? error.cause : undefined;
    throw ApplicationFailure.create({
      type: cause?.type ?? 'InvalidPlan',
      nonRetryable: true,
      message: cause?.message ?? (error as Error).message,
    });
  }
  const dryRun = input.dryRun ?? false;
  // Workflow time: every destination decides at the same instant.
  const now = new Date().toISOString();

  // Backups that running drills restore are kept in every destination, whatever the rules decide.
  const drills = await quick.findDrillTargets({ plan: plan.name });
  const used = new Map(drills.targets.map((target) => [target.backupId, target.workflowId]));

  const destinations: Array<{ name: string; destination: Destination }> = [
    { name: PRIMARY_DESTINATION, destination: plan.destination },
    ...(plan.replicas ?? []).map((replica) => ({ name: replica.name, destination: replica })),
  ];
  const results = await Promise.all(destinations.map((entry) => pruneDestination(plan, entry.name, entry.destination, { dryRun, now, used })));

  const primary = results[0];
  const { name: _name, state: _state, error: _error, ...primaryFigures } = primary;
  return {
    plan: plan.name,
    decidedAt: now,
    timeZone: plan.schedule?.timezone ?? 'UTC',
    dryRun,
    unresolvedDrills: drills.unresolved,
    ...primaryFigures,
    destinations: results,
  };
}

/** Returns how a destination is described in reports when its store could not report it itself. */
function describeDestination(destination: Destination): string {
  if (destination.local) return `local folder ${destination.local.path}`;
  const s3 = destination.s3!;
  return `s3://${s3.bucket}/${s3.prefix ? `${s3.prefix}/` : ''}${s3.endpoint ? ` at ${s3.endpoint}` : ''}`;
}

/** Returns the message of the innermost cause: for a failed activity, the activity's own error. */
function rootMessage(error: unknown): string {
  let current = error as { message?: string; cause?: unknown } | undefined;
  while (current && current.cause && typeof current.cause === 'object') current = current.cause as { message?: string; cause?: unknown };
  return current?.message ?? String(error);
}

/**
 * Decides and deletes in one destination. A failure of any step ends this
 * destination's part of the run and is returned in the result, so the other
 * destinations go on.
 */
async function pruneDestination(
  plan: Plan,
  name: string,
  destination: Destination,
  options: { dryRun: boolean; now: string; used: Map<string, string> },
): Promise<DestinationRetention> {
  const result: DestinationRetention = {
    name,
    state: 'complete',
    destination: describeDestination(destination),
    backups: 0,
    kept: [],
    deleted: [],
    future: [],
    unreadable: [],
    missingReferences: [],
    leftovers: [],
    staleUploads: [],
  };
  try {
    const report = await storage.planRetention({ plan, destination: name, dryRun: options.dryRun, now: options.now });
    result.destination = report.destination;
    result.backups = report.backups;
    result.kept = report.kept;
    result.future = report.future;
    result.unreadable = report.unreadable;
    result.missingReferences = report.missingReferences;
    if (report.deferred) result.deferred = report.deferred;
    if (report.uncommittedRecent) result.uncommittedRecent = report.uncommittedRecent;
    const toDelete: string[] = [];
    const keySetOf: number[] = [];
    report.deleted.forEach((id, index) => {
      if (options.used.has(id)) {
        result.kept.push({ id, reasons: [`used by running drill ${options.used.get(id)}`] });
        return;
      }
      toDelete.push(id);
      keySetOf.push(report.contents?.keySetOf[index] ?? -1);
    });
    result.kept.sort((a, b) => compareStrings(a.id, b.id));
    if (options.dryRun) {
      result.deleted = toDelete;
      result.leftovers = report.leftovers;
      result.staleUploads = report.staleUploads;
      return result;
    }

    const skipped: string[] = [];
    for (let start = 0; start < toDelete.length; start += DELETE_BATCH) {
      const batch = toDelete.slice(start, start + DELETE_BATCH);
      const contents = report.contents && {
        keySets: report.contents.keySets,
        keySetOf: keySetOf.slice(start, start + DELETE_BATCH),
        drillReports: Object.fromEntries(batch.filter((id) => report.contents.drillReports[id]).map((id) => [id, report.contents.drillReports[id]])),
      };
      const deleted = await storage.deleteBackups({ plan, destination: name, backupIds: batch, contents });
      result.deleted.push(...deleted.deleted);
      for (const entry of deleted.skipped) {
        skipped.push(entry.backupId);
        result.kept.push({ id: entry.backupId, reasons: [`used by running drill ${entry.workflowId}`] });
      }
    }
    if (skipped.length > 0) {
      result.skippedForDrills = skipped;
      result.kept.sort((a, b) => compareStrings(a.id, b.id));
    }

    if (report.leftovers.length > 0 || report.staleUploads.length > 0) {
      const removed = await storage.removeLeftovers({
        plan,
        destination: name,
        folders: report.leftovers.map((leftover) => leftover.id),
        uploads: report.staleUploads.map(({ key, uploadId }) => ({ key, uploadId })),
      });
      result.leftovers = report.leftovers.filter((leftover) => removed.folders.includes(leftover.id));
      result.staleUploads = report.staleUploads;
    }
  } catch (error) {
    result.state = 'failed';
    result.error = rootMessage(error);
    log.warn('retention failed in a destination; the other destinations go on', { plan: plan.name, destination: name, error: result.error });
  }
  return result;
}
