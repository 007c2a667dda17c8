// Format checks of artifact plaintext, for verify: each reads a stream once
// and throws FormatError when the content is not what its kind promises.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
import tar from 'tar-stream';
import { createGunzip } from 'node:zlib';
import type { ArtifactRecord, OpaFacts } from '../common/manifest';

export class FormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FormatError';
  }
}

// ---------------------------------------------------------------------------
// CRC-64/Jones, as Redis computes it over RDB files (reflected, polynomial
// 0xad93d23594c935a9, initial value and final XOR 0). The 64-bit state is
// kept in two unsigned 32-bit halves because JavaScript bit operators work
// on 32 bits.
// ---------------------------------------------------------------------------

const CRC_TABLE_HIGH = new Uint32Array(256);
const CRC_TABLE_LOW = new Uint32Array(256);
{
  // The reflected polynomial 0x95ac9329ac4bc9b5.
  const polyHigh = 0x95ac9329;
  const polyLow = 0xac4bc9b5;
  for (let index = 0; index < 256; index++) {
    let high = 0;
    let low = index;
    for (let bit = 0; bit < 8; bit++) {
      const carry = low & 1;
      low = ((low >>> 1) | ((high & 1) << 31)) >>> 0;
      high = high >>> 1;
      if (carry) {
        low = (low ^ polyLow) >>> 0;
        high = (high ^ polyHigh) >>> 0;
      }
    }
    CRC_TABLE_HIGH[index] = high;
    CRC_TABLE_LOW[index] = low;
  }
}

/** Incremental CRC-64/Jones. */
export class Crc64 {
  private high = 0;
  private low = 0;

  update(bytes: Uint8Array): this {
    let high = this.high;
    let low = this.low;
    for (let index = 0; index < bytes.length; index++) {
      const entry = (low ^ bytes[index]) & 0xff;
      low = (((low >>> 8) | (high << 24)) ^ CRC_TABLE_LOW[entry]) >>> 0;
      high = ((high >>> 8) ^ CRC_TABLE_HIGH[entry]) >>> 0;
    }
    this.high = high;
    this.low = low;
    return this;
  }

  /** Returns the checksum as 16 lowercase hex digits. */
  hex(): string {
    return this.high.toString(16).padStart(8, '0') + this.low.toString(16).padStart(8, '0');
  }
}

/**
 * Checks an RDB file: the "REDIS" magic with a 4-digit version, the EOF
 * opcode 0xFF, and the trailing CRC-64 (little-endian) over everything
 * before it. A checksum of 0 means the server ran with rdbchecksum no.
 */
export async function checkRdb(stream: Readable): Promise<{ rdbVersion: number; checksum: string }> {
  const crc = new Crc64();
  // The last 8 bytes (the checksum candidates) are held back until the stream ends.
  let tail = Buffer.alloc(0);
  let head = Buffer.alloc(0);
  let lastCovered = -1;
  for await (const chunk of stream) {
    const bytes = chunk as Buffer;
    if (head.length < 9) head = Buffer.concat([head, bytes.subarray(0, 9 - head.length)]);
    const joined = tail.length > 0 ? Buffer.concat([tail, bytes]) : bytes;
    if (joined.length > 8) {
      crc.update(joined.subarray(0, joined.length - 8));
      lastCovered = joined[joined.length - 9];
      tail = Buffer.from(joined.subarray(joined.length - 8));
    } else {
      tail = Buffer.from(joined);
    }
  }
  if (head.length < 9 || head.subarray(0, 5).toString('latin1') !== 'REDIS' || !/^\d{4}$/.test(head.subarray(5, 9).toString('latin1'))) {
    throw new FormatError('not an RDB file: it does not start with "REDIS" and a 4-digit version');
  }
  if (tail.length < 8 || lastCovered !== 0xff) {
    throw new FormatError('RDB file does not end with the EOF opcode 0xFF and an 8-byte checksum');
  }
  const stored = Buffer.from(tail).reverse().toString('hex');
  const rdbVersion = Number(head.subarray(5, 9).toString('latin1'));
  if (stored !== '0000000000000000' && stored !== crc.hex()) {
    throw new FormatError(`RDB checksum mismatch: the file records ${stored}, its content has ${crc.hex()}`);
  }
  return { rdbVersion, checksum: stored };
}

// ---------------------------------------------------------------------------
// Keys-mode streams (docs/redis-keys-format.md).
// ---------------------------------------------------------------------------

/** A byte reader over an async stream that hands out exact-length pieces. */
class ByteReader {
  private buffered: Buffer[] = [];
  private available = 0;
  private readonly iterator: AsyncIterator<Buffer>;
  private ended = false;

  constructor(stream: Readable) {
    this.iterator = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  }

  /** Returns exactly `length` bytes, or undefined at a clean end of stream before the first byte. */
  async read(length: number): Promise<Buffer | undefined> {
    while (this.available < length && !this.ended) {
      const next = await this.iterator.next();
      if (next.done) this.ended = true;
      else {
        this.buffered.push(next.value);
        this.available += next.value.length;
      }
    }
    if (this.available === 0 && length > 0) return undefined;
    if (this.available < length) throw new FormatError(`stream ends ${length - this.available} bytes short of a ${length}-byte field`);
    const joined = this.buffered.length === 1 ? this.buffered[0] : Buffer.concat(this.buffered);
    const piece = joined.subarray(0, length);
    const rest = joined.subarray(length);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.available = rest.length;
    return piece;
  }

  /** Skips `length` bytes without joining them. */
  async skip(length: number): Promise<void> {
    let remaining = length;
    while (remaining > 0) {
      if (this.available === 0) {
        const next = await this.iterator.next();
        if (next.done) throw new FormatError(`stream ends ${remaining} bytes short of a ${length}-byte payload`);
        this.buffered.push(next.value);
        this.available += next.value.length;
      }
      const first = this.buffered[0];
      const taken = Math.min(first.length, remaining);
      remaining -= taken;
      this.available -= taken;
      if (taken === first.length) this.buffered.shift();
      else this.buffered[0] = first.subarray(taken);
    }
  }

  async atEnd(): Promise<boolean> {
    return (await this.read(1)) === undefined;
  }
}

const KEYS_MAGIC = 'OPA-BACKUP-REDIS-KEYS ';

/** Walks a keys-mode stream: magic line, header, key records and trailer. Returns records per database. */
export async function checkKeysStream(stream: Readable): Promise<{ records: Record<string, number> }> {
  const reader = new ByteReader(stream);
  const magic = await reader.read(KEYS_MAGIC.length + 2);
  if (!magic || !magic.toString('latin1').startsWith(KEYS_MAGIC) || magic[magic.length - 1] !== 0x0a) {
    throw new FormatError(`not a keys-mode stream: it does not start with "${KEYS_MAGIC}<version>\\n"`);
  }
  const records: Record<string, number> = {};
  let sawHeader = false;
  for (;;) {
    const tag = await reader.read(1);
    if (!tag) throw new FormatError('keys-mode stream ends without its trailer');
    const type = String.fromCharCode(tag[0]);
    if (type === 'H' || type === 'T') {
      const length = (await reader.read(4))!.readUInt32BE(0);
      const json = (await reader.read(length)) ?? Buffer.alloc(0);
      let parsed: { records?: Record<string, number> };
      try {
        parsed = JSON.parse(json.toString('utf8'));
      } catch {
        throw new FormatError(`keys-mode ${type === 'H' ? 'header' : 'trailer'} is not valid JSON`);
      }
      if (type === 'H') {
        sawHeader = true;
        continue;
      }
      if (!(await reader.atEnd())) throw new FormatError('keys-mode stream has bytes after its trailer');
      if (parsed.records) {
        for (const [database, count] of Object.entries(parsed.records)) {
          if ((records[database] ?? 0) !== count) {
            throw new FormatError(`keys-mode trailer counts ${count} records in database ${database}, the stream contains ${records[database] ?? 0}`);
          }
        }
      }
      return { records };
    }
    if (type !== 'K' || !sawHeader) throw new FormatError(`unexpected record type 0x${tag[0].toString(16)} in keys-mode stream`);
    const database = (await reader.read(4))!.readUInt32BE(0);
    const keyLength = (await reader.read(4))!.readUInt32BE(0);
    await reader.skip(keyLength + 8);
    const payloadLength = Number((await reader.read(8))!.readBigUInt64BE(0));
    await reader.skip(payloadLength);
    records[database] = (records[database] ?? 0) + 1;
  }
}

// ---------------------------------------------------------------------------
// OPA bundles: gzip-compressed ustar archives.
// ---------------------------------------------------------------------------

/**
 * Reads a bundle and checks it against the snapshot's facts: the archive
 * parses, .manifest is JSON with the recorded revision, data.json has the
 * recorded SHA-256, and each recorded policy file is present with its
 * recorded SHA-256.
 */
export async function checkOpaBundle(stream: Readable, facts: OpaFacts | undefined): Promise<{ files: number }> {
  const gunzip = createGunzip();
  const extract = tar.extract();
  // An error of the source (a digest mismatch) or of gunzip ends the walk
  // below. pipe() rather than pipeline() leaves the source open when the
  // archive ends early, so the caller can still read it to the end.
  stream.on('error', (error) => extract.destroy(error));
  gunzip.on('error', (error) => extract.destroy(error));
  stream.pipe(gunzip).pipe(extract);
  const digests = new Map<string, string>();
  let manifestText: string | undefined;
  try {
    for await (const entry of extract) {
      const name = entry.header.name.replace(/^\/+/, '');
      if (entry.header.type !== 'file') {
        entry.resume();
        continue;
      }
      const hash = createHash('sha256');
      const pieces: Buffer[] = [];
      for await (const piece of entry) {
        hash.update(piece as Buffer);
        if (name === '.manifest') pieces.push(piece as Buffer);
      }
      if (name === '.manifest') manifestText = Buffer.concat(pieces).toString('utf8');
      digests.set(name, hash.digest('hex'));
    }
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code?.startsWith('Z_') || /tar|header/i.test((error as Error).message)) {
      throw new FormatError(`bundle archive does not open: ${(error as Error).message}`);
    }
    throw error;
  }
  if (manifestText === undefined) throw new FormatError('bundle has no .manifest file');
  let manifest: { revision?: string };
  try {
    manifest = JSON.parse(manifestText);
  } catch {
    throw new FormatError('bundle .manifest is not valid JSON');
  }
  if (facts) {
    if (manifest.revision !== facts.bundleRevision) {
      throw new FormatError(`bundle .manifest has revision "${manifest.revision}", the snapshot recorded "${facts.bundleRevision}"`);
    }
    if (digests.get('data.json') !== facts.dataSha256) {
      throw new FormatError(`bundle data.json has SHA-256 ${digests.get('data.json') ?? '(absent)'}, the snapshot recorded ${facts.dataSha256}`);
    }
    for (const policy of facts.policies) {
      const actual = digests.get(policy.file);
      if (actual !== policy.sha256) {
        throw new FormatError(`bundle policy ${policy.file} (id ${policy.id}) ${actual ? `has SHA-256 ${actual}, the snapshot recorded ${policy.sha256}` : 'is missing'}`);
      }
    }
  }
  return { files: digests.size };
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/** Runs `pg_restore --list` on a custom-format dump read from `stream`; returns the number of TOC entries. */
export async function checkPgDump(stream: Readable, pgRestore = 'pg_restore'): Promise<{ entries: number }> {
  const child = spawn(pgRestore, ['--list'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  let entries = 0;
  child.stderr.setEncoding('utf8').on('data', (text: string) => {
    if (stderr.length < 4096) stderr += text;
  });
  let partial = '';
  child.stdout.setEncoding('utf8').on('data', (text: string) => {
    const lines = (partial + text).split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) if (/^\d+;/.test(line)) entries++;
  });
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', (error) => reject(new Error(`cannot run ${pgRestore}: ${error.message}; install the PostgreSQL client tools or put them on PATH`)));
    child.once('close', (code) => resolve(code));
  });
  // Awaited below; this keeps a spawn failure from counting as unhandled meanwhile.
  exited.catch(() => undefined);
  // The whole stream is read even after pg_restore stops reading (it may
  // exit once it has the table of contents), because the caller's digest
  // checks see only the bytes that pass. An error of the stream itself (a
  // digest mismatch) is the finding and wins.
  let stdinOpen = true;
  child.stdin.on('error', () => {
    stdinOpen = false;
  });
  child.stdin.on('close', () => {
    stdinOpen = false;
  });
  try {
    for await (const chunk of stream) {
      if (!stdinOpen) continue;
      if (!child.stdin.write(chunk)) {
        await new Promise<void>((resolve) => {
          const done = (): void => {
            child.stdin.off('drain', done);
            child.stdin.off('close', done);
            resolve();
          };
          child.stdin.once('drain', done);
          child.stdin.once('close', done);
        });
      }
    }
  } catch (error) {
    child.kill('SIGKILL');
    await exited.catch(() => undefined);
    throw error;
  }
  if (stdinOpen) child.stdin.end();
  const code = await exited;
  if (code !== 0) throw new FormatError(`pg_restore --list failed (exit ${code}): ${stderr.trim() || 'no message'}`);
  return { entries };
}

/** Checks the output of pg_dumpall --globals-only: its opening and closing comments. */
export async function checkGlobals(stream: Readable): Promise<void> {
  let head = '';
  let tail = '';
  for await (const chunk of stream) {
    const text = (chunk as Buffer).toString('utf8');
    if (head.length < 200) head += text.slice(0, 200);
    tail = (tail + text).slice(-200);
  }
  if (!head.includes('PostgreSQL database cluster dump') || !tail.includes('PostgreSQL database cluster dump complete')) {
    throw new FormatError('globals script lacks the opening or closing comment of pg_dumpall --globals-only; it may be cut short');
  }
}

/** Runs the format check for an artifact's kind, or returns undefined when the kind has none. */
export async function checkFormat(record: ArtifactRecord, stream: Readable): Promise<string | undefined> {
  switch (record.kind) {
    case 'opa-bundle': {
      const { files } = await checkOpaBundle(stream, record.facts as OpaFacts | undefined);
      return `bundle opens with ${files} files; revision, data.json and policies match the snapshot`;
    }
    case 'postgres-dump': {
      const { entries } = await checkPgDump(stream);
      return `pg_restore --list reads ${entries} entries`;
    }
    case 'postgres-globals':
      await checkGlobals(stream);
      return 'globals script is complete';
    case 'redis-rdb': {
      const { rdbVersion, checksum } = await checkRdb(stream);
      return checksum === '0000000000000000' ? `RDB version ${rdbVersion}, written without a checksum` : `RDB version ${rdbVersion}, checksum ${checksum} matches`;
    }
    case 'redis-keys': {
      const { records } = await checkKeysStream(stream);
      return `keys stream is complete with ${Object.values(records).reduce((sum, count) => sum + count, 0)} records`;
    }
    default:
      stream.resume();
      return undefined;
  }
}
