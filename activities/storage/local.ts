// A blob store in a local folder: the embedded default, and a target for
// mounted volumes. A put writes a temporary file next to the target, flushes
// it to disk and renames it into place, so a crash never leaves a partial
// object under the final name.
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { compareStrings } from '../../common/compare';
import {
  ByteCounter,
  checkKey,
  ObjectNotFoundError,
  type BlobStore,
  type PutOptions,
  type StoredObject,
  type UnfinishedUpload,
} from './blob-store';

/** Temporary files of unfinished puts carry this marker; listings skip them. */
const PARTIAL_MARKER = '.partial-';

export class LocalBlobStore implements BlobStore {
  readonly description: string;

  constructor(private readonly root: string) {
    this.description = `local folder ${root}`;
  }

  private file(key: string): string {
    checkKey(key);
    return path.join(this.root, ...key.split('/'));
  }

  async put(key: string, body: Readable, options: PutOptions = {}): Promise<{ size: number }> {
    const target = this.file(key);
    await mkdir(path.dirname(target), { recursive: true });
    const temporary = `${target}${PARTIAL_MARKER}${randomBytes(6).toString('hex')}`;
    const counter = new ByteCounter(options.onProgress);
    try {
      await pipeline(body, counter, createWriteStream(temporary), { signal: options.signal });
      const handle = await open(temporary, 'r');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
      const written = (await stat(temporary)).size;
      if (written !== counter.bytes) {
        throw new Error(`put of ${key} to ${this.description} wrote ${written} bytes, expected ${counter.bytes}`);
      }
      await rename(temporary, target);
    } catch (error) {
      await rm(temporary, { force: true });
      throw error;
    }
    return { size: counter.bytes };
  }

  async get(key: string): Promise<Readable> {
    const file = this.file(key);
    try {
      await stat(file);
    } catch {
      throw new ObjectNotFoundError(key, this.description);
    }
    return createReadStream(file, { highWaterMark: 1 << 20 });
  }

  async stat(key: string): Promise<StoredObject | undefined> {
    try {
      const info = await stat(this.file(key));
      return info.isFile() ? { key, size: info.size, lastModified: info.mtime } : undefined;
    } catch {
      return undefined;
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    const entries: StoredObject[] = [];
    const walk = async (directory: string, keyPrefix: string): Promise<void> => {
      let names: string[];
      try {
        names = await readdir(directory);
      } catch {
        return;
      }
      for (const name of names) {
        if (name.includes(PARTIAL_MARKER)) continue;
        const full = path.join(directory, name);
        const info = await stat(full);
        const key = keyPrefix + name;
        if (info.isDirectory()) await walk(full, `${key}/`);
        else if (key.startsWith(prefix)) entries.push({ key, size: info.size, lastModified: info.mtime });
      }
    };
    const slash = prefix.lastIndexOf('/');
    const folder = slash >= 0 ? prefix.slice(0, slash + 1) : '';
    await walk(folder ? path.join(this.root, ...folder.split('/').filter(Boolean)) : this.root, folder);
    entries.sort((a, b) => compareStrings(a.key, b.key));
    yield* entries;
  }

  async *listFolders(prefix: string): AsyncIterable<string> {
    const directory = path.join(this.root, ...prefix.split('/').filter(Boolean));
    let names: string[];
    try {
      names = await readdir(directory, { withFileTypes: true }).then((entries) =>
        entries.filter((entry) => entry.isDirectory()).map((entry) => entry.name),
      );
    } catch {
      return;
    }
    yield* names.sort();
  }

  async delete(key: string): Promise<void> {
    await rm(this.file(key), { force: true });
  }

  /** Removes the folder with everything in it, temporary files of unfinished puts included. */
  async deleteFolder(prefix: string): Promise<number> {
    const folder = prefix.replace(/\/$/, '');
    let count = 0;
    for await (const _object of this.list(`${folder}/`)) count++;
    await rm(this.file(folder), { recursive: true, force: true });
    return count;
  }

  /** Lists temporary files of puts that never renamed them into place, such as after a crash. */
  async *listUnfinishedUploads(prefix: string): AsyncIterable<UnfinishedUpload> {
    const found: UnfinishedUpload[] = [];
    const walk = async (directory: string, keyPrefix: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(directory, { withFileTypes: true });
      } catch {
        return;
      }
      for (const entry of entries) {
        const full = path.join(directory, entry.name);
        if (entry.isDirectory()) {
          await walk(full, `${keyPrefix}${entry.name}/`);
          continue;
        }
        const marker = entry.name.indexOf(PARTIAL_MARKER);
        if (marker < 0) continue;
        const key = keyPrefix + entry.name.slice(0, marker);
        if (!key.startsWith(prefix)) continue;
        const info = await stat(full).catch(() => undefined);
        if (info) found.push({ key, uploadId: entry.name, initiated: info.mtime });
      }
    };
    const slash = prefix.lastIndexOf('/');
    const folder = slash >= 0 ? prefix.slice(0, slash + 1) : '';
    await walk(folder ? path.join(this.root, ...folder.split('/').filter(Boolean)) : this.root, folder);
    found.sort((a, b) => compareStrings(a.key, b.key) || compareStrings(a.uploadId, b.uploadId));
    yield* found;
  }

  async abortUpload(upload: UnfinishedUpload): Promise<void> {
    if (!upload.uploadId.includes(PARTIAL_MARKER) || upload.uploadId.includes('/')) {
      throw new Error(`"${upload.uploadId}" is not a temporary file of an unfinished put in ${this.description}`);
    }
    await rm(path.join(path.dirname(this.file(upload.key)), upload.uploadId), { force: true });
  }
}
