// Backs up a Redis server into the blob store, in one of two modes.
//
// dumpRdb pulls a point-in-time RDB file over the replication protocol, as
// `redis-cli --rdb` does: REPLCONF capa eof, REPLCONF rdb-only 1, then SYNC on
// a raw TCP connection. The master forks, and while it prepares the snapshot
// it sends a bare "\n" about once a second as a keep-alive. The RDB then
// arrives either as `$<length>\r\n` followed by exactly that many bytes
// (disk-based replication), or, with diskless replication, as
// `$EOF:<40-byte mark>\r\n` followed by the RDB and then the mark itself. The
// bytes stream into the store in chunks of about 1 MB, hashed on the way, so
// memory stays bounded by the socket and stream buffers whatever the RDB's size.
//
// dumpKeys serves servers that reject SYNC (SYNC renamed, as on many managed
// services). It walks every logical database with SCAN and stores each key's
// DUMP payload and remaining TTL in the format below, over a pipelined RESP
// connection (pipeline.ts) that keeps the next round of commands queued at the
// server while this process encodes the replies of the current one. The result is NOT a
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
import { createHash } from 'node:crypto';
import net from 'node:net';
import { PassThrough, Readable, type Writable } from 'node:stream';
import Redis from 'ioredis';
import { DigestStream } from '../digest';
import { encodeCommand, PipelinedRedisConnection, RedisErrorReply, type ReplyHandler } from './pipeline';
import type { BlobStore } from '../storage/blob-store';

/** Length of the end-of-RDB mark of diskless replication (CONFIG_RUN_ID_SIZE in Redis). */
const EOF_MARK_LENGTH = 40;
/** Largest chunk read from the connection at once. */
const READ_CHUNK_BYTES = 64 * 1024;
/** Chunks of at least this size go to the store, except the last. */
const RDB_WRITE_CHUNK_BYTES = 1024 * 1024;
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
  /**
   * Maximum keys per round of PTTL + DUMP commands sent in one write (default
   * 1000). Rounds shrink below it when records are large (TARGET_BYTES_IN_FLIGHT).
   */
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

export interface RedisTarget {
  host: string;
  port: number;
  username?: string;
  password?: string;
  /** host:port, for messages. It never contains the password. */
  address: string;
}

export function parseRedisUrl(url: string, password?: string): RedisTarget {
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

export function sourceLabel(source: string, target: RedisTarget): string {
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
      const chunks = header.startsWith('$EOF:') ? readUntilMark(connection, endMark(header)) : readLength(connection, rdbLength(header));
      for await (const chunk of coalesce(chunks, RDB_WRITE_CHUNK_BYTES)) {
        hash.update(checked(chunk));
        yield chunk;
      }
      checked(Buffer.alloc(0), true);
    } catch (error) {
      failure = error instanceof RedisSyncRejectedError ? error : new Error(`${label}: RDB dump failed: ${(error as Error).message}`);
      throw failure;
    } finally {
      connection?.close();
    }
  }

  // The digest is computed in the generator rather than in a Transform
  // stream, which saves one stream hop per chunk. Readable.from starts the
  // generator only when put() reads, so nothing fails before put() listens.
  const hash = createHash('sha256');
  const body = Readable.from(rdbBytes(), { objectMode: false });
  try {
    const { size } = await options.store.put(options.key, body, {
      contentType: 'application/octet-stream',
      signal: options.signal,
      onProgress: options.onProgress,
    });
    return { size, sha256: hash.digest('hex'), redisVersion, keyspace };
  } catch (error) {
    body.destroy();
    throw failure ?? error;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
  }
}

/**
 * Joins chunks until at least `minBytes` are collected, then yields them as
 * one buffer, and yields the rest at the end. The socket delivers chunks of
 * about 16 to 64 KB, and each chunk costs a stream hop, a digest call and a
 * file write downstream, so one copy into larger chunks is cheaper.
 */
async function* coalesce(chunks: AsyncIterable<Buffer>, minBytes: number): AsyncGenerator<Buffer> {
  let parts: Buffer[] = [];
  let collected = 0;
  for await (const chunk of chunks) {
    parts.push(chunk);
    collected += chunk.length;
    if (collected >= minBytes) {
      yield parts.length === 1 ? parts[0] : Buffer.concat(parts, collected);
      parts = [];
      collected = 0;
    }
  }
  if (collected > 0) yield parts.length === 1 ? parts[0] : Buffer.concat(parts, collected);
}

/** Returns the end-of-RDB mark of a `$EOF:<mark>` SYNC reply. */
function endMark(header: string): Buffer {
  const mark = Buffer.from(header.slice(5), 'latin1');
  if (mark.length !== EOF_MARK_LENGTH) throw new Error(`invalid end-of-RDB mark in SYNC reply ${JSON.stringify(header)}`);
  return mark;
}

/** Returns the RDB length of a `$<length>` SYNC reply. */
function rdbLength(header: string): number {
  const length = Number(header.slice(1));
  if (!Number.isSafeInteger(length) || length < 0) throw new Error(`invalid RDB length in SYNC reply ${JSON.stringify(header)}`);
  return length;
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
 * Yields the bytes before `mark`. Each received chunk is held back until the
 * next one arrives, because the mark may start in it. The chunks are yielded
 * as they were received: only the at most 2 * (EOF_MARK_LENGTH - 1) bytes
 * around each chunk boundary are copied to search for a mark that straddles
 * it.
 */
async function* readUntilMark(connection: RawRedisConnection, mark: Buffer): AsyncGenerator<Buffer> {
  let heldBack: Buffer = Buffer.alloc(0);
  let total = 0;
  for (;;) {
    const chunk = await connection.read(READ_CHUNK_BYTES);
    if (chunk === null) throw new Error(`connection closed after ${total + heldBack.length} RDB bytes, before the end-of-RDB mark`);
    if (heldBack.length < EOF_MARK_LENGTH || chunk.length < EOF_MARK_LENGTH) {
      // Small pieces are joined, so the boundary search below always has a
      // whole mark's length on both sides.
      heldBack = Buffer.concat([heldBack, chunk]);
      const at = heldBack.indexOf(mark);
      if (at >= 0) {
        if (at > 0) yield heldBack.subarray(0, at);
        return;
      }
      if (heldBack.length > READ_CHUNK_BYTES) {
        // Many small pieces in a row: pass on all but a possible mark start.
        const keep = EOF_MARK_LENGTH - 1;
        yield heldBack.subarray(0, heldBack.length - keep);
        total += heldBack.length - keep;
        heldBack = Buffer.from(heldBack.subarray(heldBack.length - keep));
      }
      continue;
    }
    const heldTail = heldBack.subarray(heldBack.length - (EOF_MARK_LENGTH - 1));
    const boundary = Buffer.concat([heldTail, chunk.subarray(0, EOF_MARK_LENGTH - 1)]);
    const straddling = boundary.indexOf(mark);
    if (straddling >= 0) {
      yield heldBack.subarray(0, heldBack.length - heldTail.length + straddling);
      return;
    }
    const at = chunk.indexOf(mark);
    yield heldBack;
    total += heldBack.length;
    if (at >= 0) {
      if (at > 0) yield chunk.subarray(0, at);
      return;
    }
    heldBack = chunk;
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
export async function openClient(target: RedisTarget, label: string): Promise<Redis> {
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

/** Size of the buffers that key records are encoded into before they go to the output stream. */
const OUTPUT_CHUNK_BYTES = 1024 * 1024;
/** The output stream buffers up to this many bytes; beyond it the connection stops reading until 'drain'. */
const OUTPUT_HIGH_WATER_BYTES = 4 * 1024 * 1024;
/**
 * Target for the reply bytes of DUMP commands sent but not yet read: the
 * server keeps them in its output buffer while this process is paused. The
 * keys per round follow from the average record size seen so far, so this is
 * an estimate, not a hard limit.
 */
const TARGET_BYTES_IN_FLIGHT = 32 * 1024 * 1024;
/** Keys in the first round of a database, before any record size is known. */
const INITIAL_ROUND_KEYS = 64;
/**
 * Rounds of PTTL + DUMP sent and not yet fully read: one being read, the
 * others queued at the server, so Redis has work while this process catches up.
 */
const MAX_ROUNDS_IN_FLIGHT = 3;
/** Bytes of a key record besides the key and the payload: tag, db, key length, TTL, payload length. */
const RECORD_FIXED_BYTES = 1 + 4 + 4 + 8 + 8;
const PTTL_PREFIX = Buffer.from('*2\r\n$4\r\nPTTL\r\n$', 'latin1');
const DUMP_PREFIX = Buffer.from('*2\r\n$4\r\nDUMP\r\n$', 'latin1');

/** Writes a signed 64-bit big-endian integer, two's complement, for integers within ±2^53 and without a BigInt. */
function writeInt64(buffer: Buffer, value: number, offset: number): void {
  const high = Math.floor(value / 0x1_0000_0000);
  buffer.writeInt32BE(high, offset);
  buffer.writeUInt32BE(value - high * 0x1_0000_0000, offset + 4);
}

/**
 * Encodes key records into large chunks and writes them to the output. When
 * the output's buffer is full it pauses the connection until 'drain', so the
 * memory this process uses for records stays near OUTPUT_HIGH_WATER_BYTES
 * plus one chunk, whatever the number of keys in flight.
 */
class RecordWriter {
  private chunk = Buffer.allocUnsafe(OUTPUT_CHUNK_BYTES);
  private used = 0;
  private waitingForDrain = false;

  constructor(
    private readonly output: Writable,
    private readonly connection: PipelinedRedisConnection,
  ) {}

  add(db: number, key: Buffer, pttl: number, payload: Buffer): void {
    const total = RECORD_FIXED_BYTES + key.length + payload.length;
    if (this.used + total > this.chunk.length) this.flush();
    if (total > this.chunk.length) {
      // A large record goes out as it is. The payload is a subarray of a
      // received chunk, which nothing else writes to.
      this.write(keyRecordHead(db, key, pttl, payload.length));
      this.write(payload);
      return;
    }
    const chunk = this.chunk;
    let offset = this.used;
    chunk[offset] = TAG_KEY;
    chunk.writeUInt32BE(db, offset + 1);
    chunk.writeUInt32BE(key.length, offset + 5);
    offset += 9;
    offset += key.copy(chunk, offset);
    writeInt64(chunk, pttl, offset);
    writeInt64(chunk, payload.length, offset + 8);
    offset += 16;
    offset += payload.copy(chunk, offset);
    this.used = offset;
  }

  flush(): void {
    if (this.used === 0) return;
    this.write(this.chunk.subarray(0, this.used));
    this.chunk = Buffer.allocUnsafe(OUTPUT_CHUNK_BYTES);
    this.used = 0;
  }

  private write(bytes: Buffer): void {
    if (this.output.write(bytes) || this.waitingForDrain) return;
    this.waitingForDrain = true;
    this.connection.pauseReading();
    this.output.once('drain', () => {
      this.waitingForDrain = false;
      this.connection.resumeReading();
    });
  }
}

/** Returns the number of decimal digits of a non-negative integer. */
function decimalDigits(value: number): number {
  let digits = 1;
  for (let rest = value; rest >= 10; rest = Math.floor(rest / 10)) digits += 1;
  return digits;
}

/** Writes `value` in decimal ASCII at `offset` and returns the offset after it. */
function writeDecimal(buffer: Buffer, value: number, offset: number): number {
  const end = offset + decimalDigits(value);
  let rest = value;
  for (let position = end - 1; position >= offset; position -= 1) {
    buffer[position] = 0x30 + (rest % 10);
    rest = Math.floor(rest / 10);
  }
  return end;
}

/** Encodes `first` (when given), then PTTL and DUMP of each key, as one buffer for one write. */
function encodeRound(first: Buffer | undefined, keys: Buffer[]): Buffer {
  let size = first?.length ?? 0;
  for (const key of keys) size += 2 * (PTTL_PREFIX.length + decimalDigits(key.length) + key.length + 4);
  const commands = Buffer.allocUnsafe(size);
  let offset = first ? first.copy(commands, 0) : 0;
  for (const key of keys) {
    for (const prefix of [PTTL_PREFIX, DUMP_PREFIX]) {
      offset += prefix.copy(commands, offset);
      offset = writeDecimal(commands, key.length, offset);
      commands[offset] = 0x0d;
      commands[offset + 1] = 0x0a;
      offset += 2;
      offset += key.copy(commands, offset);
      commands[offset] = 0x0d;
      commands[offset + 1] = 0x0a;
      offset += 2;
    }
  }
  return commands;
}

/** Formats a key name for messages: printable ASCII as it is, anything else as hex. */
function describeKey(key: Buffer): string {
  return /^[\x20-\x7e]*$/.test(key.toString('latin1')) ? JSON.stringify(key.toString('latin1')) : `0x${key.toString('hex')}`;
}

interface DatabaseDump {
  records: number;
  expiredSkipped: number;
}

/**
 * Dumps one logical database, already selected on `connection`, in rounds.
 * Each round is one write: SCAN for the next cursor first, then PTTL and DUMP
 * of the keys the previous SCAN returned. As soon as a round's SCAN reply
 * arrives the next round is sent, so the server works on it while this
 * process encodes the replies of the current one. At most
 * MAX_ROUNDS_IN_FLIGHT rounds are outstanding.
 */
async function dumpDatabase(
  connection: PipelinedRedisConnection,
  writer: RecordWriter,
  db: number,
  options: { scanCount: number; batchSize: number; onScanBatch?: KeysDumpOptions['onScanBatch'] },
): Promise<DatabaseDump> {
  const result: DatabaseDump = { records: 0, expiredSkipped: 0 };
  const scanCount = String(options.scanCount);
  let recordBytes = 0;
  let pending: Buffer[] = [];
  let pendingIndex = 0;
  let cursor = '0';
  let scanDone = false;
  let roundKeys = Math.min(options.batchSize, INITIAL_ROUND_KEYS);
  const rounds: Array<Promise<void>> = [];

  const sendRound = (scanCursor: string | undefined, keys: Buffer[]): Promise<[string, Buffer[]]> | undefined => {
    let scanCommand: Buffer | undefined;
    let scanReply: Promise<[string, Buffer[]]> | undefined;
    const handlers: ReplyHandler[] = [];
    if (scanCursor !== undefined) {
      scanCommand = encodeCommand(['SCAN', scanCursor, 'COUNT', scanCount]);
      scanReply = new Promise((resolve, reject) => {
        handlers.push({
          remaining: 1,
          onReply: (reply) => {
            if (reply instanceof RedisErrorReply) {
              reject(new Error(`SCAN in db ${db} failed: ${reply.message}`));
              return;
            }
            const [next, found] = reply as [Buffer, Buffer[]];
            resolve([next.toString('latin1'), found]);
          },
          onError: reject,
        });
      });
    }
    if (keys.length > 0) {
      let keyIndex = 0;
      let pttl = 0;
      const round = new Promise<void>((resolve, reject) => {
        const handler: ReplyHandler = {
          remaining: 2 * keys.length,
          onReply: (reply) => {
            const isPttl = handler.remaining % 2 === 1;
            if (reply instanceof RedisErrorReply) {
              // NOTE: in a cluster, a key of a slot that is migrating away
              // returns -ASK here, and the dump fails and is retried.
              const command = isPttl ? 'PTTL' : 'DUMP';
              connection.close(new Error(`${command} of key ${describeKey(keys[keyIndex])} in db ${db} failed: ${reply.message}`));
              return;
            }
            if (isPttl) {
              pttl = reply as number;
              return;
            }
            const key = keys[keyIndex];
            keyIndex += 1;
            // PTTL -2 or a nil DUMP: the key expired or was deleted after SCAN returned it.
            if (pttl === -2 || reply === null) {
              result.expiredSkipped += 1;
            } else {
              const payload = reply as Buffer;
              writer.add(db, key, pttl, payload);
              result.records += 1;
              recordBytes += RECORD_FIXED_BYTES + key.length + payload.length;
            }
            if (handler.remaining === 0) resolve();
          },
          onError: reject,
        };
        handlers.push(handler);
      });
      // A failed round also fails the connection, and with it the SCAN reply
      // or the round that the loop awaits next, so this rejection is reported there.
      round.catch(() => undefined);
      rounds.push(round);
    }
    connection.send(encodeRound(scanCommand, keys), ...handlers);
    return scanReply;
  };

  let scanReply = sendRound(cursor, []);
  for (;;) {
    if (scanReply) {
      const [next, found] = await scanReply;
      cursor = next;
      scanDone = cursor === '0';
      await options.onScanBatch?.(db, found);
      pending = pendingIndex > 0 ? pending.slice(pendingIndex).concat(found) : pending.concat(found);
      pendingIndex = 0;
    }
    const remaining = pending.length - pendingIndex;
    if (remaining === 0 && scanDone) break;
    while (rounds.length >= MAX_ROUNDS_IN_FLIGHT) await rounds.shift();
    if (result.records > 0) {
      const averageRecordBytes = recordBytes / result.records;
      roundKeys = Math.max(1, Math.min(options.batchSize, Math.floor(TARGET_BYTES_IN_FLIGHT / MAX_ROUNDS_IN_FLIGHT / averageRecordBytes)));
    }
    const take = Math.min(remaining, roundKeys);
    const keys = pending.slice(pendingIndex, pendingIndex + take);
    pendingIndex += take;
    const scanNext = !scanDone && remaining - take < roundKeys;
    scanReply = sendRound(scanNext ? cursor : undefined, keys);
  }
  for (const round of rounds) await round;
  return result;
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
  const batchSize = options.batchSize ?? 1000;
  let connection: PipelinedRedisConnection | undefined;
  const onAbort = (): void => connection?.close(new Error('the dump was cancelled by its abort signal'));
  options.signal?.addEventListener('abort', onAbort, { once: true });

  const output = new PassThrough({ highWaterMark: OUTPUT_HIGH_WATER_BYTES });
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
    connection = await PipelinedRedisConnection.connect(target.host, target.port, 'the server', DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS);
    const open = connection;
    if (options.signal?.aborted) throw new Error('the dump was cancelled by its abort signal');
    // A failed put closes the output; a connection paused for 'drain' would wait forever.
    output.once('close', () => open.close(new Error('the output stream was closed')));
    if (target.password !== undefined) {
      const credentials = target.username ? [target.username, target.password] : [target.password];
      await open.command(['AUTH', ...credentials]).catch((error: Error) => {
        throw new Error(`authentication failed: ${error.message}`);
      });
    }
    redisVersion = parseRedisVersion(String(await open.command(['INFO', 'server'])));
    keyspace = parseKeyspace(String(await open.command(['INFO', 'keyspace'])));
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

    const writer = new RecordWriter(output, open);
    const databases = Object.keys(keyspace).map(Number).sort((a, b) => a - b);
    for (const db of databases) {
      await open.command(['SELECT', String(db)]);
      const dumped = await dumpDatabase(open, writer, db, { scanCount, batchSize, onScanBatch: options.onScanBatch });
      records[db] = dumped.records;
      expiredSkipped += dumped.expiredSkipped;
    }
    writer.flush();

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
    // When the put failed first, its error names the cause, and the producer
    // then fails only because the output closed.
    const producerFailedFirst = failure !== undefined;
    output.destroy();
    await producing;
    throw producerFailedFirst ? failure! : error;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    connection?.close();
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
