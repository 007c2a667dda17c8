// S3BlobStore against a real S3-compatible server (SeaweedFS `weed mini` on loopback ports).
import {
  CreateBucketCommand,
  GetBucketVersioningCommand,
  GetObjectLockConfigurationCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectVersionsCommand,
  PutBucketVersioningCommand,
  PutObjectCommand,
  PutObjectLockConfigurationCommand,
} from '@aws-sdk/client-s3';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { after, before, test } from 'node:test';
import { ObjectNotFoundError } from '../activities/storage/blob-store';
import { S3BlobStore } from '../activities/storage/s3';
import { startS3Server, type S3Server } from './harness/s3-server';

const MiB = 1024 * 1024;
const bucket = 'opa-backup-store';
const storePrefix = 'backups';

let server: S3Server;
let store: S3BlobStore;

before(async () => {
  server = await startS3Server({ name: 's3-store' });
  await server.createBucket(bucket);

  // S3BlobStore takes credentials from the AWS SDK's default chain.
  process.env.AWS_ACCESS_KEY_ID = server.accessKeyId;
  process.env.AWS_SECRET_ACCESS_KEY = server.secretAccessKey;
  process.env.AWS_REGION = server.region;
  store = new S3BlobStore({ bucket, prefix: storePrefix, endpoint: server.endpoint, partSize: 8 * MiB, queueSize: 2 });
});

after(async () => {
  store?.client.destroy();
  await server?.stop();
});

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function digestOf(stream: Readable): Promise<{ size: number; sha256: string }> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of stream) {
    hash.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { size, sha256: hash.digest('hex') };
}

/** Returns a stream of random 1 MiB chunks and the SHA-256 of what it produced. */
function randomSource(totalMiB: number): { stream: Readable; sha256: () => string } {
  const hash = createHash('sha256');
  async function* chunks(): AsyncGenerator<Buffer> {
    for (let index = 0; index < totalMiB; index++) {
      const chunk = randomBytes(MiB);
      hash.update(chunk);
      yield chunk;
    }
  }
  return { stream: Readable.from(chunks(), { objectMode: false }), sha256: () => hash.digest('hex') };
}

/** Returns a stream that produces `goodMiB` MiB and then fails. */
function failingSource(goodMiB: number): Readable {
  async function* chunks(): AsyncGenerator<Buffer> {
    for (let index = 0; index < goodMiB; index++) yield randomBytes(MiB);
    throw new Error('source read failed');
  }
  return Readable.from(chunks(), { objectMode: false });
}

/** Returns a stream that produces 1 MiB chunks until it is destroyed. */
function endlessSource(): Readable {
  async function* chunks(): AsyncGenerator<Buffer> {
    for (;;) yield randomBytes(MiB);
  }
  return Readable.from(chunks(), { objectMode: false });
}

async function multipartUploadsUnder(key: string): Promise<string[]> {
  const response = await store.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: `${storePrefix}/${key}` }));
  return (response.Uploads ?? []).map((upload) => `${upload.Key} ${upload.UploadId}`);
}

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const result: T[] = [];
  for await (const item of items) result.push(item);
  return result;
}

test('put and get small object', async () => {
  const body = Buffer.from('{"policy":"allow"}\n');

  const { size } = await store.put('small/policy.json', Readable.from([body]), { contentType: 'application/json' });
  assert.equal(size, body.length);

  const stored = await store.stat('small/policy.json');
  assert.equal(stored?.key, 'small/policy.json');
  assert.equal(stored?.size, body.length);
  assert.ok(stored?.lastModified instanceof Date);

  const readBack = await readAll(await store.get('small/policy.json'));
  assert.deepEqual(readBack, body);
});

test('put 40 MiB streamed multipart', async () => {
  const source = randomSource(40);
  let progress = 0;

  const { size } = await store.put('large/bundle.tar', source.stream, {
    onProgress: (bytes) => {
      progress = bytes;
    },
  });
  assert.equal(size, 40 * MiB);
  assert.equal(progress, 40 * MiB);

  // An ETag ending in "-<parts>" marks an object completed by CompleteMultipartUpload.
  const head = await store.client.send(new HeadObjectCommand({ Bucket: bucket, Key: `${storePrefix}/large/bundle.tar` }));
  assert.match(head.ETag ?? '', /-5"?$/);

  const stored = await store.stat('large/bundle.tar');
  assert.equal(stored?.size, 40 * MiB);

  const readBack = await digestOf(await store.get('large/bundle.tar'));
  assert.equal(readBack.size, 40 * MiB);
  assert.equal(readBack.sha256, source.sha256());
});

test('stat of missing key returns undefined', async () => {
  assert.equal(await store.stat('missing/object.json'), undefined);
});

test('get of missing key throws ObjectNotFoundError', async () => {
  await assert.rejects(store.get('missing/object.json'), (error: unknown) => {
    assert.ok(error instanceof ObjectNotFoundError);
    assert.equal(error.key, 'missing/object.json');
    return true;
  });
});

test('list and listFolders with prefix', async () => {
  const keys = ['listing/a/1.json', 'listing/a/2.json', 'listing/b/1.json', 'listing/c.json', 'listing-other/x.json'];
  for (const key of keys) await store.put(key, Readable.from([Buffer.from(key)]));

  const listed = await collect(store.list('listing/'));
  assert.deepEqual(
    listed.map((item) => item.key),
    ['listing/a/1.json', 'listing/a/2.json', 'listing/b/1.json', 'listing/c.json'],
  );
  assert.deepEqual(
    listed.map((item) => item.size),
    [16, 16, 16, 14],
  );

  const underA = await collect(store.list('listing/a/'));
  assert.deepEqual(
    underA.map((item) => item.key),
    ['listing/a/1.json', 'listing/a/2.json'],
  );

  assert.deepEqual(await collect(store.listFolders('listing/')), ['a', 'b']);
  assert.deepEqual(await collect(store.listFolders('listing/a/')), []);
  assert.deepEqual(await collect(store.list('nothing-here/')), []);
});

test('delete removes object', async () => {
  await store.put('deleting/object.json', Readable.from([Buffer.from('{}')]));
  assert.ok(await store.stat('deleting/object.json'));

  await store.delete('deleting/object.json');
  assert.equal(await store.stat('deleting/object.json'), undefined);

  // Deleting a missing key is not an error.
  await store.delete('deleting/object.json');
});

test('failed body stream leaves nothing', async () => {
  // 20 MiB is two full 8 MiB parts, so the multipart upload has started when the stream fails.
  await assert.rejects(store.put('failed/large.tar', failingSource(20)), /upload of failed\/large\.tar .* failed: source read failed/);
  assert.equal(await store.stat('failed/large.tar'), undefined);
  assert.deepEqual(await multipartUploadsUnder('failed/large.tar'), []);

  // A failure inside the first part: no multipart upload exists yet.
  await assert.rejects(store.put('failed/small.tar', failingSource(2)), /source read failed/);
  assert.equal(await store.stat('failed/small.tar'), undefined);
  assert.deepEqual(await multipartUploadsUnder('failed/small.tar'), []);
});

test('aborted put leaves nothing', async () => {
  const controller = new AbortController();
  const source = endlessSource();

  const put = store.put('aborted/large.tar', source, {
    signal: controller.signal,
    onProgress: (bytes) => {
      if (bytes >= 20 * MiB) controller.abort();
    },
  });

  await assert.rejects(put, /upload of aborted\/large\.tar .* failed/);
  assert.equal(await store.stat('aborted/large.tar'), undefined);
  assert.deepEqual(await multipartUploadsUnder('aborted/large.tar'), []);
  assert.ok(source.destroyed, 'the body stream is destroyed after an aborted put');
});

test('put with aborted signal writes nothing', async () => {
  const source = endlessSource();

  await assert.rejects(store.put('aborted/early.tar', source, { signal: AbortSignal.abort() }), /cancelled before it started/);
  assert.equal(await store.stat('aborted/early.tar'), undefined);
  assert.ok(source.destroyed, 'the body stream is destroyed');
});

test('bucket versioning can be enabled', async () => {
  const versionedBucket = 'opa-backup-versioned';
  await server.createBucket(versionedBucket);

  await store.client.send(
    new PutBucketVersioningCommand({ Bucket: versionedBucket, VersioningConfiguration: { Status: 'Enabled' } }),
  );
  const versioning = await store.client.send(new GetBucketVersioningCommand({ Bucket: versionedBucket }));
  assert.equal(versioning.Status, 'Enabled');

  for (const body of ['first', 'second']) {
    await store.client.send(new PutObjectCommand({ Bucket: versionedBucket, Key: 'manifest.json', Body: body }));
  }
  const versions = await store.client.send(new ListObjectVersionsCommand({ Bucket: versionedBucket, Prefix: 'manifest.json' }));
  assert.equal(versions.Versions?.length, 2);
});

test('object lock default retention', async () => {
  const lockedBucket = 'opa-backup-locked';
  await store.client.send(new CreateBucketCommand({ Bucket: lockedBucket, ObjectLockEnabledForBucket: true }));

  await store.client.send(
    new PutObjectLockConfigurationCommand({
      Bucket: lockedBucket,
      ObjectLockConfiguration: {
        ObjectLockEnabled: 'Enabled',
        Rule: { DefaultRetention: { Mode: 'COMPLIANCE', Days: 1 } },
      },
    }),
  );
  const configuration = await store.client.send(new GetObjectLockConfigurationCommand({ Bucket: lockedBucket }));
  assert.equal(configuration.ObjectLockConfiguration?.ObjectLockEnabled, 'Enabled');
  assert.equal(configuration.ObjectLockConfiguration?.Rule?.DefaultRetention?.Mode, 'COMPLIANCE');
  assert.equal(configuration.ObjectLockConfiguration?.Rule?.DefaultRetention?.Days, 1);

  const versioning = await store.client.send(new GetBucketVersioningCommand({ Bucket: lockedBucket }));
  assert.equal(versioning.Status, 'Enabled');
});
