// Catch-up of replicas: copies to each replica the recent backups of the
// primary destination that the replica does not have, because it was down
// or failed while they were written. backupWorkflow runs it after sealing,
// so a replica that comes back receives what it missed with the next backup.
import { Context } from '@temporalio/activity';
import { isBackupId, manifestKey } from '../common/layout';
import { MANIFEST_FILE, SIGNATURE_FILE } from '../common/manifest';
import type { Plan } from '../common/plan';
import { activityLogger } from './logging';
import { openBlobStore, type BlobStore } from './storage';

/** Newest committed backups of the primary that each run compares with every replica. */
export const CATCH_UP_DEPTH = 20;

export interface ReplicaCatchUp {
  /** The replica's name. */
  name: string;
  /** Backups copied into the replica, oldest first. */
  copied: string[];
  /** Why the catch-up of this replica stopped: the replica is down, or a copy failed. */
  error?: string;
}

function heartbeat(details: unknown): void {
  try {
    Context.current().heartbeat(details);
  } catch {
    // Not inside an activity.
  }
}

/** Returns the newest `depth` backups of the store that have a manifest, oldest first, without `exclude`. */
async function newestCommitted(store: BlobStore, planName: string, depth: number, exclude?: string): Promise<string[]> {
  const ids: string[] = [];
  for await (const name of store.listFolders(`${planName}/`)) if (isBackupId(name) && name !== exclude) ids.push(name);
  ids.sort();
  const committed: string[] = [];
  for (let index = ids.length - 1; index >= 0 && committed.length < depth; index--) {
    if (await store.stat(manifestKey(planName, ids[index]))) committed.push(ids[index]);
  }
  return committed.reverse();
}

/**
 * Copies one backup folder, byte for byte: every object but the manifest and
 * its signature, then the signature, then the manifest, so that the copy
 * becomes a backup only once it is whole, as sealing does.
 */
async function copyBackup(from: BlobStore, to: BlobStore, planName: string, backupId: string): Promise<void> {
  const folder = `${planName}/${backupId}/`;
  const keys: string[] = [];
  for await (const object of from.list(folder)) keys.push(object.key);
  const last = [`${folder}${SIGNATURE_FILE}`, `${folder}${MANIFEST_FILE}`];
  const ordered = [...keys.filter((key) => !last.includes(key)), ...last.filter((key) => keys.includes(key))];
  for (const key of ordered) {
    heartbeat({ backupId, key });
    await to.put(key, await from.get(key));
  }
}

/**
 * Activity: for each replica of the plan, copies the primary's newest
 * CATCH_UP_DEPTH committed backups that the replica has no manifest of.
 * A replica that cannot be reached, or a copy that fails, ends that
 * replica's catch-up with an error in the result; the others go on.
 * Listing the primary can still throw, and backupWorkflow catches that.
 */
export async function catchUpReplicas(input: { plan: Plan; exclude?: string; depth?: number }): Promise<ReplicaCatchUp[]> {
  const { plan } = input;
  const replicas = plan.replicas ?? [];
  if (replicas.length === 0) return [];
  const log = activityLogger({ plan: plan.name });
  const primary = openBlobStore(plan.destination);
  const recent = await newestCommitted(primary, plan.name, input.depth ?? CATCH_UP_DEPTH, input.exclude);
  const results: ReplicaCatchUp[] = [];
  for (const replica of replicas) {
    const store = openBlobStore(replica);
    const result: ReplicaCatchUp = { name: replica.name, copied: [] };
    try {
      for (const backupId of recent) {
        if (await store.stat(manifestKey(plan.name, backupId))) continue;
        await copyBackup(primary, store, plan.name, backupId);
        result.copied.push(backupId);
        log.info({ replica: replica.name, backupId }, 'backup copied to the replica that missed it');
      }
    } catch (error) {
      result.error = (error as Error).message;
      log.warn({ replica: replica.name, error: result.error }, 'replica catch-up stopped; the next backup tries again');
    }
    results.push(result);
  }
  return results;
}
