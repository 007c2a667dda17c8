// The blob store: where artifacts and manifests live. Two implementations
// share this interface: S3 (and S3-compatible services) and a local folder.
import { Transform, type Readable, type TransformCallback } from 'node:stream';

export interface StoredObject {
  /** Key relative to the store's root or prefix. */
  key: string;
  size: number;
  lastModified?: Date;
}

export interface PutOptions {
  contentType?: string;
  signal?: AbortSignal;
  /** Called as bytes are written, for heartbeats. */
  onProgress?: (bytesWritten: number) => void;
}

export interface BlobStore {
  /** Location of the store, for messages: "local folder /srv/backups" or "s3://bucket/prefix". */
  readonly description: string;

  /**
   * Streams `body` to `key` and returns the number of bytes stored. The object
   * appears at `key` only once it is complete, so a reader never sees half an
   * object. A failed or cancelled put leaves nothing at `key`. Writing an
   * existing key replaces it.
   */
  put(key: string, body: Readable, options?: PutOptions): Promise<{ size: number }>;

  /** Opens an object for reading; throws ObjectNotFoundError when it does not exist. */
  get(key: string): Promise<Readable>;

  /** Returns the object's size and time, or undefined when it does not exist. */
  stat(key: string): Promise<StoredObject | undefined>;

  /** Lists every object whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncIterable<StoredObject>;

  /** Lists the names of the folders directly under `prefix` (which ends with "/"), in name order. */
  listFolders(prefix: string): AsyncIterable<string>;

  /** Deletes an object; deleting a missing key is not an error. */
  delete(key: string): Promise<void>;

  /** Deletes every object under `prefix` (which ends with "/") and returns how many there were. */
  deleteFolder?(prefix: string): Promise<number>;

  /** Deletes many objects in few requests; missing keys are not an error. */
  deleteMany?(keys: readonly string[]): Promise<void>;

  /** Lists the objects whose key starts with `prefix` and sorts after `startAfter`, in key order. */
  listAfter?(prefix: string, startAfter: string): AsyncIterable<StoredObject>;

  /**
   * Lists uploads under `prefix` that started and never finished: S3
   * multipart uploads, or the temporary files of a local put.
   */
  listUnfinishedUploads?(prefix: string): AsyncIterable<UnfinishedUpload>;

  /** Discards an unfinished upload and the parts it stored. */
  abortUpload?(upload: UnfinishedUpload): Promise<void>;
}

export interface UnfinishedUpload {
  /** The key the upload would have created. */
  key: string;
  /** S3 upload id, or the name of a local temporary file. */
  uploadId: string;
  /** When the upload started (S3) or was last written (local). */
  initiated?: Date;
}

/** A pass-through stream that counts bytes and reports the running total, for puts. */
export class ByteCounter extends Transform {
  bytes = 0;

  constructor(private readonly onProgress?: (bytes: number) => void) {
    super();
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytes += chunk.length;
    this.onProgress?.(this.bytes);
    callback(null, chunk);
  }
}

export class ObjectNotFoundError extends Error {
  constructor(readonly key: string, where: string) {
    super(`object ${key} not found in ${where}`);
    this.name = 'ObjectNotFoundError';
  }
}

/** Rejects keys that could leave the store's root: absolute, empty or ".." segments. */
export function checkKey(key: string): void {
  const segments = key.split('/');
  if (key.startsWith('/') || segments.some((segment) => segment === '' || segment === '.' || segment === '..')) {
    throw new Error(`invalid object key "${key}": keys are relative paths without empty, "." or ".." segments`);
  }
}
