// A blob store over several destinations: the plan's destination and its
// replicas. A put streams the same bytes to every destination at once, at
// the pace of the slowest, and keeps going when one destination fails, so a
// backup survives the loss of a region. Reads try the destinations in order.
import { PassThrough, pipeline, Writable, type Readable } from 'node:stream';
import type { BlobStore, PutOptions, StoredObject } from './blob-store';

export interface NamedStore {
  name: string;
  store: BlobStore;
}

/** A put that no destination could store; the message names each destination and its error. */
export class AllDestinationsFailedError extends Error {
  constructor(
    readonly key: string,
    readonly errors: Record<string, string>,
  ) {
    super(`storing ${key} failed in every destination: ${Object.entries(errors).map(([name, message]) => `${name}: ${message}`).join('; ')}`);
    this.name = 'AllDestinationsFailedError';
  }
}

export class ReplicatedBlobStore implements BlobStore {
  /** Destinations that failed a put, by key: destination name to error message. */
  private readonly failures = new Map<string, Record<string, string>>();

  constructor(readonly members: NamedStore[]) {
    if (members.length === 0) throw new Error('a replicated store needs at least one destination');
  }

  get description(): string {
    return this.members.map((member) => `${member.name}: ${member.store.description}`).join(', ');
  }

  /** Returns the destinations that failed the put of `key`, with their errors; empty when every destination stored it. */
  failedDestinations(key: string): Record<string, string> {
    return this.failures.get(key) ?? {};
  }

  async put(key: string, body: Readable, options?: PutOptions): Promise<{ size: number }> {
    const branches = this.members.map(() => new PassThrough({ highWaterMark: 1 << 20 }));
    const live = new Set(branches);
    const fanOut = new Writable({
      highWaterMark: 1 << 20,
      write(chunk: Buffer, _encoding, callback) {
        const waits: Array<Promise<void>> = [];
        for (const branch of live) {
          if (branch.write(chunk)) continue;
          // The slowest destination sets the pace; a branch that closes (its put failed) releases the wait.
          waits.push(
            new Promise((resolve) => {
              const done = (): void => {
                branch.off('drain', done);
                branch.off('close', done);
                resolve();
              };
              branch.once('drain', done);
              branch.once('close', done);
            }),
          );
        }
        if (waits.length === 0) callback();
        else void Promise.all(waits).then(() => callback());
      },
      final(callback) {
        for (const branch of live) branch.end();
        callback();
      },
    });
    let sourceError: Error | undefined;
    pipeline(body, fanOut, (error) => {
      if (!error) return;
      sourceError = error;
      for (const branch of branches) branch.destroy(error);
    });

    const results = await Promise.allSettled(
      this.members.map(async (member, index) => {
        try {
          return await member.store.put(key, branches[index], {
            ...options,
            // Progress follows the first destination, so heartbeats count each byte once.
            onProgress: index === 0 ? options?.onProgress : undefined,
          });
        } catch (error) {
          live.delete(branches[index]);
          branches[index].destroy();
          throw error;
        }
      }),
    );
    if (sourceError) throw sourceError;
    const errors: Record<string, string> = {};
    let size: number | undefined;
    results.forEach((result, index) => {
      if (result.status === 'fulfilled') size ??= result.value.size;
      else errors[this.members[index].name] = (result.reason as Error).message;
    });
    if (size === undefined) throw new AllDestinationsFailedError(key, errors);
    if (Object.keys(errors).length > 0) this.failures.set(key, errors);
    else this.failures.delete(key);
    return { size };
  }

  /** Opens `key` from the first destination that has it. */
  async get(key: string): Promise<Readable> {
    let firstError: unknown;
    for (const member of this.members) {
      try {
        return await member.store.get(key);
      } catch (error) {
        firstError ??= error;
      }
    }
    throw firstError;
  }

  /**
   * Returns `key` as the first destination that has it stores it, or
   * undefined when a reachable destination lacks it and none has it. Throws
   * only when no destination could be asked.
   */
  async stat(key: string): Promise<StoredObject | undefined> {
    let firstError: unknown;
    let answered = false;
    for (const member of this.members) {
      try {
        const found = await member.store.stat(key);
        if (found) return found;
        answered = true;
      } catch (error) {
        firstError ??= error;
      }
    }
    if (!answered) throw firstError;
    return undefined;
  }

  /** Lists the first destination's objects. */
  list(prefix: string): AsyncIterable<StoredObject> {
    return this.members[0].store.list(prefix);
  }

  listFolders(prefix: string): AsyncIterable<string> {
    return this.members[0].store.listFolders(prefix);
  }

  /** Deletes `key` from every destination; fails only when every destination fails. */
  async delete(key: string): Promise<void> {
    const results = await Promise.allSettled(this.members.map((member) => member.store.delete(key)));
    if (results.every((result) => result.status === 'rejected')) throw (results[0] as PromiseRejectedResult).reason;
  }
}
