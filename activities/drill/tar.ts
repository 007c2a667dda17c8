// A streaming reader of gzip-compressed tar archives that extracts OPA
// bundles from backups into a scratch directory. A bundle read back from
// storage is untrusted input, so the reader accepts regular files and
// directories only, with relative paths that stay inside the directory. It
// rejects absolute paths, ".." components, symbolic and hard links, device
// files and FIFOs, and it stops at a limit on the uncompressed bytes and on
// the number of entries, so a gzip bomb fails with an error instead of
// filling the memory or the disk. Memory use is one gunzip chunk plus one
// 512-byte header, whatever the archive's size.
//
// The format is POSIX ustar (IEEE Std 1003.1-2017, "pax" section) with pax
// extended headers ("x", "g") and GNU long names ("L"), which is what
// tar-stream, GNU tar and `opa build` write.
import { mkdir, open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { createGunzip } from 'node:zlib';

const BLOCK = 512;
/** Upper bound of a pax header or GNU long name body, which the reader keeps in memory. */
const MAX_METADATA_BYTES = 1024 * 1024;

export interface ExtractLimits {
  /** Maximum uncompressed bytes of the whole archive, headers included. */
  maxBytes: number;
  /** Maximum number of entries (files and directories). */
  maxEntries: number;
}

export interface ExtractedEntry {
  /** Path relative to the extraction directory, with "/" separators. */
  name: string;
  type: 'file' | 'directory';
  size: number;
}

/** An archive that the reader rejects: unsafe, malformed or over a limit. */
export class UnsafeArchiveError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UnsafeArchiveError';
  }
}

/** Parses an octal or base-256 numeric header field. */
function parseNumber(field: Buffer, what: string): number {
  if (field[0] & 0x80) {
    // GNU base-256: a big-endian two's complement number after the marker bit.
    if (field[0] & 0x40) throw new UnsafeArchiveError(`invalid tar header: negative ${what}`);
    let value = field[0] & 0x3f;
    for (let index = 1; index < field.length; index++) value = value * 256 + field[index];
    if (!Number.isSafeInteger(value)) throw new UnsafeArchiveError(`invalid tar header: ${what} is too large`);
    return value;
  }
  const text = field.toString('latin1').replace(/\0.*$/s, '').trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new UnsafeArchiveError(`invalid tar header: ${what} "${text}" is not an octal number`);
  return parseInt(text, 8);
}

function parseString(field: Buffer): string {
  const end = field.indexOf(0);
  return field.subarray(0, end < 0 ? field.length : end).toString('utf8');
}

function checksumMatches(header: Buffer): boolean {
  const stored = parseNumber(header.subarray(148, 156), 'checksum');
  let unsigned = 0;
  for (let index = 0; index < BLOCK; index++) unsigned += index >= 148 && index < 156 ? 0x20 : header[index];
  return stored === unsigned;
}

/** Parses pax extended header records: "LENGTH KEY=VALUE\n". */
function parsePax(body: Buffer): Map<string, string> {
  const records = new Map<string, string>();
  let offset = 0;
  while (offset < body.length) {
    const space = body.indexOf(0x20, offset);
    if (space < 0) throw new UnsafeArchiveError('invalid pax header: a record has no length');
    const length = Number(body.subarray(offset, space).toString('ascii'));
    if (!Number.isInteger(length) || length <= space - offset || offset + length > body.length) {
      throw new UnsafeArchiveError('invalid pax header: a record length is out of range');
    }
    const record = body.subarray(space + 1, offset + length - 1).toString('utf8');
    const equals = record.indexOf('=');
    if (equals < 0) throw new UnsafeArchiveError('invalid pax header: a record has no "="');
    records.set(record.slice(0, equals), record.slice(equals + 1));
    offset += length;
  }
  return records;
}

/**
 * Returns the entry's path relative to the extraction directory, or throws
 * when it is absolute, contains "..", or is empty. A leading "./" is dropped.
 */
export function safeEntryPath(name: string): string {
  if (name.includes('\0')) throw new UnsafeArchiveError(`unsafe entry "${name}": the path contains a NUL byte`);
  if (name.startsWith('/')) throw new UnsafeArchiveError(`unsafe entry "${name}": absolute paths are not allowed`);
  const segments = name.split('/').filter((segment, index) => !(segment === '.' && index === 0) && segment !== '');
  if (segments.some((segment) => segment === '..')) {
    throw new UnsafeArchiveError(`unsafe entry "${name}": ".." components are not allowed`);
  }
  if (segments.some((segment) => segment === '.')) {
    throw new UnsafeArchiveError(`unsafe entry "${name}": "." components are only allowed at the start`);
  }
  return segments.join('/');
}

const REJECTED_TYPES: Record<string, string> = {
  '1': 'hard links are not allowed',
  '2': 'symbolic links are not allowed',
  '3': 'character devices are not allowed',
  '4': 'block devices are not allowed',
  '6': 'FIFOs are not allowed',
  K: 'links are not allowed',
};

/** Pulls bytes out of an async chunk iterator in exact amounts. */
class ChunkReader {
  private pending: Buffer[] = [];
  private buffered = 0;
  private done = false;
  /** Uncompressed bytes received so far. */
  total = 0;

  constructor(
    private readonly chunks: AsyncIterator<Buffer>,
    private readonly maxBytes: number,
  ) {}

  private async fill(): Promise<boolean> {
    if (this.done) return false;
    const next = await this.chunks.next();
    if (next.done) {
      this.done = true;
      return false;
    }
    this.total += next.value.length;
    if (this.total > this.maxBytes) {
      throw new UnsafeArchiveError(
        `the archive expands to more than ${this.maxBytes} bytes, the limit for a bundle; it may be a gzip bomb ` +
          '(raise OPA_BACKUP_DRILL_MAX_BUNDLE_BYTES if the bundle is genuine)',
      );
    }
    this.pending.push(next.value);
    this.buffered += next.value.length;
    return true;
  }

  /** Returns exactly `length` bytes, or fewer only at the end of the stream. */
  async read(length: number): Promise<Buffer> {
    while (this.buffered < length && (await this.fill()));
    const joined = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    const taken = joined.subarray(0, Math.min(length, joined.length));
    const rest = joined.subarray(taken.length);
    this.pending = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return taken;
  }

  /** Passes `length` bytes to `sink` in the chunks they arrived in. */
  async stream(length: number, sink: (chunk: Buffer) => Promise<void>): Promise<void> {
    let left = length;
    while (left > 0) {
      if (this.buffered === 0 && !(await this.fill())) throw new UnsafeArchiveError('the archive is truncated inside an entry');
      const chunk = this.pending.shift()!;
      const used = chunk.subarray(0, Math.min(left, chunk.length));
      const rest = chunk.subarray(used.length);
      if (rest.length > 0) this.pending.unshift(rest);
      this.buffered -= used.length;
      left -= used.length;
      await sink(used);
    }
  }
}

async function writeAll(handle: FileHandle, chunk: Buffer): Promise<void> {
  let offset = 0;
  while (offset < chunk.length) offset += (await handle.write(chunk, offset, chunk.length - offset)).bytesWritten;
}

/**
 * Extracts a gzip-compressed tar stream into `directory`, which must exist
 * and be empty. Throws UnsafeArchiveError on the first unsafe or malformed
 * entry and on a limit. The directory may then contain a part of the
 * archive, which the caller removes.
 */
export async function extractTarGz(
  input: Readable,
  directory: string,
  limits: ExtractLimits,
  signal?: AbortSignal,
): Promise<ExtractedEntry[]> {
  const gunzip = createGunzip();
  input.on('error', (error) => gunzip.destroy(error));
  input.pipe(gunzip);
  const reader = new ChunkReader(gunzip[Symbol.asyncIterator]() as AsyncIterator<Buffer>, limits.maxBytes);
  const entries: ExtractedEntry[] = [];
  const created = new Set<string>();
  let paxPath: string | undefined;
  let paxSize: number | undefined;
  let longName: string | undefined;

  const readMetadata = async (size: number, what: string): Promise<Buffer> => {
    if (size > MAX_METADATA_BYTES) throw new UnsafeArchiveError(`the archive has a ${what} of ${size} bytes, more than the ${MAX_METADATA_BYTES} allowed`);
    const body = await reader.read(size);
    if (body.length < size) throw new UnsafeArchiveError(`the archive is truncated inside a ${what}`);
    await reader.read((BLOCK - (size % BLOCK)) % BLOCK);
    return Buffer.from(body);
  };

  const ensureDirectory = async (relative: string): Promise<void> => {
    if (relative === '' || created.has(relative)) return;
    await mkdir(path.join(directory, relative), { recursive: true });
    created.add(relative);
  };

  try {
    for (;;) {
      signal?.throwIfAborted();
      const header = await reader.read(BLOCK);
      if (header.length === 0) throw new UnsafeArchiveError('the archive ends without its end-of-archive blocks');
      if (header.length < BLOCK) throw new UnsafeArchiveError('the archive is truncated inside a header');
      if (header.every((byte) => byte === 0)) break;
      if (!checksumMatches(header)) throw new UnsafeArchiveError(`invalid tar header after ${reader.total - BLOCK} bytes: checksum mismatch`);

      const type = String.fromCharCode(header[156] || 0x30);
      const size = paxSize ?? parseNumber(header.subarray(124, 136), 'size');
      const prefix = header.subarray(257, 262).toString('latin1') === 'ustar' ? parseString(header.subarray(345, 500)) : '';
      const headerName = prefix ? `${prefix}/${parseString(header.subarray(0, 100))}` : parseString(header.subarray(0, 100));

      if (type === 'x' || type === 'g' || type === 'L') {
        const body = await readMetadata(size, type === 'L' ? 'long name' : 'pax header');
        if (type === 'L') longName = parseString(body);
        if (type === 'x') {
          const records = parsePax(body);
          if (records.has('path')) paxPath = records.get('path');
          if (records.has('size')) {
            const value = records.get('size')!;
            if (!/^\d+$/.test(value) || !Number.isSafeInteger(Number(value))) throw new UnsafeArchiveError(`invalid pax size "${value}"`);
            paxSize = Number(value);
          }
        }
        continue;
      }

      const name = paxPath ?? longName ?? headerName;
      paxPath = undefined;
      paxSize = undefined;
      longName = undefined;
      if (REJECTED_TYPES[type]) throw new UnsafeArchiveError(`unsafe entry "${name}": ${REJECTED_TYPES[type]}`);
      if (!['0', '7', '5'].includes(type)) throw new UnsafeArchiveError(`unsafe entry "${name}": entry type "${type}" is not supported`);
      const relative = safeEntryPath(name);
      if (entries.length >= limits.maxEntries) {
        throw new UnsafeArchiveError(`the archive has more than ${limits.maxEntries} entries, the limit for a bundle`);
      }

      if (type === '5') {
        await ensureDirectory(relative);
        entries.push({ name: relative, type: 'directory', size: 0 });
        await reader.stream(size + ((BLOCK - (size % BLOCK)) % BLOCK), async () => undefined);
        continue;
      }
      if (relative === '') throw new UnsafeArchiveError(`unsafe entry "${name}": a file needs a name`);
      await ensureDirectory(path.posix.dirname(relative) === '.' ? '' : path.posix.dirname(relative));
      // "wx" fails on an existing path, so a second entry cannot overwrite the first.
      let handle: FileHandle;
      try {
        handle = await open(path.join(directory, relative), 'wx', 0o600);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EEXIST' || (error as NodeJS.ErrnoException).code === 'EISDIR') {
          throw new UnsafeArchiveError(`unsafe entry "${name}": the archive contains this path twice`);
        }
        throw error;
      }
      try {
        await reader.stream(size, (chunk) => writeAll(handle, chunk));
      } finally {
        await handle.close();
      }
      await reader.stream((BLOCK - (size % BLOCK)) % BLOCK, async () => undefined);
      entries.push({ name: relative, type: 'file', size });
    }
    return entries;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'Z_DATA_ERROR' || (error as NodeJS.ErrnoException).code === 'Z_BUF_ERROR') {
      throw new UnsafeArchiveError(`the bundle is not valid gzip: ${(error as Error).message}`);
    }
    throw error;
  } finally {
    input.unpipe(gunzip);
    gunzip.destroy();
    input.destroy();
  }
}
