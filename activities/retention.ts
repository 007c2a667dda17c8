// Activities of retentionWorkflow. They list what one destination of a plan
// (the primary or a replica, by name) contains, decide with the plan's
// retention rules, find the backups that running restore drills use, and
// delete. Each backup's manifest goes first, so an interrupted delete leaves
// a folder that is no longer a backup, then the rest of its folder.
import { Context } from '@temporalio/activity';
import { compareStrings } from '../common/compare';
import { backupIdTime, isBackupId, manifestKey } from '../common/layout';
import { MANIFEST_FILE, statusInDestination, type Manifest } from '../common/manifest';
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
import { heartbeatIfActivity } from './heartbeat';
import { openNamedDestination, type BlobStore } from './storage';
import type { StoredObject } from './storage/blob-store';

/**
 * Backups one run deletes in a destination at most. The ids travel in
 * activity results and in the workflow's result, which Temporal limits to
 * 2 MB each by default: 10,000 ids are about 280 KB, so three destinations
 * fit. A larger backlog goes over several runs, oldest first.
 */
export const MAX_DELETES_PER_RUN = 10_000;

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
  /** Index of the folder's key set in the listing's table, or -1 when the table was full. */
  keySet: number;
}

/**
 * Distinct key sets kept from a listing. A folder's key set is its keys
 * relative to the folder, drill reports left out. Backups of one plan
 * mostly contain the same names (manifest.json, opa/edge-1.tar.gz, ...), so a
 * few sets describe thousands of folders.
 */
const MAX_KEY_SETS = 64;

/**
 * Keys that planRetention listed in the folders it decided to delete, so
 * that deleteBackups deletes without listing them again. `keySets` are relative
 * key sets; `keySetOf[i]` is the index of `deleted[i]`'s set, or -1 when it
 * is not known and the folder must be listed. `drillReports` has the
 * relative keys of drill reports, by backup id. An object written into a
 * folder after the listing stays behind in a folder without a manifest,
 * which a later run removes as a leftover.
 */
export interface FolderContents {
  keySets: string[][];
  keySetOf: number[];
  drillReports: Record<string, string[]>;
}

/** Report of planRetention: the decision, and what the folders to delete hold. */
export interface RetentionPlanReport extends RetentionReport {
  contents: FolderContents;
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

/** Folders per listing range, and listings in flight at once, when the store can list from a key. */
const FOLDERS_PER_RANGE = 500;
const LISTINGS_IN_FLIGHT = 8;

/** Interns the key sets of folders, up to MAX_KEY_SETS of them. */
class KeySetTable {
  readonly keySets: string[][] = [];
  private readonly index = new Map<string, number>();

  /** Returns the index of `keys`, or -1 when the table is full and does not hold them. */
  intern(keys: string[]): number {
    const signature = keys.join('\n');
    let found = this.index.get(signature);
    if (found === undefined && this.keySets.length < MAX_KEY_SETS) {
      found = this.keySets.length;
      this.keySets.push(keys);
      this.index.set(signature, found);
    }
    return found ?? -1;
  }
}

/**
 * Lists the plan's folders and summarises each. Keys arrive in order, so
 * each folder's keys are adjacent and memory keeps one summary per folder
 * and one copy of each distinct key set. Folders whose names are not backup
 * ids are not opa-backup's and are skipped.
 *
 * A listing returns 1,000 keys a request, one request after another. When
 * the store can list from a key, the folder names come first: one name per
 * folder, not one key per object. Ranges of folders are then listed side
 * by side, LISTINGS_IN_FLIGHT at once. On SeaweedFS, 20,000 keys took 1.7 s
 * that way and 2.9 s in one listing. The ranges meet at folder boundaries and the last one
 * has no end, so together they cover every key, including folders created
 * since the names were listed.
 */
async function summariseFolders(store: BlobStore, planName: string): Promise<{ folders: FolderSummary[]; keySets: string[][] }> {
  const planPrefix = `${planName}/`;
  const keySets = new KeySetTable();
  const progress = { listed: 0 };
  if (!store.listAfter) {
    return { folders: await summariseRange(store.list(planPrefix), planPrefix, keySets, progress), keySets: keySets.keySets };
  }
  const ids: string[] = [];
  for await (const name of store.listFolders(planPrefix)) if (isBackupId(name)) ids.push(name);
  const rangeCount = Math.min(LISTINGS_IN_FLIGHT, Math.max(1, Math.ceil(ids.length / FOLDERS_PER_RANGE)));
  // Range i lists the keys after bounds[i - 1] up to bounds[i]; the first has no start, the last no end.
  const bounds = Array.from({ length: rangeCount - 1 }, (_, index) => `${planPrefix}${ids[Math.floor(((index + 1) * ids.length) / rangeCount)]}/`);
  const ranges = await Promise.all(
    Array.from({ length: rangeCount }, (_, index) =>
      summariseRange(
        index === 0 ? store.list(planPrefix) : store.listAfter!(planPrefix, bounds[index - 1]),
        planPrefix,
        keySets,
        progress,
        bounds[index],
      ),
    ),
  );
  return { folders: ranges.flat(), keySets: keySets.keySets };
}

/** Summarises the folders of one listing, which stops at the first key after `end` when `end` is set. */
async function summariseRange(
  objects: AsyncIterable<StoredObject>,
  planPrefix: string,
  keySets: KeySetTable,
  progress: { listed: number },
  end?: string,
): Promise<FolderSummary[]> {
  const folders: FolderSummary[] = [];
  let current: FolderSummary | undefined;
  let currentKeys: string[] = [];
  const closeFolder = (): void => {
    if (current) current.keySet = keySets.intern(currentKeys);
  };
  for await (const object of objects) {
    if (end !== undefined && object.key > end) break;
    if (++progress.listed % 5000 === 0) heartbeatIfActivity({ listed: progress.listed });
    const rest = object.key.slice(planPrefix.length);
    const slash = rest.indexOf('/');
    if (slash <= 0) continue;
    const id = rest.slice(0, slash);
    const inner = rest.slice(slash + 1);
    if (!isBackupId(id)) continue;
    if (!current || current.id !== id) {
      closeFolder();
      current = { id, objects: 0, hasManifest: false, drillReports: [], lastModified: 0, keySet: -1 };
      currentKeys = [];
      folders.push(current);
    }
    current.objects++;
    current.lastModified = Math.max(current.lastModified, object.lastModified?.getTime() ?? 0);
    if (inner === MANIFEST_FILE) current.hasManifest = true;
    if (/^drills\/[^/]+\.json$/.test(inner)) current.drillReports.push(object.key);
    else currentKeys.push(inner);
  }
  closeFolder();
  return folders;
}

interface ManifestFacts {
  status?: unknown;
  failures?: Array<{ kind?: unknown }>;
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
  const status = statusInDestination(manifest as Pick<Manifest, 'status' | 'failures'>);
  return { id: backupId, time: backupIdTime(backupId)!, status, verified, references: [...new Set(references)] };
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
    heartbeatIfActivity({ manifestsRead: read.size });
  }
}

/**
 * Lists the backups, leftovers and unfinished uploads of one destination of
 * the plan (the primary unless `destination` names a replica), and decides
 * with the plan's rules on that destination's own backups. Deletes nothing.
 */
export async function planRetention(input: {
  plan: Plan;
  destination?: string;
  dryRun?: boolean;
  now?: string;
  /** @default MAX_DELETES_PER_RUN */
  maxDeletes?: number;
}): Promise<RetentionPlanReport> {
  const { plan } = input;
  const now = input.now ? new Date(input.now) : new Date();
  const store = openNamedDestination(plan, input.destination);
  const log = activityLogger({ plan: plan.name, destination: input.destination ?? PRIMARY_DESTINATION });
  const grace = parseDuration(plan.retention?.leftoverGrace ?? DEFAULT_LEFTOVER_GRACE);
  const timeZone = plan.schedule?.timezone ?? 'UTC';

  const { folders, keySets } = await summariseFolders(store, plan.name);
  const committed = folders.filter((folder) => folder.hasManifest);
  const verified = await findVerified(store, folders);
  const { decision, unreadable, manifestsRead } = await decide(store, plan, committed, verified, { now, timeZone });
  const kept = decision.decisions
    .filter((entry) => entry.keep)
    .map((entry) => ({ id: entry.id, reasons: entry.reasons.map(describeReason) }));
  for (const entry of unreadable) kept.push({ id: entry.id, reasons: ['manifest unreadable'] });
  kept.sort((a, b) => compareStrings(a.id, b.id));

  const cutoff = now.getTime() - grace;
  const isOld = (folder: FolderSummary): boolean => folder.lastModified < cutoff && (backupIdTime(folder.id)?.getTime() ?? 0) < cutoff;
  const leftovers = folders
    .filter((folder) => !folder.hasManifest && isOld(folder))
    .map((folder) => ({ id: folder.id, objects: folder.objects, lastModified: new Date(folder.lastModified).toISOString() }));
  const uncommittedRecent = folders.filter((folder) => !folder.hasManifest && !isOld(folder)).map((folder) => folder.id);

  const staleUploads: RetentionReport['staleUploads'] = [];
  if (store.listUnfinishedUploads) {
    for await (const upload of store.listUnfinishedUploads(`${plan.name}/`)) {
      if (upload.initiated && upload.initiated.getTime() < cutoff) {
        staleUploads.push({ key: upload.key, uploadId: upload.uploadId, initiated: upload.initiated.toISOString() });
      }
    }
  }

  const maxDeletes = input.maxDeletes ?? MAX_DELETES_PER_RUN;
  const deferred = Math.max(0, decision.delete.length - maxDeletes);
  const deleted = decision.delete.slice(0, maxDeletes);
  const byId = new Map(folders.map((folder) => [folder.id, folder]));
  const contents: FolderContents = { keySets: [], keySetOf: [], drillReports: {} };
  const usedKeySets = new Map<number, number>();
  for (const id of deleted) {
    const folder = byId.get(id)!;
    let index = folder.keySet;
    if (index >= 0) {
      if (!usedKeySets.has(index)) {
        usedKeySets.set(index, contents.keySets.length);
        contents.keySets.push(keySets[index]);
      }
      index = usedKeySets.get(index)!;
    }
    contents.keySetOf.push(index);
    if (folder.drillReports.length > 0) {
      contents.drillReports[id] = folder.drillReports.map((key) => key.slice(plan.name.length + id.length + 2));
    }
  }

  const report: RetentionPlanReport = {
    plan: plan.name,
    destination: store.description,
    decidedAt: now.toISOString(),
    timeZone,
    dryRun: input.dryRun ?? false,
    backups: committed.length,
    kept,
    deleted,
    ...(deferred > 0 ? { deferred } : {}),
    future: decision.future,
    unreadable,
    missingReferences: decision.missingReferences,
    unresolvedDrills: [],
    leftovers,
    ...(uncommittedRecent.length > 0 ? { uncommittedRecent } : {}),
    staleUploads,
    contents,
  };
  log.info(
    {
      backups: report.backups,
      manifestsRead,
      kept: kept.length,
      toDelete: report.deleted.length,
      deferred,
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
 * the other objects. With `contents` from planRetention, the other keys are
 * known and nothing is listed, except folders whose keys were not kept.
 * Without it, one listing starts at the oldest folder of the batch and stops
 * after the newest, skipping kept folders in that range.
 */
async function deleteInBulk(store: BlobStore, planName: string, backupIds: string[], contents?: BatchContents): Promise<void> {
  if (backupIds.length === 0) return;
  const sorted = [...backupIds].sort();
  await store.deleteMany!(sorted.map((id) => manifestKey(planName, id)));
  heartbeatIfActivity({ manifestsDeleted: sorted.length });

  const deleter = new BulkDeleter(store);
  if (contents) {
    const unknown: string[] = [];
    for (const id of sorted) {
      const entry = contents.get(id);
      if (!entry || entry.keySet === undefined) {
        unknown.push(id);
        continue;
      }
      for (const inner of [...entry.keySet, ...entry.drillReports]) {
        if (inner !== MANIFEST_FILE) await deleter.add(`${planName}/${id}/${inner}`);
      }
      if (deleter.failed) break;
    }
    if (!deleter.failed) await mapLimit(unknown, DELETE_CONCURRENCY, (id) => deleteFolder(store, `${planName}/${id}/`));
    await deleter.finish();
    return;
  }

  const wanted = new Set(sorted);
  const last = sorted[sorted.length - 1];
  const planPrefix = `${planName}/`;
  // The folder's prefix with its "/" sorts before its keys. With StartAfter
  // set to the name without "/", SeaweedFS 4.48 left that folder's keys out.
  for await (const object of store.listAfter!(planPrefix, `${planPrefix}${sorted[0]}/`)) {
    if (deleter.failed) break;
    const rest = object.key.slice(planPrefix.length);
    const id = rest.slice(0, rest.indexOf('/'));
    if (id > last) break;
    if (wanted.has(id)) await deleter.add(object.key);
  }
  await deleter.finish();
}

/** Keys of one backup folder to delete, from planRetention's listing. */
type BatchContents = Map<string, { keySet?: string[]; drillReports: string[] }>;

/** Gathers keys into DeleteObjects batches of 1,000 and keeps BULK_DELETES_IN_FLIGHT of them running. */
class BulkDeleter {
  private keys: string[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown;
  private deleted = 0;

  constructor(private readonly store: BlobStore) {}

  get failed(): boolean {
    return this.failure !== undefined;
  }

  async add(key: string): Promise<void> {
    this.keys.push(key);
    if (this.keys.length === 1000) await this.send();
  }

  async finish(): Promise<void> {
    if (this.keys.length > 0 && !this.failed) await this.send();
    await Promise.all(this.inFlight);
    if (this.failed) throw this.failure;
  }

  private async send(): Promise<void> {
    const keys = this.keys;
    this.keys = [];
    const request = this.store.deleteMany!(keys).then(
      () => {
        this.deleted += keys.length;
        heartbeatIfActivity({ objectsDeleted: this.deleted });
      },
      (error: unknown) => {
        this.failure ??= error;
      },
    );
    this.inFlight.add(request);
    void request.finally(() => this.inFlight.delete(request));
    if (this.inFlight.size >= BULK_DELETES_IN_FLIGHT) await Promise.race(this.inFlight);
  }
}

/** Pairs each backup id with its keys from FolderContents. */
function batchContents(backupIds: string[], contents: FolderContents): BatchContents {
  const batch: BatchContents = new Map();
  backupIds.forEach((id, index) => {
    const keySetIndex = contents.keySetOf[index] ?? -1;
    batch.set(id, { keySet: keySetIndex >= 0 ? contents.keySets[keySetIndex] : undefined, drillReports: contents.drillReports[id] ?? [] });
  });
  return batch;
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
export async function deleteBackups(input: {
  plan: Plan;
  destination?: string;
  backupIds: string[];
  /** What planRetention listed in these folders: `keySetOf` follows `backupIds`. */
  contents?: FolderContents;
  checkDrills?: boolean;
}): Promise<{
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
    await deleteInBulk(store, plan.name, toDelete, input.contents && batchContents(input.backupIds, input.contents));
  } else {
    let done = 0;
    await mapLimit(toDelete, DELETE_CONCURRENCY, async (backupId) => {
      await deleteBackup(store, plan.name, backupId);
      if (++done % 200 === 0) heartbeatIfActivity({ deleted: done });
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
