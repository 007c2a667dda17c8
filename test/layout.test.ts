// Backup ids and object keys.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backupIdTime, isBackupId, makeBackupId, makeBackupIdBySecond, manifestKey } from '../common/layout';

test('backup ids of runs in one millisecond differ', () => {
  // Two UUIDv7 run ids of the same millisecond share their leading digits.
  const start = new Date('2026-12-04T19:45:12.345Z');
  const first = makeBackupId(start, '01a242d1-3c4e-7a8a-91fe-d5bb6c30b361');
  const second = makeBackupId(start, '01a242d1-3c4e-7b1c-967d-f6b86b4bf416');
  assert.notEqual(first, second);
  assert.equal(first, '20261204T194512Z-3450b361');
});

test('backup ids of runs in one second sort by time', () => {
  // The later run's random digits sort first, so only the milliseconds order them.
  const earlier = makeBackupId(new Date('2026-12-04T19:45:12.080Z'), '01a242d1-3c4e-7a8a-91fe-d5bb6c3fffff');
  const later = makeBackupId(new Date('2026-12-04T19:45:12.345Z'), '01a242d1-3c4e-7b1c-967d-f6b86b400000');
  assert.ok(earlier < later, `${earlier} sorts after ${later}`);
  assert.equal(makeBackupIdBySecond(new Date('2026-12-04T19:45:12.345Z'), '01a242d1-3c4e-7a8a-91fe-d5bb6c30b361'), '20261204T194512Z-6c30b361');
});

test('backup id round-trips its time', () => {
  const id = makeBackupId(new Date('2026-01-02T03:04:05.999Z'), '01a242d1-3c4e-7a8a-91fe-d5bb6c30b361');
  assert.ok(isBackupId(id));
  assert.equal(backupIdTime(id)?.toISOString(), '2026-01-02T03:04:05.000Z');
  assert.equal(manifestKey('plan', id), `plan/${id}/manifest.json`);
});

test('backup id rejects other folder names', () => {
  assert.equal(isBackupId('20261204T194512Z'), false);
  assert.equal(isBackupId('../20261204T194512Z-6c30b361'), false);
});
