// The drill's bundle extractor on its own: it extracts ordinary bundles and
// rejects unsafe entries, malformed archives and gzip bombs with an error
// that names the problem, before it writes outside its directory or runs out
// of memory.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { createGzip, gzipSync } from 'node:zlib';
import tar from 'tar-stream';
import { extractTarGz, UnsafeArchiveError, type ExtractLimits } from '../activities/drill/tar';
import { packTarGz, type TarEntry } from './harness/drill';

const root = mkdtempSync(path.join(tmpdir(), 'drill-tar-test-'));
const limits: ExtractLimits = { maxBytes: 16 * 1024 * 1024, maxEntries: 100 };

after(() => rmSync(root, { recursive: true, force: true }));

async function extract(archive: Buffer | Readable, custom: ExtractLimits = limits): Promise<{ directory: string; names: string[] }> {
  const directory = mkdtempSync(path.join(root, 'out-'));
  const input = Buffer.isBuffer(archive) ? Readable.from([archive]) : archive;
  const entries = await extractTarGz(input, directory, custom);
  return { directory, names: entries.map((entry) => entry.name) };
}

async function rejects(entries: TarEntry[], pattern: RegExp): Promise<void> {
  const archive = await packTarGz(entries);
  await assert.rejects(extract(archive), (error: Error) => {
    assert.ok(error instanceof UnsafeArchiveError, `expected UnsafeArchiveError, got ${error.name}: ${error.message}`);
    assert.match(error.message, pattern);
    return true;
  });
}

test('ordinary bundle extracts', async () => {
  const archive = await packTarGz([
    { name: '.manifest', body: Buffer.from('{"revision":"r"}') },
    { name: 'data.json', body: Buffer.from('{"a":1}') },
    { name: 'policies', type: 'directory' },
    { name: 'policies/team policies/x.rego', body: Buffer.from('package x\n') },
    // Longer than the 100 bytes of the ustar name field.
    { name: `policies/${'d'.repeat(120)}/${'f'.repeat(90)}.rego`, body: Buffer.from('package y\n') },
  ]);
  const { directory, names } = await extract(archive);
  assert.deepEqual(names.sort(), ['.manifest', 'data.json', 'policies', `policies/${'d'.repeat(120)}/${'f'.repeat(90)}.rego`, 'policies/team policies/x.rego'].sort());
  assert.equal(readFileSync(path.join(directory, 'data.json'), 'utf8'), '{"a":1}');
  assert.equal(readFileSync(path.join(directory, 'policies', 'team policies', 'x.rego'), 'utf8'), 'package x\n');
});

test('dot-dot entry is rejected', async () => {
  await rejects([{ name: 'data.json', body: Buffer.from('{}') }, { name: '../escape.txt', body: Buffer.from('x') }], /"\.\.\/escape\.txt".*"\.\." components/);
  assert.equal(existsSync(path.join(root, 'escape.txt')), false);
});

test('dot-dot inside a path is rejected', async () => {
  await rejects([{ name: 'policies/../../escape.txt', body: Buffer.from('x') }], /"\.\." components/);
});

test('absolute path is rejected', async () => {
  await rejects([{ name: '/etc/opa-backup-drill-test', body: Buffer.from('x') }], /absolute paths/);
});

test('symbolic link is rejected', async () => {
  await rejects([{ name: 'policies/link', type: 'symlink', linkname: '/etc/passwd' }], /symbolic links/);
});

test('hard link is rejected', async () => {
  await rejects([{ name: 'data.json', body: Buffer.from('{}') }, { name: 'copy.json', type: 'link', linkname: 'data.json' }], /hard links/);
});

test('FIFO is rejected', async () => {
  await rejects([{ name: 'pipe', type: 'fifo' }], /FIFOs/);
});

test('character device is rejected', async () => {
  await rejects([{ name: 'null', type: 'character-device' }], /character devices/);
});

test('duplicate path is rejected', async () => {
  await rejects([{ name: 'data.json', body: Buffer.from('{}') }, { name: 'data.json', body: Buffer.from('{"b":2}') }], /contains this path twice/);
});

test('entry count limit stops extraction', async () => {
  const entries = Array.from({ length: 101 }, (_, index) => ({ name: `f${index}`, body: Buffer.from('x') }));
  await rejects(entries, /more than 100 entries/);
});

test('gzip bomb stops at the byte limit', async () => {
  // 1 GiB of zeros compresses to about 1 MB. It is streamed into gzip, so the
  // test itself never keeps it in memory.
  const gigabyte = 1024 ** 3;
  const pack = tar.pack();
  const zeros = Buffer.alloc(1024 * 1024);
  const entry = pack.entry({ name: 'policies/bomb.rego', size: gigabyte, mode: 0o644 }) as unknown as NodeJS.WritableStream;
  void (async () => {
    for (let written = 0; written < gigabyte; written += zeros.length) {
      if (!entry.write(zeros)) await new Promise<void>((resolve) => entry.once('drain', () => resolve()));
    }
    entry.end();
    pack.finalize();
  })();
  const archive = pack.pipe(createGzip({ level: 1 }));
  const before = process.memoryUsage().rss;
  const started = Date.now();
  await assert.rejects(extract(archive), (error: Error) => {
    assert.ok(error instanceof UnsafeArchiveError, `${error.name}: ${error.message}`);
    assert.match(error.message, /more than 16777216 bytes.*gzip bomb/);
    return true;
  });
  assert.ok(Date.now() - started < 30_000, 'the limit did not stop the extraction early');
  assert.ok(process.memoryUsage().rss - before < 200 * 1024 * 1024, 'the extraction held the archive in memory');
  pack.destroy();
});

test('truncated archive is rejected', async () => {
  const archive = await packTarGz([{ name: 'data.json', body: Buffer.alloc(5000, 0x61) }]);
  const raw = (await import('node:zlib')).gunzipSync(archive);
  await assert.rejects(extract(gzipSync(raw.subarray(0, 2048))), /truncated/);
});

test('data that is not gzip is rejected', async () => {
  await assert.rejects(extract(Buffer.from('this is not a gzip stream at all')), /not valid gzip/);
});
