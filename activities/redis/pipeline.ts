// A pipelined RESP2 connection for bulk reads such as keys-mode dumps.
//
// ioredis builds a command object, a promise and a reply conversion for every
// command, which costs more CPU than Redis itself spends on a small DUMP. This
// connection sends commands that the caller has already encoded, many per
// write, and hands each reply to the handler at the head of a FIFO queue as
// soon as it is parsed, without a per-reply promise. Bulk replies are
// subarrays of the received chunks, not copies.
//
// The consumer can pause reading (pauseReading), so a slow consumer stops the
// socket instead of filling memory. While paused, the
// server keeps the replies of commands already sent in its output buffer.
import net from 'node:net';

/** An error reply (`-ERR ...`), passed to handlers as a value so that one failed command does not end the connection. */
export class RedisErrorReply {
  constructor(readonly message: string) {}
}

export type RespValue = null | number | string | Buffer | RedisErrorReply | RespValue[];

/** Receives the replies of commands sent together, in order. */
export interface ReplyHandler {
  /** Replies still expected. The connection decrements it before each onReply call. */
  remaining: number;
  onReply(reply: RespValue): void;
  /** Called once when the connection fails before all replies arrived. */
  onError(error: Error): void;
}

const CR = 0x0d;
const EMPTY = Buffer.alloc(0);

/** Parses the ASCII integer in buffer[start, end), which may start with '-'. */
function parseInteger(buffer: Buffer, start: number, end: number): number {
  let negative = false;
  let position = start;
  if (buffer[position] === 0x2d) {
    negative = true;
    position += 1;
  }
  let value = 0;
  for (; position < end; position += 1) {
    const digit = buffer[position] - 0x30;
    if (digit < 0 || digit > 9) throw new Error(`invalid integer ${JSON.stringify(buffer.toString('latin1', start, end))} in a reply`);
    value = value * 10 + digit;
  }
  return negative ? -value : value;
}

/** Encodes a command as a RESP array of bulk strings. */
export function encodeCommand(args: Array<string | Buffer>): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = typeof arg === 'string' ? Buffer.from(arg, 'utf8') : arg;
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

export class PipelinedRedisConnection {
  /** Received bytes not parsed yet: `buffer` from `offset`, then the chunks in `incoming`. */
  private buffer: Buffer = EMPTY;
  private offset = 0;
  private incoming: Buffer[] = [];
  private incomingBytes = 0;
  /** The value of the last parseValue call that returned a position. */
  private value: RespValue = null;
  /** Absolute end of the bulk string that the last incomplete parse stopped in, or -1. */
  private neededEnd = -1;

  /** Handlers of outstanding replies from `handlerHead` on. Entries before it are done and cleared. */
  private handlers: Array<ReplyHandler | undefined> = [];
  private handlerHead = 0;
  private paused = false;
  private draining = false;
  private failure: Error | undefined;

  private constructor(
    private readonly socket: net.Socket,
    private readonly describe: string,
  ) {
    socket.on('data', (chunk: Buffer) => {
      this.incoming.push(chunk);
      this.incomingBytes += chunk.length;
      this.drain();
    });
    socket.on('error', (error) => this.fail(new Error(`connection to ${describe} failed: ${error.message}`)));
    socket.on('close', () => this.fail(new Error(`${describe} closed the connection`)));
  }

  /** Connects to host:port; `idleTimeoutMs` bounds the wait for a reply while commands are outstanding. */
  static connect(host: string, port: number, describe: string, connectTimeoutMs: number, idleTimeoutMs: number): Promise<PipelinedRedisConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connecting to ${describe} timed out after ${connectTimeoutMs} ms`));
      }, connectTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        socket.setNoDelay(true);
        const connection = new PipelinedRedisConnection(socket, describe);
        socket.setTimeout(idleTimeoutMs, () => {
          // A paused connection is waiting for its consumer, not for the server.
          if (connection.pendingHandlers() > 0 && !connection.paused) {
            connection.close(new Error(`${describe} sent no reply for ${idleTimeoutMs} ms`));
          }
        });
        resolve(connection);
      });
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(new Error(`connecting to ${describe} failed: ${error.message}`));
      });
    });
  }

  private pendingHandlers(): number {
    return this.handlers.length - this.handlerHead;
  }

  /**
   * Sends encoded commands in one write. Their replies go to `handlers` in
   * order, `remaining` replies to each.
   */
  send(commands: Buffer, ...handlers: ReplyHandler[]): void {
    if (this.failure) {
      for (const handler of handlers) handler.onError(this.failure);
      return;
    }
    this.handlers.push(...handlers);
    this.socket.write(commands);
  }

  /** Sends one command and resolves with its reply. An error reply rejects with its message. */
  command(args: Array<string | Buffer>): Promise<RespValue> {
    return new Promise((resolve, reject) => {
      this.send(encodeCommand(args), {
        remaining: 1,
        onReply: (reply) => (reply instanceof RedisErrorReply ? reject(new Error(reply.message)) : resolve(reply)),
        onError: reject,
      });
    });
  }

  /** Stops handing out replies and reading the socket until resumeReading(). */
  pauseReading(): void {
    this.paused = true;
    this.socket.pause();
  }

  resumeReading(): void {
    this.paused = false;
    this.socket.resume();
    this.drain();
  }

  /** Closes the connection; outstanding handlers get `error`, or a "closed" error. */
  close(error?: Error): void {
    this.fail(error ?? new Error(`the connection to ${this.describe} was closed`));
    this.socket.destroy();
  }

  private fail(error: Error): void {
    if (!this.failure) this.failure = error;
    const handlers = this.handlers.slice(this.handlerHead);
    this.handlers = [];
    this.handlerHead = 0;
    for (const handler of handlers) handler?.onError(this.failure);
  }

  /** Parses and dispatches every complete reply, unless paused. Re-entrant calls from handlers return at once. */
  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    try {
      while (!this.paused && !this.failure) {
        if (this.offset >= this.buffer.length) {
          if (this.incomingBytes === 0) return;
          this.buffer = this.incoming.length === 1 ? this.incoming[0] : Buffer.concat(this.incoming, this.incomingBytes);
          this.offset = 0;
          this.incoming = [];
          this.incomingBytes = 0;
        }
        this.neededEnd = -1;
        const end = this.parseValue(this.buffer, this.offset);
        if (end < 0) {
          // Join the rest with the queued chunks only once the reply can be
          // complete, so a large bulk reply is copied once, not per chunk.
          const available = this.buffer.length - this.offset;
          const needed = this.neededEnd >= 0 ? this.neededEnd - this.offset : available + 1;
          if (this.incomingBytes === 0 || available + this.incomingBytes < needed) return;
          this.incoming.unshift(this.buffer.subarray(this.offset));
          this.buffer = Buffer.concat(this.incoming, available + this.incomingBytes);
          this.offset = 0;
          this.incoming = [];
          this.incomingBytes = 0;
          continue;
        }
        this.offset = end;
        this.dispatch(this.value);
      }
    } catch (error) {
      this.close(error as Error);
    } finally {
      this.draining = false;
    }
  }

  private dispatch(reply: RespValue): void {
    const handler = this.handlers[this.handlerHead];
    if (handler === undefined) throw new Error(`${this.describe} sent a reply to no command`);
    handler.remaining -= 1;
    if (handler.remaining === 0) {
      // Clear the entry at once: a finished handler can reference a whole
      // round of keys, which must not wait for the compaction below.
      this.handlers[this.handlerHead] = undefined;
      this.handlerHead += 1;
      if (this.handlerHead > 1024) {
        this.handlers = this.handlers.slice(this.handlerHead);
        this.handlerHead = 0;
      }
    }
    handler.onReply(reply);
  }

  /** Parses one reply at `position`; returns the position after it, or -1 when it is incomplete. The value goes to this.value. */
  private parseValue(buffer: Buffer, position: number): number {
    if (position >= buffer.length) return -1;
    const lineEnd = buffer.indexOf(CR, position + 1);
    if (lineEnd < 0 || lineEnd + 1 >= buffer.length) return -1;
    switch (buffer[position]) {
      case 0x24: {
        // '$' bulk string
        const length = parseInteger(buffer, position + 1, lineEnd);
        if (length < 0) {
          this.value = null;
          return lineEnd + 2;
        }
        const start = lineEnd + 2;
        const end = start + length;
        if (end + 2 > buffer.length) {
          this.neededEnd = end + 2;
          return -1;
        }
        this.value = buffer.subarray(start, end);
        return end + 2;
      }
      case 0x3a: // ':' integer
        this.value = parseInteger(buffer, position + 1, lineEnd);
        return lineEnd + 2;
      case 0x2b: // '+' status
        this.value = buffer.toString('utf8', position + 1, lineEnd);
        return lineEnd + 2;
      case 0x2d: // '-' error
        this.value = new RedisErrorReply(buffer.toString('utf8', position + 1, lineEnd));
        return lineEnd + 2;
      case 0x2a: {
        // '*' array
        const count = parseInteger(buffer, position + 1, lineEnd);
        if (count < 0) {
          this.value = null;
          return lineEnd + 2;
        }
        const items: RespValue[] = new Array<RespValue>(count);
        let next = lineEnd + 2;
        for (let index = 0; index < count; index += 1) {
          next = this.parseValue(buffer, next);
          if (next < 0) return -1;
          items[index] = this.value;
        }
        this.value = items;
        return next;
      }
      default:
        throw new Error(`${this.describe} sent an invalid reply starting with ${JSON.stringify(buffer.toString('latin1', position, Math.min(lineEnd, position + 40)))}`);
    }
  }
}
