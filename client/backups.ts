// Reads the backups of a plan from its destination. A folder without a
// manifest is not a backup (its sources may still be running, or it was
// never sealed), so it is not listed.
import { isBackupId, manifestKey } from '../common/layout';
import type { Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { openDestinations, type BlobStore } from '../activities/storage';

export interface BackupSummary {
  backupId: string;
  /** "unreadable" when the manifest exists but cannot be parsed; `error` gives the reason. */
  status: Manifest['status'] | 'unreadable';
  error?: string;
  completedAt: string;
  artifacts: number;
  /** Stored bytes of all artifacts. */
  size: number;
  sources: string[];
  failures: Array<{ source: string; message: string }>;
  /** Destinations that hold the backup's manifest: "primary" and replica names. */
  destinations: string[];
}

/** The backups, the destinations' description, and the destinations that could not be listed with their errors. */
export type BackupList = BackupSummary[] & { destination: string; unreachable: Record<string, string> };

async function readManifest(store: BlobStore, key: string): Promise<Manifest> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as Manifest;
}

/**
 * Lists the plan's sealed backups, oldest first, across its destination and
 * replicas. Each backup names the destinations that hold its manifest; a
 * destination that cannot be listed is reported in `unreachable`.
 */
export async function listBackups(plan: Plan): Promise<BackupList> {
  const destinations = openDestinations(plan);
  const backups = [] as unknown as BackupList;
  backups.destination = destinations.length === 1 ? destinations[0].store.description : destinations.map((entry) => `${entry.name}: ${entry.store.description}`).join(', ');
  backups.unreachable = {};
  // Backup id to the destinations that hold its manifest, in plan order.
  const holders = new Map<string, Array<{ name: string; store: BlobStore }>>();
  for (const destination of destinations) {
    try {
      for await (const backupId of destination.store.listFolders(`${plan.name}/`)) {
        // Folders whose names are not backup ids are not opa-backup's, whatever they contain.
        if (!isBackupId(backupId) || !(await destination.store.stat(manifestKey(plan.name, backupId)))) continue;
        holders.set(backupId, [...(holders.get(backupId) ?? []), destination]);
      }
    } catch (error) {
      // A single destination fails loudly, as before replicas; with replicas the others still list.
      if (destinations.length === 1) throw error;
      backups.unreachable[destination.name] = (error as Error).message;
    }
  }
  for (const backupId of [...holders.keys()].sort()) {
    const holding = holders.get(backupId)!;
    const key = manifestKey(plan.name, backupId);
    const names = holding.map((entry) => entry.name);
    let manifest: Manifest;
    try {
      manifest = await readManifest(holding[0].store, key);
    } catch (error) {
      backups.push({
        backupId,
        status: 'unreadable',
        error: `${key}: ${(error as Error).message}`,
        completedAt: '',
        artifacts: 0,
        size: 0,
        sources: [],
        failures: [],
        destinations: names,
      });
      continue;
    }
    backups.push({
      backupId,
      status: manifest.status,
      completedAt: manifest.completedAt,
      artifacts: manifest.artifacts.length,
      size: manifest.artifacts.reduce((total, artifact) => total + artifact.size, 0),
      sources: manifest.artifacts.map((artifact) => artifact.source),
      failures: manifest.failures.map((failure) => ({ source: failure.source, message: failure.message })),
      destinations: names,
    });
  }
  return backups;
}

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}
