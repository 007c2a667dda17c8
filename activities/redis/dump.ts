// Backs up a Redis server into the blob store, in one of two modes.
//
// dumpRdb pulls a point-in-time RDB file over the replication protocol, as
// `redis-cli --rdb` does: REPLCONF capa eof, REPLCONF rdb-only 1, then SYNC on
// a raw TCP connection. The master forks, and while it prepares the snapshot
// it sends a bare "\n" about once a second as a keep-alive. The RDB then
// arrives either as `$<length>\r\n` followed by exactly that many bytes
// (disk-based replication), or, with diskless replication, as
// `$EOF:<40-byte mark>\r\n` followed by the RDB and then the mark itself. The
// bytes stream into the store through a DigestStream, so memory stays bounded
// by the socket and stream buffers whatever the RDB's size.
//
// dumpKeys serves servers that reject SYNC (SYNC renamed, as on many managed
// services). It walks every logical database with SCAN and stores each key's
// DUMP payload and remaining TTL in the format below. The result is NOT a
// point-in-time snapshot: keys written, deleted or expiring while the scan
// runs may or may not be in it, and keys of different batches are read at
// different times. restoreKeys loads such a file into a server with RESTORE.
//
// Keys format, version 1 (also in docs/redis-keys-format.md). Integers are
// big-endian and unsigned unless marked signed.
//
//   magic line   the 24 ASCII bytes "OPA-BACKUP-REDIS-KEYS 1\n", where 1 is
//                the format version
//   header       'H' (0x48), u32 length, that many bytes of UTF-8 JSON:
//                { format, version, source, redisVersion, startedAt,
//                  keyspace }, keyspace being INFO keyspace at the start
//                (db index -> key count)
//   key records  'K' (0x4B), u32 db index, u32 key length, key bytes,
//                i64 (signed) remaining TTL in ms at the time of DUMP or -1
//                for no expiry, u64 payload length, DUMP payload bytes
//   trailer      'T' (0x54), u32 length, UTF-8 JSON:
//                { records: { db index: record count }, expiredSkipped,
//                  completedAt }
//   end          nothing follows the trailer
//
// Records are grouped by database in ascending db order. SCAN may return a
// key twice while the server resizes its hash table, so a key can appear in
// more than one record; restoring with REPLACE lets the later record win. A
// file without a trailer is incomplete. A DUMP payload carries its RDB
// version and a CRC64, and RESTORE rejects payloads from a newer RDB version
// than the target server's.
import net from 'node:net';
import { PassThrough, Readable, type Writable } from 'node:stream';
import Redis from 'ioredis';
import { DigestStream } from '../digest';
import type { BlobStore } from '../storage/blob-store';

/** Length of the end-of-RDB mark of diskless replication (CONFIG_RUN_ID_SIZE in Redis). */
const EOF_MARK_LENGTH = 40;
/** Largest chunk handed to the store at once. */
const READ_CHUNK_BYTES = 64 * 1024;
/** The socket is paused while this many received bytes wait to be consumed. */
const SOCKET_HIGH_WATER_BYTES = 1024 * 1024;
/** Longest reply line accepted before the RDB body (status, error and bulk-length lines). */
const MAX_LINE_BYTES = 64 * 1024;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_IDLE_TIMEOUT_MS = 60_000;

export const KEYS_FORMAT_MAGIC = Buffer.from('OPA-BACKUP-REDIS-KEYS 1\n', 'ascii');
export const KEYS_FORMAT_NAME = 'opa-backup-redis-keys';
export const KEYS_FORMAT_VERSION = 1;
const TAG_HEADER = 0x48;
const TAG_KEY = 0x4b;
const TAG_TRAILER = 0x54;

export interface RedisDumpOptions {
  /** redis://[USER[:PASSWORD]@]HOST[:PORT]. rediss:// (TLS) is not supported yet. */
  url: string;
  /** Overrides the password in `url`. */
  password?: string;
  /** Source name, for messages. */
  source: string;
  store: BlobStore;
  key: string;
  /** Aborting closes the connection and fails the put, leaving nothing at `key`. */
  signal?: AbortSignal;
  /** Called with the number of bytes stored so far. */
  onProgress?(bytes: number): void;
}

export interface RdbDumpOptions extends RedisDumpOptions {
  /** Maximum wait for the TCP connection, in ms (default 10 000). */
  connectTimeoutMs?: number;
  /** Maximum time without a byte from the server, keep-alives included, in ms (default 60 000). */
  idleTimeoutMs?: number;
}

export interface RedisDumpResult {
  size: number;
  sha256: string;
  redisVersion: string;
  /** db index -> key count, from INFO keyspace before the dump started. */
  keyspace: Record<string, number>;
}

export interface KeysDumpOptions extends RedisDumpOptions {
  /** COUNT hint of each SCAN call (default 1000). */
  scanCount?: number;
  /** Keys per DUMP + PTTL pipeline (default 100). Peak memory is about this many times the largest DUMP payload. */
  batchSize?: number;
  /** Awaited after each SCAN call with the keys it returned, before they are dumped. */
  onScanBatch?(db: number, keys: Buffer[]): void | Promise<void>;
}

export interface KeysDumpResult extends RedisDumpResult {
  /** db index -> records written. */
  records: Record<string, number>;
  /** Keys that SCAN returned but that expired or were deleted before DUMP read them. */
  expiredSkipped: number;
}

/** Error raised when the server rejects SYNC. Keys mode (dumpKeys) works without replication. */
export class RedisSyncRejectedError extends Error {
  constructor(readonly source: string, readonly reply: string) {
    super(
      `Redis source "${source}" rejected SYNC (${reply}): the server does not allow replication, ` +
        'for example because SYNC is renamed or disabled; back this source up with mode: keys',
    );
    this.name = 'RedisSyncRejectedError';
  }
}

/** An error reply (`-ERR ...`) from the server. */
class RedisReplyError extends Error {
  constructor(readonly reply: string) {
    super(reply);
    this.name = 'RedisReplyError';
  }
}

interface RedisTarget {
  host: string;
  port: number;
  username?: string;
  password?: string;
  /** host:port, for messages. It never contains the password. */
  address: string;
}

function parseRedisUrl(url: string, password?: string): RedisTarget {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`invalid Redis URL "${url}": expected redis://HOST[:PORT]`);
  }
  if (parsed.protocol === 'rediss:') {
    throw new Error(`Redis URL ${parsed.host}: rediss:// (TLS) is not supported yet; use redis://`);
  }
  if (parsed.protocol !== 'redis:') {
    throw new Error(`invalid Redis URL scheme "${parsed.protocol}" for ${parsed.host}: expected redis://`);
  }
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  const port = parsed.port ? Number(parsed.port) : 6379;
  return {
    host,
    port,
    username: parsed.username ? decodeURIComponent(parsed.username) : undefined,
    password: password ?? (parsed.password ? decodeURIComponent(parsed.password) : undefined),
    address: `${parsed.hostname}:${port}`,
  };
}

/** Encodes a command as a RESP array of bulk strings. */
function encodeCommand(args: (string | Buffer)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = typeof arg === 'string' ? Buffer.from(arg, 'utf8') : arg;
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

/**
 * A raw TCP connection to a Redis server with a pull-based reader: hiredis
 * and ioredis cannot hand over a SYNC payload as a stream, so the replies are
 * parsed here. Received bytes queue up to SOCKET_HIGH_WATER_BYTES, and the
 * socket is paused beyond that, so a slow store slows the transfer instead of
 * filling memory.
 */
class RawRedisConnection {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;

  private constructor(
    private readonly socket: net.Socket,
    private readonly describe: string,
    private readonly idleTimeoutMs: number,
  ) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      if (this.buffered >= SOCKET_HIGH_WATER_BYTES) socket.pause();
      this.notify();
    });
    socket.on('end', () => {
      this.ended = true;
      this.notify();
    });
    socket.on('close', () => {
      this.ended = true;
      this.notify();
    });
    socket.on('error', (error) => {
      this.failure ??= error;
      this.notify();
    });
  }

  static connect(target: RedisTarget, describe: string, connectTimeoutMs: number, idleTimeoutMs: number): Promise<RawRedisConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: target.host, port: target.port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connecting to ${describe} timed out after ${connectTimeoutMs} ms`));
      }, connectTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        socket.setNoDelay(true);
        resolve(new RawRedisConnection(socket, describe, idleTimeoutMs));
      });
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(new Error(`connecting to ${describe} failed: ${error.message}`));
      });
    });
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }

  /** Closes the connection. A pending read then fails with `error`, when given. */
  close(error?: Error): void {
    if (error) this.failure ??= error;
    this.socket.destroy();
    this.notify();
  }

  send(args: (string | Buffer)[]): void {
    this.socket.write(encodeCommand(args));
  }

  /** Waits until bytes are queued. Returns false when the connection ended without more bytes. */
  private async waitForBytes(): Promise<boolean> {
    while (this.buffered === 0) {
      if (this.failure) throw new Error(`connection to ${this.describe} failed: ${this.failure.message}`);
      if (this.ended) return false;
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        timer = setTimeout(() => {
          this.failure ??= new Error(`no data for ${this.idleTimeoutMs} ms`);
          this.socket.destroy();
          resolve();
        }, this.idleTimeoutMs);
      });
      clearTimeout(timer);
    }
    return true;
  }

  /** Takes up to `max` queued bytes, waiting for some. Returns null when the connection ended. */
  async read(max: number): Promise<Buffer | null> {
    if (!(await this.waitForBytes())) return null;
    const first = this.chunks[0];
    let chunk: Buffer;
    if (first.length <= max) {
      chunk = first;
      this.chunks.shift();
    } else {
      chunk = first.subarray(0, max);
      this.chunks[0] = first.subarray(max);
    }
    this.buffered -= chunk.length;
    if (this.buffered < SOCKET_HIGH_WATER_BYTES / 2 && this.socket.isPaused()) this.socket.resume();
    return chunk;
  }

  /** Reads one line up to "\n" and returns it without "\r\n". */
  async readLine(): Promise<string> {
    const parts: Buffer[] = [];
    let length = 0;
    for (;;) {
      if (!(await this.waitForBytes())) throw new Error(`${this.describe} closed the connection`);
      const first = this.chunks[0];
      const newline = first.indexOf(0x0a);
      const end = newline >= 0 ? newline + 1 : first.length;
      const part = await this.read(end);
      parts.push(part!);
      length += part!.length;
      if (newline >= 0) break;
      if (length > MAX_LINE_BYTES) throw new Error(`${this.describe} sent a reply line longer than ${MAX_LINE_BYTES} bytes`);
    }
    return Buffer.concat(parts).toString('utf8').replace(/\r?\n$/, '');
  }

  /** Reads exactly `length` bytes, for small bulk replies. */
  async readExactly(length: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let remaining = length;
    while (remaining > 0) {
      const part = await this.read(remaining);
      if (part === null) throw new Error(`${this.describe} closed the connection in the middle of a reply`);
      parts.push(part);
      remaining -= part.length;
    }
    return Buffer.concat(parts);
  }

  /** Sends a command and reads its status, integer or bulk reply. An error reply raises RedisReplyError. */
  async command(args: (string | Buffer)[]): Promise<string> {
    this.send(args);
    const line = await this.readLine();
    if (line.startsWith('-')) throw new RedisReplyError(line.slice(1));
    if (line.startsWith('+') || line.startsWith(':')) return line.slice(1);
    if (line.startsWith('$')) {
      const length = Number(line.slice(1));
      if (length < 0) return '';
      const body = await this.readExactly(length + 2);
      return body.subarray(0, length).toString('utf8');
    }
    throw new Error(`unexpected reply to ${String(args[0])} from ${this.describe}: ${JSON.stringify(line.slice(0, 80))}`);
  }
}

/** Reads `redis_version` from INFO server text. */
function parseRedisVersion(info: string): string {
  const match = /^redis_version:(.+)$/m.exec(info);
  return match ? match[1].trim() : 'unknown';
}

/** Parses INFO keyspace text ("db3:keys=1,expires=1,avg_ttl=0") into db index -> key count. */
export function parseKeyspace(info: string): Record<string, number> {
  const keyspace: Record<string, number> = {};
  for (const match of info.matchAll(/^db(\d+):keys=(\d+)/gm)) keyspace[match[1]] = Number(match[2]);
  return keyspace;
}

function sourceLabel(source: string, target: RedisTarget): string {
  return `Redis source "${source}" (${target.address})`;
}

/**
 * Streams a point-in-time RDB of the server into `store` at `key`. A connection
 * error, a short read, an error reply or an abort fails the put, so nothing is
 * left at `key`. Raises RedisSyncRejectedError when the server rejects SYNC.
 *
 * `keyspace` and `redisVersion` come from INFO just before SYNC, so a server
 * that is written to meanwhile can hold slightly different counts in the RDB.
 */
export async function dumpRdb(options: RdbDumpOptions): Promise<RedisDumpResult> {
  const target = parseRedisUrl(options.url, options.password);
  const label = sourceLabel(options.source, target);
  const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const idleTimeoutMs = options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  let redisVersion = 'unknown';
  let keyspace: Record<string, number> = {};
  let connection: RawRedisConnection | undefined;
  let failure: Error | undefined;

  const onAbort = (): void => connection?.close(new Error('the dump was cancelled by its abort signal'));
  options.signal?.addEventListener('abort', onAbort, { once: true });

  async function* rdbBytes(): AsyncGenerator<Buffer> {
    try {
      connection = await RawRedisConnection.connect(target, 'the server', connectTimeoutMs, idleTimeoutMs);
      if (options.signal?.aborted) throw new Error('the dump was cancelled by its abort signal');
      if (target.password !== undefined) {
        const credentials = target.username ? [target.username, target.password] : [target.password];
        try {
          await connection.command(['AUTH', ...credentials]);
        } catch (error) {
          if (error instanceof RedisReplyError) throw new Error(`authentication failed: ${error.reply}`);
          throw error;
        }
      }
      redisVersion = parseRedisVersion(await connection.command(['INFO', 'server']));
      keyspace = parseKeyspace(await connection.command(['INFO', 'keyspace']));
      // Both REPLCONF options are optional: servers before 7.0 reject rdb-only
      // and then stream commands after the RDB, which are never read here.
      for (const option of [['capa', 'eof'], ['rdb-only', '1']]) {
        try {
          await connection.command(['REPLCONF', ...option]);
        } catch (error) {
          if (!(error instanceof RedisReplyError)) throw error;
        }
      }

      connection.send(['SYNC']);
      let header = '';
      // Skip the "\n" keep-alives sent while the master prepares the snapshot.
      while (header === '') header = await connection.readLine();
      if (header.startsWith('-')) throw new RedisSyncRejectedError(options.source, header.slice(1));
      if (!header.startsWith('$')) {
        throw new Error(`unexpected reply to SYNC: ${JSON.stringify(header.slice(0, 80))}`);
      }

      const checked = checkRdbMagic();
      if (header.startsWith('$EOF:')) {
        const mark = Buffer.from(header.slice(5), 'latin1');
        if (mark.length !== EOF_MARK_LENGTH) throw new Error(`invalid end-of-RDB mark in SYNC reply ${JSON.stringify(header)}`);
        for await (const chunk of readUntilMark(connection, mark)) yield checked(chunk);
      } else {
        const length = Number(header.slice(1));
        if (!Number.isSafeInteger(length) || length < 0) throw new Error(`invalid RDB length in SYNC reply ${JSON.stringify(header)}`);
        for await (const chunk of readLength(connection, length)) yield checked(chunk);
      }
      checked(Buffer.alloc(0), true);
    } catch (error) {
      failure = error instanceof RedisSyncRejectedError ? error : new Error(`${label}: RDB dump failed: ${(error as Error).message}`);
      throw failure;
    } finally {
      connection?.close();
    }
  }

  const body = Readable.from(rdbBytes(), { objectMode: false });
  const digest = new DigestStream();
  // The pipe starts reading before put() attaches its own listeners. Without
  // this listener an early failure (a refused connection, a wrong password)
  // would be an unhandled 'error' event. put() still rejects with the error.
  digest.on('error', () => undefined);
  body.on('error', (error) => digest.destroy(error));
  body.pipe(digest);
  try {
    const { size } = await options.store.put(options.key, digest, {
      contentType: 'application/octet-stream',
      signal: options.signal,
      onProgress: options.onProgress,
    });
    return { size, sha256: digest.digest(), redisVersion, keyspace };
  } catch (error) {
    body.destroy();
    throw failure ?? error;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
  }
}

/** Yields exactly `length` bytes and fails when the connection ends before them. */
async function* readLength(connection: RawRedisConnection, length: number): AsyncGenerator<Buffer> {
  let remaining = length;
  while (remaining > 0) {
    const chunk = await connection.read(Math.min(remaining, READ_CHUNK_BYTES));
    if (chunk === null) throw new Error(`connection closed after ${length - remaining} of ${length} RDB bytes`);
    remaining -= chunk.length;
    yield chunk;
  }
}

/**
 * Yields the bytes before `mark`. The last EOF_MARK_LENGTH - 1 bytes are held
 * back until more arrive, because they may be the start of the mark.
 */
async function* readUntilMark(connection: RawRedisConnection, mark: Buffer): AsyncGenerator<Buffer> {
  let tail = Buffer.alloc(0);
  let total = 0;
  for (;;) {
    const chunk = await connection.read(READ_CHUNK_BYTES);
    if (chunk === null) throw new Error(`connection closed after ${total} RDB bytes, before the end-of-RDB mark`);
    const window = tail.length > 0 ? Buffer.concat([tail, chunk]) : chunk;
    const at = window.indexOf(mark);
    if (at >= 0) {
      if (at > 0) yield window.subarray(0, at);
      return;
    }
    const keep = Math.min(EOF_MARK_LENGTH - 1, window.length);
    if (window.length > keep) {
      total += window.length - keep;
      yield window.subarray(0, window.length - keep);
    }
    tail = Buffer.from(window.subarray(window.length - keep));
  }
}

/** Creates a pass-through check that the stream starts with the RDB magic "REDIS". Call it with `end` true after the last chunk. */
function checkRdbMagic(): (chunk: Buffer, end?: boolean) => Buffer {
  const magic = Buffer.from('REDIS', 'ascii');
  let seen = Buffer.alloc(0);
  return (chunk, end = false) => {
    if (seen.length < magic.length) {
      seen = Buffer.concat([seen, chunk.subarray(0, magic.length - seen.length)]);
      const compared = Math.min(seen.length, magic.length);
      if (!seen.subarray(0, compared).equals(magic.subarray(0, compared)) || (end && seen.length < magic.length)) {
        throw new Error(`the SYNC payload is not an RDB file: it starts with ${JSON.stringify(seen.toString('latin1'))}`);
      }
    }
    return chunk;
  };
}

/** Opens an ioredis connection that fails fast instead of reconnecting: the activity's retry policy owns retries. */
async function openClient(target: RedisTarget, label: string): Promise<Redis> {
  const client = new Redis({
    host: target.host,
    port: target.port,
    username: target.username,
    password: target.password,
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    connectTimeout: DEFAULT_CONNECT_TIMEOUT_MS,
  });
  // Errors also reject the pending command. Without a listener ioredis logs
  // them to stderr. connect() rejects only with "Connection is closed", so the
  // message of the last error event names the cause.
  let lastError: Error | undefined;
  client.on('error', (error: Error) => {
    lastError = error;
  });
  try {
    await client.connect();
  } catch (error) {
    client.disconnect();
    throw new Error(`${label}: connection failed: ${(lastError ?? (error as Error)).message}`);
  }
  return client;
}

/** Writes `chunk` and waits for 'drain' when the stream's buffer is full. Rejects when the stream is destroyed. */
async function writeChunk(stream: Writable, chunk: Buffer): Promise<void> {
  if (stream.destroyed) throw new Error('the output stream was closed');
  if (stream.write(chunk)) return;
  await new Promise<void>((resolve, reject) => {
    const onDrain = (): void => {
      stream.off('close', onClose);
      resolve();
    };
    const onClose = (): void => {
      stream.off('drain', onDrain);
      reject(new Error('the output stream was closed'));
    };
    stream.once('drain', onDrain);
    stream.once('close', onClose);
  });
}

function jsonRecord(tag: number, value: unknown): Buffer {
  const json = Buffer.from(JSON.stringify(value), 'utf8');
  const head = Buffer.alloc(5);
  head[0] = tag;
  head.writeUInt32BE(json.length, 1);
  return Buffer.concat([head, json]);
}

/** Encodes the fixed part of a key record: everything but the payload bytes. */
function keyRecordHead(db: number, key: Buffer, pttl: number, payloadLength: number): Buffer {
  const head = Buffer.alloc(1 + 4 + 4 + key.length + 8 + 8);
  let offset = head.writeUInt8(TAG_KEY, 0);
  offset = head.writeUInt32BE(db, offset);
  offset = head.writeUInt32BE(key.length, offset);
  offset += key.copy(head, offset);
  offset = head.writeBigInt64BE(BigInt(pttl), offset);
  head.writeBigUInt64BE(BigInt(payloadLength), offset);
  return head;
}

/**
 * Stores every key of every logical database in the keys format (see the top
 * of this file). Not point-in-time. Keys that vanish between SCAN and DUMP
 * (expired or deleted) are skipped and counted in `expiredSkipped`.
 */
export async function dumpKeys(options: KeysDumpOptions): Promise<KeysDumpResult> {
  const target = parseRedisUrl(options.url, options.password);
  const label = sourceLabel(options.source, target);
  const scanCount = options.scanCount ?? 1000;
  const batchSize = options.batchSize ?? 100;
  const client = await openClient(target, label);
  const onAbort = (): void => client.disconnect();
  options.signal?.addEventListener('abort', onAbort, { once: true });

  const output = new PassThrough();
  const digest = new DigestStream();
  // As in dumpRdb: a failure before put() attaches its listeners must not be an unhandled 'error' event.
  digest.on('error', () => undefined);
  output.on('error', (error) => digest.destroy(error));
  output.pipe(digest);
  const records: Record<string, number> = {};
  let expiredSkipped = 0;
  let redisVersion = 'unknown';
  let keyspace: Record<string, number> = {};

  const produce = async (): Promise<void> => {
    redisVersion = parseRedisVersion(await client.info('server'));
    keyspace = parseKeyspace(await client.info('keyspace'));
    await writeChunk(output, KEYS_FORMAT_MAGIC);
    await writeChunk(
      output,
      jsonRecord(TAG_HEADER, {
        format: KEYS_FORMAT_NAME,
        version: KEYS_FORMAT_VERSION,
        source: options.source,
        redisVersion,
        startedAt: new Date().toISOString(),
        keyspace,
      }),
    );

    const databases = Object.keys(keyspace).map(Number).sort((a, b) => a - b);
    for (const db of databases) {
      await client.select(db);
      records[db] = 0;
      let cursor = '0';
      do {
        const [next, keys] = await client.scanBuffer(cursor, 'COUNT', scanCount);
        cursor = next.toString('latin1');
        await options.onScanBatch?.(db, keys);
        for (let start = 0; start < keys.length; start += batchSize) {
          const batch = keys.slice(start, start + batchSize);
          const pipeline = client.pipeline();
          for (const key of batch) pipeline.pttl(key).dumpBuffer(key);
          const replies = (await pipeline.exec()) ?? [];
          for (let index = 0; index < batch.length; index += 1) {
            const [pttlError, pttl] = replies[2 * index] ?? [new Error('missing PTTL reply'), null];
            const [dumpError, payload] = replies[2 * index + 1] ?? [new Error('missing DUMP reply'), null];
            if (pttlError) throw pttlError;
            if (dumpError) throw dumpError;
            // PTTL -2 or a nil DUMP: the key expired or was deleted after SCAN returned it.
            if (pttl === -2 || payload === null) {
              expiredSkipped += 1;
              continue;
            }
            const payloadBytes = payload as Buffer;
            await writeChunk(output, keyRecordHead(db, batch[index], pttl as number, payloadBytes.length));
            await writeChunk(output, payloadBytes);
            records[db] += 1;
          }
        }
      } while (cursor !== '0');
    }

    await writeChunk(output, jsonRecord(TAG_TRAILER, { records, expiredSkipped, completedAt: new Date().toISOString() }));
    output.end();
  };

  let failure: Error | undefined;
  const producing = produce().catch((error: Error) => {
    failure = new Error(`${label}: keys dump failed: ${error.message}`);
    output.destroy(failure);
  });
  try {
    const { size } = await options.store.put(options.key, digest, {
      contentType: 'application/octet-stream',
      signal: options.signal,
      onProgress: options.onProgress,
    });
    await producing;
    if (failure) throw failure;
    return { size, sha256: digest.digest(), redisVersion, keyspace, records, expiredSkipped };
  } catch (error) {
    output.destroy();
    await producing;
    throw failure ?? error;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    client.disconnect();
  }
}

/** Pull-based reader of exact byte counts from a stream. */
class ByteReader {
  private readonly iterator: AsyncIterator<Buffer>;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private done = false;
  offset = 0;

  constructor(stream: Readable) {
    this.iterator = stream[Symbol.asyncIterator]();
  }

  /** Returns false when the stream ended with no more bytes. */
  async hasMore(): Promise<boolean> {
    while (this.buffered === 0 && !this.done) await this.fill();
    return this.buffered > 0;
  }

  private async fill(): Promise<void> {
    const next = await this.iterator.next();
    if (next.done) {
      this.done = true;
      return;
    }
    const chunk = Buffer.isBuffer(next.value) ? next.value : Buffer.from(next.value);
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  async read(length: number, field: string): Promise<Buffer> {
    while (this.buffered < length) {
      if (this.done) throw new Error(`keys file ends at byte ${this.offset + this.buffered} inside ${field}, so the file is truncated`);
      await this.fill();
    }
    const joined = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const bytes = joined.subarray(0, length);
    const rest = joined.subarray(length);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    this.offset += length;
    return bytes;
  }
}

export interface RestoreKeysResult {
  /** The header record of the file. */
  header: Record<string, unknown>;
  /** db index -> records restored. */
  records: Record<string, number>;
}

/**
 * Reads a keys-format file and RESTOREs every record into the server at
 * `redisUrl`, with REPLACE and the TTL the key had left at dump time (so TTLs
 * restart from the restore, not from the backup). Fails when the file is
 * truncated, has no trailer, or its counts disagree with its records.
 */
export async function restoreKeys(
  stream: Readable,
  redisUrl: string,
  options: { password?: string; batchSize?: number } = {},
): Promise<RestoreKeysResult> {
  const target = parseRedisUrl(redisUrl, options.password);
  const label = `Redis server ${target.address}`;
  const batchSize = options.batchSize ?? 100;
  const reader = new ByteReader(stream);
  const magic = await reader.read(KEYS_FORMAT_MAGIC.length, 'the magic line');
  if (!magic.equals(KEYS_FORMAT_MAGIC)) {
    throw new Error(`not a keys file of version ${KEYS_FORMAT_VERSION}: it starts with ${JSON.stringify(magic.toString('latin1'))}`);
  }
  const readJson = async (tag: string): Promise<Record<string, unknown>> => {
    const length = (await reader.read(4, `the ${tag} length`)).readUInt32BE(0);
    return JSON.parse((await reader.read(length, `the ${tag}`)).toString('utf8')) as Record<string, unknown>;
  };
  if ((await reader.read(1, 'the header tag'))[0] !== TAG_HEADER) throw new Error('keys file has no header record after the magic line');
  const header = await readJson('header');

  const client = await openClient(target, label);
  const records: Record<string, number> = {};
  let selected = 0;
  let pipeline = client.pipeline();
  let pending = 0;
  let pendingBytes = 0;
  const flush = async (): Promise<void> => {
    if (pending === 0) return;
    const replies = (await pipeline.exec()) ?? [];
    for (const [error] of replies) if (error) throw new Error(`${label}: RESTORE failed: ${error.message}`);
    pipeline = client.pipeline();
    pending = 0;
    pendingBytes = 0;
  };

  try {
    let trailer: Record<string, unknown> | undefined;
    while (trailer === undefined) {
      const tag = (await reader.read(1, 'a record tag'))[0];
      if (tag === TAG_TRAILER) {
        trailer = await readJson('trailer');
        break;
      }
      if (tag !== TAG_KEY) throw new Error(`invalid record tag 0x${tag.toString(16)} at byte ${reader.offset - 1} of the keys file`);
      const db = (await reader.read(4, 'a db index')).readUInt32BE(0);
      const keyLength = (await reader.read(4, 'a key length')).readUInt32BE(0);
      const key = Buffer.from(await reader.read(keyLength, 'a key'));
      const pttl = Number((await reader.read(8, 'a TTL')).readBigInt64BE(0));
      const payloadLength = Number((await reader.read(8, 'a payload length')).readBigUInt64BE(0));
      const payload = Buffer.from(await reader.read(payloadLength, 'a DUMP payload'));
      if (db !== selected) {
        await flush();
        await client.select(db);
        selected = db;
      }
      // RESTORE takes 0 as "no expiry", so a key that PTTL saw with 0 ms left gets 1 ms.
      pipeline.restore(key, pttl < 0 ? 0 : Math.max(pttl, 1), payload, 'REPLACE');
      pending += 1;
      pendingBytes += payload.length;
      records[db] = (records[db] ?? 0) + 1;
      if (pending >= batchSize || pendingBytes >= 16 * 1024 * 1024) await flush();
    }
    await flush();
    if (await reader.hasMore()) throw new Error(`keys file has bytes after its trailer at byte ${reader.offset}`);
    const expected = (trailer.records ?? {}) as Record<string, number>;
    for (const db of new Set([...Object.keys(expected), ...Object.keys(records)])) {
      if ((expected[db] ?? 0) !== (records[db] ?? 0)) {
        throw new Error(`invalid keys file: its trailer lists ${expected[db] ?? 0} records in db ${db}, but the file contains ${records[db] ?? 0}`);
      }
    }
    return { header, records };
  } finally {
    client.disconnect();
  }
}
