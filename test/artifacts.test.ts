// Artifact encoding on a local store: gzip and age on the way in, the same
// stages and both digest checks on the way out, and the format checks that
// verify runs on plaintext.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { ArtifactDamagedError, ArtifactStore, ArtifactUnreadableError, readAll, readArtifact, type StoredRecord } from '../activities/artifacts';
import { generateIdentity } from '../activities/crypto/age';
import { checkKeysStream, checkRdb, Crc64, FormatError } from '../activities/formats';
import { LocalBlobStore } from '../activities/storage/local';
import { runsDirectory } from './harness/process';

function sha256(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function newStore(): LocalBlobStore {
  return new LocalBlobStore(mkdtempSync(path.join(runsDirectory, 'artifacts-')));
}

const identity = generateIdentity();
// Compressible, and larger than one 64 KiB age chunk.
const plaintext = Buffer.from('policy,decision,allow\n'.repeat(20_000));

test('gzip and age put round-trips', async () => {
  const inner = newStore();
  const store = new ArtifactStore(inner, { gzipLevel: 6, encrypt: { recipients: [identity.recipient] } });
  await store.put('plan/id/redis/cache.rdb', Readable.from([plaintext.subarray(0, 1000), plaintext.subarray(1000)]));
  const encoded = store.encoded('plan/id/redis/cache.rdb')!;
  assert.equal(encoded.key, 'plan/id/redis/cache.rdb.gz.age');
  assert.deepEqual(encoded.plaintext, { size: plaintext.length, sha256: sha256(plaintext) });
  assert.equal(encoded.compression, 'gzip');
  assert.equal(encoded.encryption, 'age');
  const stored = await readAll(await inner.get(encoded.key));
  assert.equal(stored.length, encoded.size);
  assert.equal(sha256(stored), encoded.sha256);
  assert.ok(stored.length < plaintext.length / 10, `gzip should shrink ${plaintext.length} bytes, stored ${stored.length}`);

  const { stream, decrypted } = await readArtifact({ store: inner, key: encoded.key, record: encoded, decrypt: { identities: [identity] } });
  assert.equal(decrypted, true);
  assert.deepEqual(await readAll(stream), plaintext);
});

test('level 0 and no encryption store the bare key with equal digests', async () => {
  const store = new ArtifactStore(newStore(), {});
  await store.put('plan/id/postgres/db/globals.sql', Readable.from([plaintext]));
  const encoded = store.encoded('plan/id/postgres/db/globals.sql')!;
  assert.equal(encoded.key, 'plan/id/postgres/db/globals.sql');
  assert.equal(encoded.sha256, encoded.plaintext.sha256);
  assert.equal(encoded.compression, undefined);
  assert.equal(encoded.encryption, undefined);
});

test('a source that fails part way leaves no object behind', async () => {
  const root = mkdtempSync(path.join(runsDirectory, 'artifacts-'));
  const inner = new LocalBlobStore(root);
  const store = new ArtifactStore(inner, { gzipLevel: 1, encrypt: { recipients: [identity.recipient] } });
  const failing = new Readable({ read() {} });
  failing.push(plaintext);
  setImmediate(() => failing.destroy(new Error('pg_dump exited with status 1')));
  await assert.rejects(store.put('plan/id/postgres/db/app.dump', failing), /pg_dump exited with status 1/);
  assert.equal(await inner.stat('plan/id/postgres/db/app.dump.gz.age'), undefined);
  if (existsSync(path.join(root, 'plan/id/postgres/db'))) {
    assert.deepEqual(readdirSync(path.join(root, 'plan/id/postgres/db')), []);
  }
});

test('without a key, an encrypted object is checked against its stored digest only', async () => {
  const inner = newStore();
  const store = new ArtifactStore(inner, { encrypt: { recipients: [identity.recipient] } });
  await store.put('k', Readable.from([plaintext]));
  const record = store.encoded('k')!;
  const { stream, decrypted } = await readArtifact({ store: inner, key: record.key, record });
  assert.equal(decrypted, false);
  assert.equal((await readAll(stream)).length, 0);

  const wrongDigest: StoredRecord = { ...record, sha256: '0'.repeat(64) };
  const damaged = await readArtifact({ store: inner, key: record.key, record: wrongDigest });
  await assert.rejects(readAll(damaged.stream), (error: unknown) => error instanceof ArtifactDamagedError && error.damage === 'digest mismatch');

  const other = generateIdentity();
  const unreadable = await readArtifact({ store: inner, key: record.key, record, decrypt: { identities: [other] } });
  await assert.rejects(readAll(unreadable.stream), (error: unknown) => error instanceof ArtifactUnreadableError && error.reason === 'wrong identity');
});

test('CRC-64/Jones matches the reference check value', () => {
  assert.equal(new Crc64().update(Buffer.from('123456789')).hex(), 'e9c6d914c4b8d9ca');
  // Split input gives the same value as one piece.
  const bytes = randomBytes(1000);
  assert.equal(new Crc64().update(bytes.subarray(0, 333)).update(bytes.subarray(333)).hex(), new Crc64().update(bytes).hex());
});

test('an RDB with a changed byte fails its checksum', async () => {
  const body = Buffer.concat([Buffer.from('REDIS0011'), randomBytes(200), Buffer.from([0xff])]);
  const checksum = Buffer.from(new Crc64().update(body).hex(), 'hex').reverse();
  const rdb = Buffer.concat([body, checksum]);
  assert.deepEqual(await checkRdb(Readable.from([rdb.subarray(0, 50), rdb.subarray(50)])), { rdbVersion: 11, checksum: checksum.reverse().toString('hex') });
  const changed = Buffer.from(rdb);
  changed[100] ^= 0x40;
  await assert.rejects(checkRdb(Readable.from([changed])), (error: unknown) => error instanceof FormatError && /RDB checksum mismatch/.test((error as Error).message));
});

test('a keys stream without its trailer is reported as cut short', async () => {
  const header = Buffer.from(JSON.stringify({ format: 'opa-backup-redis-keys', version: 1 }));
  const record = Buffer.alloc(1 + 4 + 4 + 3 + 8 + 8 + 2);
  let offset = record.write('K', 0, 'latin1');
  offset = record.writeUInt32BE(0, offset);
  offset = record.writeUInt32BE(3, offset);
  offset += record.write('abc', offset, 'latin1');
  offset = record.writeBigInt64BE(-1n, offset);
  offset = record.writeBigUInt64BE(2n, offset);
  record.write('xy', offset, 'latin1');
  const headerLength = Buffer.alloc(4);
  headerLength.writeUInt32BE(header.length);
  const start = Buffer.concat([Buffer.from('OPA-BACKUP-REDIS-KEYS 1\n'), Buffer.from('H'), headerLength, header, record]);
  await assert.rejects(checkKeysStream(Readable.from([start])), /ends without its trailer/);
  const trailer = Buffer.from(JSON.stringify({ records: { 0: 1 } }));
  const trailerLength = Buffer.alloc(4);
  trailerLength.writeUInt32BE(trailer.length);
  assert.deepEqual(await checkKeysStream(Readable.from([Buffer.concat([start, Buffer.from('T'), trailerLength, trailer])])), { records: { 0: 1 } });
});
