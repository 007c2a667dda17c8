// Finds the server binaries a drill starts, and free loopback ports for them.
import { existsSync, readdirSync, realpathSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ApplicationFailure } from '@temporalio/common';
import { DRILL_TOOL_MISSING } from '../../common/failures';

/**
 * Returns the absolute path of `name` on PATH, or for PostgreSQL server
 * binaries in the newest /usr/lib/postgresql/N/bin. With `resolveLinks`,
 * links are resolved so the `postgres` user can run a binary linked from a
 * checkout it may not enter. Not for redis-server, which is a link to
 * redis-check-rdb on Debian and picks its mode from the name it runs as.
 */
export function findTool(name: string, options: { resolveLinks?: boolean } = {}): string {
  for (const directory of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(directory, name);
    if (directory && existsSync(candidate)) return options.resolveLinks ? realpathSync(candidate) : candidate;
  }
  const base = '/usr/lib/postgresql';
  if (existsSync(base)) {
    const versions = readdirSync(base)
      .filter((entry) => /^\d+$/.test(entry))
      .sort((a, b) => Number(b) - Number(a));
    for (const version of versions) {
      const candidate = path.join(base, version, 'bin', name);
      if (existsSync(candidate)) return candidate;
    }
  }
  // Non-retryable and of its own type: the drill cannot run on this worker,
  // which is no finding about the backup.
  throw ApplicationFailure.create({
    type: DRILL_TOOL_MISSING,
    nonRetryable: true,
    message: `${name} not found on the worker's PATH (${process.env.PATH ?? ''}); install it, or put scripts/setup.sh's .tools/bin on PATH, where the worker runs drills`,
  });
}

/** Returns a TCP port on 127.0.0.1 that was free a moment ago. */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (address && typeof address === 'object' ? resolve(address.port) : reject(new Error('no port assigned'))));
    });
  });
}

/** Waits `ms` milliseconds, or rejects when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
