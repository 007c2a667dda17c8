// Object keys of the storage layout. Keys are relative to a destination's
// prefix:
//
//   <plan>/<backup-id>/manifest.json     written last, the commit point
//   <plan>/<backup-id>/opa/<source>.tar.gz
//
// Pure code: workflows import it.

import { MANIFEST_FILE } from './manifest';

/**
 * Builds a backup id that sorts by time: the UTC start time of the workflow
 * run to the second, then a suffix of 8 characters: the milliseconds as
 * three digits, so that two runs in the same second sort by time, and the
 * last 5 hex digits of the run id, so that they differ. Run ids are UUIDv7,
 * whose trailing digits are random. Example: 20261204T194512Z-4073f9a1.
 */
export function makeBackupId(startTime: Date, runId: string): string {
  const milliseconds = String(startTime.getUTCMilliseconds()).padStart(3, '0');
  return `${secondStamp(startTime)}-${milliseconds}${runId.replace(/-/g, '').slice(-5)}`;
}

/**
 * Builds a backup id as versions before makeBackupId did: the second, then
 * the last 8 hex digits of the run id. Two runs in the same second then
 * sort at random. backupWorkflow uses it only to replay histories that
 * started with it.
 */
export function makeBackupIdBySecond(startTime: Date, runId: string): string {
  return `${secondStamp(startTime)}-${runId.replace(/-/g, '').slice(-8)}`;
}

function secondStamp(time: Date): string {
  return time.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z');
}

const BACKUP_ID_PATTERN = /^(\d{8}T\d{6}Z)-[0-9a-z]{1,32}$/;

export function isBackupId(value: string): boolean {
  return BACKUP_ID_PATTERN.test(value);
}

/** Start time encoded in a backup id. */
export function backupIdTime(backupId: string): Date | undefined {
  const match = BACKUP_ID_PATTERN.exec(backupId);
  if (!match) return undefined;
  const stamp = match[1];
  return new Date(
    `${stamp.slice(0, 4)}-${stamp.slice(4, 6)}-${stamp.slice(6, 8)}T${stamp.slice(9, 11)}:${stamp.slice(11, 13)}:${stamp.slice(13, 15)}Z`,
  );
}

export function backupFolder(plan: string, backupId: string): string {
  return `${plan}/${backupId}`;
}

export function manifestKey(plan: string, backupId: string): string {
  return `${backupFolder(plan, backupId)}/${MANIFEST_FILE}`;
}

/** Key of a PostgreSQL dump, relative to the backup folder; the database name is URI-encoded. */
export function postgresDumpKey(source: string, database: string): string {
  return `postgres/${source}/${encodeURIComponent(database)}.dump`;
}

/** Key of a source's roles and tablespaces from pg_dumpall --globals-only. */
export function postgresGlobalsKey(source: string): string {
  return `postgres/${source}/globals.sql`;
}

/** Key of a Redis dump: an RDB file, or the keys-mode stream documented in docs/redis-keys-format.md. */
export function redisKey(source: string, mode: 'rdb' | 'keys'): string {
  return `redis/${source}.${mode === 'rdb' ? 'rdb' : 'keys'}`;
}

/**
 * Key of the dump of one master of a Redis Cluster source. The host is
 * URI-encoded, so an IPv6 address stays one path segment.
 */
export function redisClusterNodeKey(source: string, host: string, port: number, mode: 'rdb' | 'keys'): string {
  return `redis/${source}/${encodeURIComponent(host)}-${port}.${mode === 'rdb' ? 'rdb' : 'keys'}`;
}

/** Key of a bundle downloaded from a bundle service or bucket, stored as it was served. */
export function servedBundleKey(source: string): string {
  return `bundle/${source}.tar.gz`;
}

/** Key of a Git repository's `git bundle` file; `git clone KEY` restores it. */
export function gitBundleKey(source: string): string {
  return `git/${source}.bundle`;
}

/** Key of an OPA bundle, relative to the backup folder. */
export function opaArtifactKey(source: string): string {
  return `opa/${source}.tar.gz`;
}
