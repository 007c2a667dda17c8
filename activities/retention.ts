// Activities of retentionWorkflow. They list what one destination of a plan
// (the primary or a replica, by name) contains, decide with the plan's
// retention rules, find the backups that running restore drills use, and
// delete. Each backup's manifest goes first, so an interrupted delete leaves
// a folder that is no longer a backup, then the rest of its folder.
import { ApplicationFailure, Context } from '@temporalio/activity';
import { compareStrings } from '../common/compare';
import { backupIdTime, isBackupId, manifestKey } from '../common/layout';
import { MANIFEST_FILE } from '../common/manifest';
import { FailureType } from '../common/failures';
import { planWorkflowId, PRIMARY_DESTINATION, type Plan } from '../common/plan';
import {
  applyRetention,
  describeReason,
  hasRetentionRules,
  parseDuration,
  type RetentionCandidate,
  type RetentionReport,
  type RetentionResult,
} from '../common/retention';
import { activityLogger } from './logging';
import { openBlobStore, type BlobStore } from './storage';

/**
 * Opens the destination of the plan with this name: PRIMARY_DESTINATION
 * ("primary", the default) or a replica's name.
 */
export function openNamedDestination(plan: Plan, name: string = PRIMARY_DESTINATION): BlobStore {
  if (name === PRIMARY_DESTINATION) return openBlobStore(plan.destination);
  const replica = (plan.replicas ?? []).find((candidate) => candidate.name === name);
  if (!replica) {
    const known = [PRIMARY_DESTINATION, ...(plan.replicas ?? []).map((candidate) => candidate.name)];
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no destination named "${name}"; its destinations are ${known.join(', ')}`,
    });
  }
  return openBlobStore(replica);
}

/** Default age after which an uncommitted folder or an unfinished upload is abandoned. */
export const DEFAULT_LEFTOVER_GRACE = '24h';

/** Reads of manifests and drill reports in flight at once. */
const READ_CONCURRENCY = 32;

/** Backup deletions in flight at once, for stores without bulk deletes. */
const DELETE_CONCURRENCY = 16;

/** Bulk delete requests (1,000 keys each) in flight at once. */
const BULK_DELETES_IN_FLIGHT = 4;

/** Time a running drill gets to respond to the drillTarget query. */
const DRILL_QUERY_TIMEOUT_MS = 10_000;

/** Workflow type and query of restore drills, which retention must not pull a backup from under. */
export const DRILL_WORKFLOW_TYPE = 'restoreDrillWorkflow';
export const DRILL_TARGET_QUERY = 'drillTarget';

/** Summary of one backup folder, from a listing. */
interface FolderSummary {
  id: string;
  objects: number;
  hasManifest: boolean;
  drillReports: string[];
  lastModified: number;
}

/** Runs `action` on every item with at most `limit` calls in flight, and returns the results in order. */
async function mapLimit<T, R>(items: readonly T[], limit: number, action: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const lanes = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await action(items[index]);
    }
  });
  await Promise.all(lanes);
  return results;
}

async function readJson(store: BlobStore, key: string): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

/** Heartbeats when running as an activity; a no-op elsewhere (the benchmark calls these functions directly). */
function heartbeat(details?: unknown): void {
  try {
    Context.current().heartbeat(details);
  } catch {
    // Not inside an activity.
  }
}

/**
 * Lists the plan's folders in one pass over its keys. Keys arrive in order,
 * so each folder's keys are adjacent and memory keeps one summary per folder.
 * Folders whose names are not backup ids are not opa-backup's and are skipped.
 */
async function summariseFolders(store: BlobStore, planName: string): Promise<FolderSummary[]> {
  const folders: FolderSummary[] = [];
  const planPrefix = `${planName}/`;
  let current: FolderSummary | undefined;
  let seen = 0;
  for await (const object of store.list(planPrefix)) {
    if (++seen % 5000 === 0) heartbeat({ listed: seen });
    const rest = object.key.slice(planPrefix.length);
    const slash = rest.indexOf('/');
    if (slash <= 0) continue;
    const id = rest.slice(0, slash);
    const inner = rest.slice(slash + 1);
    if (!isBackupId(id)) continue;
    if (!current || current.id !== id) {
      current = { id, objects: 0, hasManifest: false, drillReports: [], lastModified: 0 };
      folders.push(current);
    }
    current.objects++;
    current.lastModified = Math.max(current.lastModified, object.lastModified?.getTime() ?? 0);
    if (inner === MANIFEST_FILE) current.hasManifest = true;
    else if (/^drills\/[^/]+\.json$/.test(inner)) current.drillReports.push(object.key);
  }
  return folders;
}

interface ManifestFacts {
  status?: unknown;
  artifacts?: Array<{ storedIn?: unknown }>;
}

/** Reads what retention needs from a manifest: status and storedIn references. */
async function readCandidate(
  store: BlobStore,
  planName: string,
  backupId: string,
  verified: boolean,
): Promise<RetentionCandidate | { id: string; error: string }> {
  const key = manifestKey(planName, backupId);
  let manifest: ManifestFacts;
  try {
    manifest = (await readJson(store, key)) as ManifestFacts;
  } catch (error) {
    return { id: backupId, error: `${key}: ${(error as Error).message}` };
  }
  if (manifest?.status !== 'complete' && manifest?.status !== 'partial') {
    return { id: backupId, error: `${key}: status ${JSON.stringify(manifest?.status)} is neither "complete" nor "partial"` };
  }
  const references = (manifest.artifacts ?? [])
    .map((artifact) => artifact.storedIn)
    .filter((storedIn): storedIn is string => typeof storedIn === 'string' && storedIn !== backupId);
  return { id: backupId, time: backupIdTime(backupId)!, status: manifest.status, verified, references: [...new Set(references)] };
}

/** Returns the ids of backups with a drill report whose outcome is "passed". */
async function findVerified(store: BlobStore, folders: FolderSummary[]): Promise<Set<string>> {
  const verified = new Set<string>();
  const withReports = folders.filter((folder) => folder.hasManifest && folder.drillReports.length > 0);
  await mapLimit(withReports, READ_CONCURRENCY, async (folder) => {
    for (const report of folder.drillReports) {
      try {
        const drill = (await readJson(store, report)) as { outcome?: unknown };
        if (drill?.outcome === 'passed') {
          verified.add(folder.id);
          return;
        }
      } catch {
        // An unreadable drill report verifies nothing.
      }
    }
  });
  return verified;
}

/**
 * Decides, reading manifests only of backups that the decision keeps. An
 * unread backup counts as complete without references. That guess cannot
 * change the decision: only kept backups' references count, and a backup
 * guessed complete and still not kept would not be kept as partial either.
 * Each round reads the manifests of newly kept backups, until a round keeps
 * no unread backup. Unreadable manifests leave the decision and are kept.
 */
async function decide(
  store: BlobStore,
  plan: Plan,
  committed: FolderSummary[],
  verified: Set<string>,
  options: { now: Date; timeZone: string },
): Promise<{ decision: RetentionResult; unreadable: Array<{ id: string; error: string }>; manifestsRead: number }> {
  const read = new Map<string, RetentionCandidate>();
  const unreadable = new Map<string, string>();
  for (;;) {
    const candidates = committed
      .filter((folder) => !unreadable.has(folder.id))
      .map(
        (folder) =>
          read.get(folder.id) ?? { id: folder.id, time: backupIdTime(folder.id)!, status: 'complete' as const, verified: verified.has(folder.id) },
      );
    const decision = applyRetention(candidates, plan.retention, options);
    const unread = hasRetentionRules(plan.retention) ? decision.keep.filter((id) => !read.has(id)) : [];
    if (unread.length === 0) {
      return { decision, unreadable: [...unreadable].map(([id, error]) => ({ id, error })), manifestsRead: read.size + unreadable.size };
    }
    await mapLimit(unread, READ_CONCURRENCY, async (id) => {
      const result = await readCandidate(store, plan.name, id, verified.has(id));
      if ('error' in result) unreadable.set(id, result.error);
      else read.set(id, result);
    });
    heartbeat({ manifestsRead: read.size });
  }
}

/**
 * Lists the backups, leftovers and unfinished uploads of one destination of
 * the plan (the primary unless `destination` names a replica), and decides
 * with the plan's rules on that destination's own backups. Deletes nothing.
 */
export async function planRetention(input: { plan: Plan; destination?: string; dryRun?: boolean; now?: string }): Promise<RetentionReport> {
  const { plan } = input;
  const now = input.now ? new Date(input.now) : new Date();
  const store = openNamedDestination(plan, input.destination);
  const log = activityLogger({ plan: plan.name, destination: input.destination ?? PRIMARY_DESTINATION });
  const grace = parseDuration(plan.retention?.leftoverGrace ?? DEFAULT_LEFTOVER_GRACE);
  const timeZone = plan.schedule?.timezone ?? 'UTC';

  const folders = await summariseFolders(store, plan.name);
  const committed = folders.filter((folder) => folder.hasManifest);
  const verified = await findVerified(store, folders);
  const { decision, unreadable, manifestsRead } = await decide(store, plan, committed, verified, { now, timeZone });
  const kept = decision.decisions
    .filter((entry) => entry.keep)
    .map((entry) => ({ id: entry.id, reasons: entry.reasons.map(describeReason) }));
  for (const entry of unreadable) kept.push({ id: entry.id, reasons: ['manifest unreadable'] });
  kept.sort((a, b) => compareStrings(a.id, b.id));

  const cutoff = now.getTime() - grace;
  const leftovers = folders
    .filter((folder) => !folder.hasManifest && folder.lastModified < cutoff && (backupIdTime(folder.id)?.getTime() ?? 0) < cutoff)
    .map((folder) => ({ id: folder.id, objects: folder.objects, lastModified: new Date(folder.lastModified).toISOString() }));

  const staleUploads: RetentionReport['staleUploads'] = [];
  if (store.listUnfinishedUploads) {
    for await (const upload of store.listUnfinishedUploads(`${plan.name}/`)) {
      if (upload.initiated && upload.initiated.getTime() < cutoff) {
        staleUploads.push({ key: upload.key, uploadId: upload.uploadId, initiated: upload.initiated.toISOString() });
      }
    }
  }

  const report: RetentionReport = {
    plan: plan.name,
    destination: store.description,
    decidedAt: now.toISOString(),
    timeZone,
    dryRun: input.dryRun ?? false,
    backups: committed.length,
    kept,
    deleted: decision.delete,
    future: decision.future,
    unreadable,
    missingReferences: decision.missingReferences,
    unresolvedDrills: [],
    leftovers,
    staleUploads,
  };
  log.info(
    {
      backups: report.backups,
      manifestsRead,
      kept: kept.length,
      toDelete: report.deleted.length,
      future: report.future.length,
      unreadable: unreadable.length,
      leftovers: leftovers.length,
      staleUploads: staleUploads.length,
    },
    'retention decided',
  );
  if (decision.future.length > 0) log.warn({ future: decision.future }, 'backups dated in the future are kept; check the clock of the worker that wrote them');
  for (const entry of unreadable) log.warn({ backupId: entry.id, error: entry.error }, 'manifest unreadable; the backup is kept');
  return report;
}

/** Retention of one destination, in a run over every destination of the plan. */
export interface DestinationRetention
  extends Omit<RetentionReport, 'plan' | 'decidedAt' | 'timeZone' | 'dryRun' | 'unresolvedDrills'> {
  /** PRIMARY_DESTINATION ("primary") or the replica's name. */
  name: string;
  /**
   * "failed" when listing, reading or deleting in this destination failed
   * after its retries. `deleted`, `leftovers` and `staleUploads` then list
   * only what was removed before the failure.
   */
  state: 'complete' | 'failed';
  /** Error that made the destination fail. */
  error?: string;
}

/**
 * Report of retentionWorkflow. The top-level fields describe the primary
 * destination, as a report of a plan without replicas does, and are empty
 * when the primary failed. `destinations` has one entry per destination,
 * the primary first.
 */
export interface RetentionRunReport extends RetentionReport {
  destinations: DestinationRetention[];
}

export interface DrillTargets {
  /** Backup ids that running drills of the plan restore, with the drill's workflow id. */
  targets: Array<{ backupId: string; workflowId: string }>;
  /** Running drills whose query failed, or that have not chosen a backup yet. */
  unresolved: Array<{ workflowId: string; reason: string }>;
}

/**
 * Asks every running restoreDrillWorkflow which backup it restores, through
 * the worker's Temporal client, and returns those of the plan. A drill
 * started after this call is not seen.
 */
export async function findDrillTargets(input: { plan: string }): Promise<DrillTargets> {
  const client = Context.current().client;
  const result: DrillTargets = { targets: [], unresolved: [] };
  const query = `WorkflowType = '${DRILL_WORKFLOW_TYPE}' AND ExecutionStatus = 'Running'`;
  for await (const execution of client.workflow.list({ query })) {
    const handle = client.workflow.getHandle(execution.workflowId, execution.runId);
    try {
      const target = await client.withDeadline(Date.now() + DRILL_QUERY_TIMEOUT_MS, () =>
        handle.query<{ plan: string; backupId?: string }>(DRILL_TARGET_QUERY),
      );
      if (target?.plan !== input.plan) continue;
      if (target.backupId) result.targets.push({ backupId: target.backupId, workflowId: execution.workflowId });
      else result.unresolved.push({ workflowId: execution.workflowId, reason: 'the drill has not chosen its backup yet' });
    } catch (error) {
      const cause = (error as Error).cause as Error | undefined;
      const detail = cause?.message ? `${(error as Error).message}: ${cause.message}` : (error as Error).message;
      result.unresolved.push({ workflowId: execution.workflowId, reason: `query ${DRILL_TARGET_QUERY} failed: ${detail}` });
      activityLogger({ plan: input.plan }).warn(
        { drillWorkflowId: execution.workflowId, error: detail },
        'running drill did not return its backup; the backup it restores is not protected from retention',
      );
    }
  }
  return result;
}

/** Deletes one backup: its manifest first, then every other object of its folder. */
async function deleteBackup(store: BlobStore, planName: string, backupId: string): Promise<void> {
  await store.delete(manifestKey(planName, backupId));
  await deleteFolder(store, `${planName}/${backupId}/`);
}

/**
 * Deletes backups with bulk deletes: every manifest of the batch first, then
 * the other objects, found by one listing that starts at the oldest folder
 * of the batch and stops after the newest. Kept folders in that range are
 * listed and skipped. Deletes of 1,000 keys run while the listing goes on,
 * at most BULK_DELETES_IN_FLIGHT at once.
 */
async function deleteInBulk(store: BlobStore, planName: string, backupIds: string[]): Promise<void> {
  if (backupIds.length === 0) return;
  const sorted = [...backupIds].sort();
  await store.deleteMany!(sorted.map((id) => manifestKey(planName, id)));
  heartbeat({ manifestsDeleted: sorted.length });

  const wanted = new Set(sorted);
  const last = sorted[sorted.length - 1];
  const planPrefix = `${planName}/`;
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  let deleted = 0;
  const send = async (keys: string[]): Promise<void> => {
    const request = store.deleteMany!(keys).then(
      () => {
        deleted += keys.length;
        heartbeat({ objectsDeleted: deleted });
      },
      (error: unknown) => {
        failure ??= error;
      },
    );
    inFlight.add(request);
    void request.finally(() => inFlight.delete(request));
    if (inFlight.size >= BULK_DELETES_IN_FLIGHT) await Promise.race(inFlight);
  };

  let keys: string[] = [];
  // The folder's prefix with its "/" sorts before its keys. With StartAfter
  // set to the name without "/", SeaweedFS 4.48 left that folder's keys out.
  for await (const object of store.listAfter!(planPrefix, `${planPrefix}${sorted[0]}/`)) {
    if (failure) break;
    const rest = object.key.slice(planPrefix.length);
    const id = rest.slice(0, rest.indexOf('/'));
    if (id > last) break;
    if (!wanted.has(id)) continue;
    keys.push(object.key);
    if (keys.length === 1000) {
      await send(keys);
      keys = [];
    }
  }
  if (keys.length > 0 && !failure) await send(keys);
  await Promise.all(inFlight);
  if (failure) throw failure;
}

async function deleteFolder(store: BlobStore, prefix: string): Promise<void> {
  if (store.deleteFolder) {
    await store.deleteFolder(prefix);
    return;
  }
  const keys: string[] = [];
  for await (const object of store.list(prefix)) keys.push(object.key);
  for (const key of keys) await store.delete(key);
}

/**
 * Deletes backups, skipping any that a running drill of the plan uses. The
 * drills are asked again here, right before the deletes, because a drill
 * may have started since the decision.
 */
export async function deleteBackups(input: { plan: Plan; destination?: string; backupIds: string[]; checkDrills?: boolean }): Promise<{
  deleted: string[];
  skipped: Array<{ backupId: string; workflowId: string }>;
}> {
  const { plan } = input;
  const store = openNamedDestination(plan, input.destination);
  const log = activityLogger({ plan: plan.name, destination: input.destination ?? PRIMARY_DESTINATION });
  const protectedIds = new Map<string, string>();
  if (input.checkDrills ?? true) {
    const drills = await findDrillTargets({ plan: plan.name });
    for (const target of drills.targets) protectedIds.set(target.backupId, target.workflowId);
  }
  const skipped = input.backupIds
    .filter((id) => protectedIds.has(id))
    .map((id) => ({ backupId: id, workflowId: protectedIds.get(id)! }));
  const toDelete = input.backupIds.filter((id) => !protectedIds.has(id));
  if (store.deleteMany && store.listAfter) {
    await deleteInBulk(store, plan.name, toDelete);
  } else {
    let done = 0;
    await mapLimit(toDelete, DELETE_CONCURRENCY, async (backupId) => {
      await deleteBackup(store, plan.name, backupId);
      if (++done % 200 === 0) heartbeat({ deleted: done });
    });
  }
  log.info({ deleted: toDelete.length, skipped: skipped.length }, 'backups deleted');
  for (const entry of skipped) log.info(entry, 'backup kept: a running drill uses it');
  return { deleted: toDelete, skipped };
}

/**
 * Returns the backup id of the plan's running backup (the workflow with the
 * plan's fixed backup id), so that a backup running longer than the grace
 * period does not lose its folder. Outside an activity there is no client,
 * and nothing is returned.
 */
async function runningBackupId(planName: string): Promise<string | undefined> {
  let client;
  try {
    client = Context.current().client;
  } catch {
    return undefined;
  }
  try {
    const handle = client.workflow.getHandle(planWorkflowId(planName, 'backup'));
    const description = await handle.describe();
    if (description.status.name !== 'RUNNING') return undefined;
    const progress = await client.withDeadline(Date.now() + DRILL_QUERY_TIMEOUT_MS, () => handle.query<{ backupId?: string }>('progress'));
    return progress.backupId;
  } catch {
    // No such workflow, or its query failed: nothing to protect beyond the grace period.
    return undefined;
  }
}

/**
 * Removes folders of backups that never committed and aborts unfinished
 * uploads. A folder that gained a manifest since it was listed is left alone.
 */
export async function removeLeftovers(input: {
  plan: Plan;
  destination?: string;
  folders: string[];
  uploads: Array<{ key: string; uploadId: string }>;
}): Promise<{ folders: string[]; uploads: number }> {
  const { plan } = input;
  const store = openNamedDestination(plan, input.destination);
  const log = activityLogger({ plan: plan.name, destination: input.destination ?? PRIMARY_DESTINATION });
  const removed: string[] = [];
  const running = await runningBackupId(plan.name);
  await mapLimit(input.folders, DELETE_CONCURRENCY, async (backupId) => {
    if (backupId === running) {
      log.warn({ backupId }, 'folder belongs to the running backup; it is kept');
      return;
    }
    if (await store.stat(manifestKey(plan.name, backupId))) {
      log.warn({ backupId }, 'folder committed since it was listed; it is kept');
      return;
    }
    await deleteFolder(store, `${plan.name}/${backupId}/`);
    removed.push(backupId);
  });
  let aborted = 0;
  if (store.abortUpload) {
    for (const upload of input.uploads) {
      await store.abortUpload(upload);
      aborted++;
    }
  }
  log.info({ folders: removed.length, uploads: aborted }, 'leftovers removed');
  return { folders: removed.sort(), uploads: aborted };
}
