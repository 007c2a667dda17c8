// Helpers for restore drill tests: run a drill through Temporal, damage a
// stored backup in controlled ways (and recompute the manifest's digests so
// only the drill's semantic checks can notice), and list what a drill left
// in the process table and on disk.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import tar from 'tar-stream';
import type { DrillWorkflowInput, DrillWorkflowResult } from '../../activities/drill/types';
import type { Manifest } from '../../common/manifest';
import type { Stack } from './stack';
import { readBundle } from './bundle';

/** Runs restoreDrillWorkflow to completion and returns its result. */
export function runDrill(stack: Stack, input: DrillWorkflowInput): Promise<DrillWorkflowResult> {
  return stack.client.workflow.execute('restoreDrillWorkflow', {
    taskQueue: stack.taskQueue,
    workflowId: `drill-test-${randomBytes(4).toString('hex')}`,
    args: [input],
  });
}

export interface TarEntry {
  name: string;
  body?: Buffer;
  type?: 'file' | 'symlink' | 'link' | 'fifo' | 'character-device' | 'directory';
  linkname?: string;
}

/** Packs entries into a gzip-compressed tar archive, in memory. */
export async function packTarGz(entries: TarEntry[], level = 6): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on('data', (chunk) => chunks.push(chunk as Buffer));
    pack.on('end', resolve);
    pack.on('error', reject);
  });
  for (const entry of entries) {
    const type = entry.type ?? 'file';
    if (type === 'file') pack.entry({ name: entry.name, size: entry.body?.length ?? 0, mode: 0o644 }, entry.body ?? Buffer.alloc(0));
    else pack.entry({ name: entry.name, type, linkname: entry.linkname, mode: 0o644 });
  }
  pack.finalize();
  await done;
  return gzipSync(Buffer.concat(chunks), { level });
}

export function manifestPath(folder: string, plan: string, backupId: string): string {
  return path.join(folder, plan, backupId, 'manifest.json');
}

export function readManifestFile(folder: string, plan: string, backupId: string): Manifest {
  return JSON.parse(readFileSync(manifestPath(folder, plan, backupId), 'utf8')) as Manifest;
}

export function writeManifestFile(folder: string, plan: string, backupId: string, manifest: Manifest): void {
  writeFileSync(manifestPath(folder, plan, backupId), JSON.stringify(manifest, null, 2) + '\n');
}

/**
 * Replaces an unencrypted, uncompressed artifact's bytes and records their
 * size and SHA-256 in the manifest, as if the backup had stored them.
 */
export function replaceArtifact(folder: string, plan: string, backupId: string, key: string, bytes: Buffer): void {
  const manifest = readManifestFile(folder, plan, backupId);
  const record = manifest.artifacts.find((artifact) => artifact.key === key);
  if (!record) throw new Error(`backup ${backupId} has no artifact ${key}`);
  if (record.encryption || record.compression) throw new Error(`${key} is encoded; replaceArtifact handles plain artifacts only`);
  writeFileSync(path.join(folder, plan, record.storedIn ?? backupId, key), bytes);
  const digest = { size: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex') };
  record.size = digest.size;
  record.sha256 = digest.sha256;
  record.plaintext = digest;
  writeManifestFile(folder, plan, backupId, manifest);
}

/** Rewrites an OPA bundle of a backup: `change` edits the files (name to content) and may add or delete entries. */
export async function rewriteBundle(
  folder: string,
  plan: string,
  backupId: string,
  key: string,
  change: (files: Map<string, Buffer>) => TarEntry[] | void,
): Promise<void> {
  const bundle = await readBundle(path.join(folder, plan, backupId, key));
  const extra = change(bundle.files) ?? [];
  const entries: TarEntry[] = [...bundle.files].map(([name, body]) => ({ name, body }));
  replaceArtifact(folder, plan, backupId, key, await packTarGz([...entries, ...extra], 1));
}

/** Lists processes whose command line mentions `text`, as "pid command line". */
export function processesMentioning(text: string): string[] {
  const found: string[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const commandLine = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ').trim();
      if (commandLine.includes(text)) found.push(`${entry} ${commandLine}`);
    } catch {
      // The process exited while we looked.
    }
  }
  return found;
}

/** Lists what is left in a drill root folder and the PostgreSQL drill clusters in /dev/shm. */
export function drillLeftovers(drillRoot: string): string[] {
  const left = existsSync(drillRoot) ? readdirSync(drillRoot).map((name) => path.join(drillRoot, name)) : [];
  if (existsSync('/dev/shm')) {
    left.push(...readdirSync('/dev/shm').filter((name) => name.startsWith('opa-backup-drill-pg-')).map((name) => path.join('/dev/shm', name)));
  }
  return left;
}
