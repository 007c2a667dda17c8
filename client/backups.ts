// Reads the backups of a plan from its destination. A folder without a
// manifest is not a backup (its sources may still be running, or it was
// never sealed), so it is not listed.
import { manifestKey } from '../common/layout';
import type { Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { openBlobStore, type BlobStore } from '../activities/storage';

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
}

export type BackupList = BackupSummary[] & { destination: string };

async function readManifest(store: BlobStore, key: string): Promise<Manifest> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as Manifest;
}

/** Lists the plan's sealed backups, oldest first. */
export async function listBackups(plan: Plan): Promise<BackupList> {
  const store = openBlobStore(plan.destination);
  const backups = [] as unknown as BackupList;
  backups.destination = store.description;
  for await (const backupId of store.listFolders(`${plan.name}/`)) {
    const key = manifestKey(plan.name, backupId);
    if (!(await store.stat(key))) continue;
    let manifest: Manifest;
    try {
      manifest = await readManifest(store, key);
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
