// A blob store in an S3 bucket or an S3-compatible service. Uploads are
// multipart and streamed: at most partSize × queueSize bytes are in memory.
// Credentials come from the AWS SDK's default chain (environment, shared
// config and credentials files, web identity, container and instance roles).
import {
  AbortMultipartUploadCommand,
  DeleteObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  NoSuchKey,
  NotFound,
  S3Client,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { pipeline, type Readable } from 'node:stream';
import {
  ByteCounter,
  checkKey,
  ObjectNotFoundError,
  type BlobStore,
  type PutOptions,
  type StoredObject,
  type UnfinishedUpload,
} from './blob-store';

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix without a trailing "/"; empty for the bucket's root. */
  prefix?: string;
  endpoint?: string;
  /** @default "us-east-1" */
  region?: string;
  /** @default true when endpoint is set */
  forcePathStyle?: boolean;
  /** Multipart part size in bytes. @default 8 MiB */
  partSize?: number;
  /** Parts uploaded at once. @default 2 */
  queueSize?: number;
}

/** Keys per DeleteObjects request allowed by S3. */
const DELETE_OBJECTS_MAX = 1000;
/**
 * Keys per DeleteObjects request that deleteMany sends, and requests in
 * flight. Servers delete a request's keys one after another, so smaller
 * requests side by side finish sooner: on SeaweedFS 4.48 with 2 cores,
 * 16 requests of 250 keys deleted 4,800 objects a second, 4 of 1,000 only
 * 3,200 (BENCHMARKS.md, retention).
 */
const DELETE_KEYS_PER_REQUEST = 250;
const DELETE_REQUESTS_IN_FLIGHT = 16;

export class S3BlobStore implements BlobStore {
  readonly description: string;
  readonly client: S3Client;
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly partSize: number;
  private readonly queueSize: number;

  constructor(options: S3StoreOptions) {
    this.bucket = options.bucket;
    this.prefix = options.prefix ? `${options.prefix}/` : '';
    this.partSize = options.partSize ?? 8 * 1024 * 1024;
    this.queueSize = options.queueSize ?? 2;
    this.client = new S3Client({
      region: options.region ?? process.env.AWS_REGION ?? 'us-east-1',
      endpoint: options.endpoint,
      forcePathStyle: options.forcePathStyle ?? options.endpoint !== undefined,
    });
    this.description = `s3://${options.bucket}/${this.prefix}${options.endpoint ? ` at ${options.endpoint}` : ''}`;
  }

  private objectKey(key: string): string {
    checkKey(key);
    return this.prefix + key;
  }

  async put(key: string, body: Readable, options: PutOptions = {}): Promise<{ size: number }> {
    const objectKey = this.objectKey(key);
    const { signal } = options;
    if (signal?.aborted) {
      body.destroy();
      throw new Error(`upload of ${key} to ${this.description} cancelled before it started`, { cause: signal.reason });
    }

    const counter = new ByteCounter(options.onProgress);
    // pipeline() destroys both streams when either fails, so a body error
    // reaches the upload and a failed or cancelled upload stops the body.
    // The upload reports the error, so the callback has nothing to do.
    pipeline(body, counter, () => {});

    const upload = new Upload({
      client: this.client,
      params: { Bucket: this.bucket, Key: objectKey, Body: counter, ContentType: options.contentType },
      partSize: this.partSize,
      queueSize: this.queueSize,
      leavePartsOnError: false,
    });
    // Cancel by failing the body, not with upload.abort(): Upload.done() then
    // waits for the parts in flight and sends AbortMultipartUpload before it
    // rejects. After abort() it rejects at once, and the incomplete multipart
    // upload stays listed until the parts in flight finish.
    // NOTE: a cancel that arrives after the last byte was read cannot stop the
    // final PutObject or CompleteMultipartUpload, so put() may still succeed.
    const cancel = (): void => {
      counter.destroy(signal?.reason instanceof Error ? signal.reason : new Error('put cancelled'));
    };
    signal?.addEventListener('abort', cancel, { once: true });
    try {
      await upload.done();
    } catch (error) {
      counter.destroy();
      throw new Error(`upload of ${key} to ${this.description} failed: ${(error as Error).message}`, { cause: error });
    } finally {
      signal?.removeEventListener('abort', cancel);
    }
    // A cheap check where silent truncation would be a disaster: the stored size must match what was sent.
    const stored = await this.stat(key);
    if (!stored || stored.size !== counter.bytes) {
      throw new Error(`upload of ${key} to ${this.description} stored ${stored?.size ?? 'no'} bytes, expected ${counter.bytes}`);
    }
    return { size: counter.bytes };
  }

  async get(key: string): Promise<Readable> {
    try {
      const response = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.objectKey(key) }));
      return response.Body as Readable;
    } catch (error) {
      if (error instanceof NoSuchKey || (error as { name?: string }).name === 'NoSuchKey') {
        throw new ObjectNotFoundError(key, this.description);
      }
      throw new Error(`read of ${key} from ${this.description} failed: ${(error as Error).message}`, { cause: error });
    }
  }

  async stat(key: string): Promise<StoredObject | undefined> {
    try {
      const response = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.objectKey(key) }));
      return { key, size: response.ContentLength ?? 0, lastModified: response.LastModified };
    } catch (error) {
      if (error instanceof NotFound || (error as { name?: string }).name === 'NotFound') return undefined;
      throw new Error(`stat of ${key} in ${this.description} failed: ${(error as Error).message}`, { cause: error });
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    let token: string | undefined;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, ContinuationToken: token }),
      );
      for (const item of page.Contents ?? []) {
        if (!item.Key) continue;
        yield { key: item.Key.slice(this.prefix.length), size: item.Size ?? 0, lastModified: item.LastModified };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async *listFolders(prefix: string): AsyncIterable<string> {
    let token: string | undefined;
    const full = this.prefix + prefix;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({ Bucket: this.bucket, Prefix: full, Delimiter: '/', ContinuationToken: token }),
      );
      for (const common of page.CommonPrefixes ?? []) {
        if (common.Prefix) yield common.Prefix.slice(full.length).replace(/\/$/, '');
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.objectKey(key) }));
  }

  /** Deletes the objects under `prefix` with DeleteObjects. */
  async deleteFolder(prefix: string): Promise<number> {
    checkKey(prefix.replace(/\/$/, ''));
    const keys: string[] = [];
    let count = 0;
    for await (const object of this.list(prefix.endsWith('/') ? prefix : `${prefix}/`)) {
      keys.push(object.key);
      count++;
      if (keys.length === DELETE_OBJECTS_MAX) await this.deleteMany(keys.splice(0));
    }
    await this.deleteMany(keys);
    return count;
  }

  /** Deletes objects with DeleteObjects, DELETE_KEYS_PER_REQUEST keys a request and up to DELETE_REQUESTS_IN_FLIGHT requests at once. */
  async deleteMany(keys: readonly string[]): Promise<void> {
    const batches: string[][] = [];
    for (let start = 0; start < keys.length; start += DELETE_KEYS_PER_REQUEST) batches.push(keys.slice(start, start + DELETE_KEYS_PER_REQUEST));
    let next = 0;
    const lanes = Array.from({ length: Math.min(DELETE_REQUESTS_IN_FLIGHT, batches.length) }, async () => {
      while (next < batches.length) await this.deleteBatch(batches[next++]);
    });
    await Promise.all(lanes);
  }

  private async deleteBatch(batch: readonly string[]): Promise<void> {
    const response = await this.client.send(
      new DeleteObjectsCommand({
        Bucket: this.bucket,
        Delete: { Objects: batch.map((key) => ({ Key: this.objectKey(key) })), Quiet: true },
      }),
    );
    const failed = response.Errors ?? [];
    if (failed.length > 0) {
      const first = failed[0];
      throw new Error(
        `delete of ${failed.length} of ${batch.length} objects in ${this.description} failed, ` +
          `such as ${first.Key}: ${first.Code} ${first.Message ?? ''}`.trim(),
      );
    }
  }

  async *listAfter(prefix: string, startAfter: string): AsyncIterable<StoredObject> {
    let token: string | undefined;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({
          Bucket: this.bucket,
          Prefix: this.prefix + prefix,
          StartAfter: token ? undefined : this.prefix + startAfter,
          ContinuationToken: token,
        }),
      );
      for (const item of page.Contents ?? []) {
        if (!item.Key) continue;
        yield { key: item.Key.slice(this.prefix.length), size: item.Size ?? 0, lastModified: item.LastModified };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async *listUnfinishedUploads(prefix: string): AsyncIterable<UnfinishedUpload> {
    let keyMarker: string | undefined;
    let uploadIdMarker: string | undefined;
    for (;;) {
      const page = await this.client.send(
        new ListMultipartUploadsCommand({
          Bucket: this.bucket,
          Prefix: this.prefix + prefix,
          KeyMarker: keyMarker,
          UploadIdMarker: uploadIdMarker,
        }),
      );
      for (const upload of page.Uploads ?? []) {
        if (!upload.Key || !upload.UploadId) continue;
        yield { key: upload.Key.slice(this.prefix.length), uploadId: upload.UploadId, initiated: upload.Initiated };
      }
      if (!page.IsTruncated) return;
      keyMarker = page.NextKeyMarker;
      uploadIdMarker = page.NextUploadIdMarker;
    }
  }

  async abortUpload(upload: UnfinishedUpload): Promise<void> {
    await this.client.send(
      new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: this.objectKey(upload.key), UploadId: upload.uploadId }),
    );
  }
}
