// Catch-up of replicas: copies to each replica the recent backups of the
// primary destination that the replica does not have, because it was down
// or failed while they were written. backupWorkflow runs it after sealing,
// so a replica that comes back receives what it missed with the next backup.
import { Readable } from 'node:stream';
import { isBackupId, manifestKey } from '../common/layout';
import { MANIFEST_FILE, SIGNATURE_FILE, type Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { readAll } from './artifacts';
import { DigestStream } from './digest';
import { heartbeatIfActivity } from './heartbeat';
import { activityLogger } from './logging';
import { openBlobStore, type BlobStore } from './storage';

/**
 * Number of the primary's newest committed backups that each run compares
 * with every replica.
 * NOTE: a replica that missed more backups than this receives only the
 * newest ones; older ones need a manual copy.
 */
export const CATCH_UP_DEPTH = 20;

export interface ReplicaCatchUp {
  /** The replica's name. */
  name: string;
  /** Backups copied into the replica, oldest first. */
  copied: string[];
  /** Backups not copied because the primary's copy does not match its manifest: restore them from another destination. */
  damaged?: Array<{ backupId: string; reason: string }>;
  /** Why the catch-up of this replica stopped: the replica is down, or a copy failed. */
  error?: string;
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

/** The primary's copy of a backup does not match its manifest, so it is not copied. */
class DamagedBackupError extends Error {}

/**
 * Copies one backup folder byte for byte, with the signature and then the
 * manifest last, so that the copy becomes a backup only once it is whole.
 * Each object the manifest lists in this folder must exist in the source and
 * match its recorded size and SHA-256. Otherwise the objects copied so far
 * are removed, and DamagedBackupError names the object.
 */
async function copyBackup(from: BlobStore, to: BlobStore, planName: string, backupId: string): Promise<void> {
  const folder = `${planName}/${backupId}/`;
  const manifestBytes = await readAll(await from.get(`${folder}${MANIFEST_FILE}`));
  let manifest: Manifest;
  try {
    manifest = JSON.parse(manifestBytes.toString('utf8')) as Manifest;
  } catch (error) {
    throw new DamagedBackupError(`${folder}${MANIFEST_FILE} is not valid JSON: ${(error as Error).message}`);
  }
  const expected = new Map<string, { size: number; sha256: string }>();
  for (const artifact of manifest.artifacts ?? []) {
    if (!artifact.storedIn || artifact.storedIn === backupId) expected.set(`${folder}${artifact.key}`, artifact);
  }
  if (manifest.facts) expected.set(`${folder}${manifest.facts.key}`, manifest.facts);

  const keys: string[] = [];
  for await (const object of from.list(folder)) keys.push(object.key);
  const missing = [...expected.keys()].find((key) => !keys.includes(key));
  if (missing) throw new DamagedBackupError(`${missing} is missing, although the manifest lists it`);

  const last = [`${folder}${SIGNATURE_FILE}`, `${folder}${MANIFEST_FILE}`];
  const copied: string[] = [];
  try {
    for (const key of [...keys.filter((candidate) => !last.includes(candidate)), `${folder}${SIGNATURE_FILE}`]) {
      if (!keys.includes(key)) continue;
      heartbeatIfActivity({ backupId, key });
      const digest = new DigestStream();
      copied.push(key);
      const source = await from.get(key);
      source.on('error', (error) => digest.destroy(error));
      await to.put(key, source.pipe(digest));
      const record = expected.get(key);
      if (record && (digest.bytes !== record.size || digest.digest() !== record.sha256)) {
        throw new DamagedBackupError(
          `${key} does not match the manifest: ${digest.bytes} bytes with SHA-256 ${digest.digest()}, recorded ${record.size} bytes with ${record.sha256}`,
        );
      }
    }
    await to.put(`${folder}${MANIFEST_FILE}`, Readable.from([manifestBytes]));
  } catch (error) {
    await Promise.allSettled(copied.map((key) => to.delete(key)));
    throw error;
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
        try {
          await copyBackup(primary, store, plan.name, backupId);
        } catch (error) {
          if (!(error instanceof DamagedBackupError)) throw error;
          (result.damaged ??= []).push({ backupId, reason: error.message });
          log.warn({ replica: replica.name, backupId, error: error.message }, 'backup not copied: the primary copy does not match its manifest');
          continue;
        }
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
