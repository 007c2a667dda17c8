// Measures the artifact encoding on one file: gzip at levels 1 and 6 alone,
// then the whole ArtifactStore put (gzip level 1, age to one X25519
// recipient, SHA-256 of both ends, LocalBlobStore with fsync). Use it on an
// RDB or keys file to see what compression and encryption add to a dump.
//
//   npx tsc -p . && node dist/bench/encoding.js FILE
//
// An RDB of 1 million keys comes from a scratch server:
//   redis-server --port 6399 --save '' --enable-debug-command yes --dir DIR
//   redis-cli -p 6399 DEBUG POPULATE 1000000 key 100 && redis-cli -p 6399 SAVE
import { createReadStream, mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { ArtifactStore } from '../activities/artifacts';
import { generateIdentity } from '../activities/crypto/age';
import { LocalBlobStore } from '../activities/storage/local';

const MEBIBYTE = 1024 * 1024;

async function main(): Promise<void> {
  const file = process.argv[2];
  if (!file) throw new Error('usage: node dist/bench/encoding.js FILE');
  const bytes = statSync(file).size;
  const rate = (seconds: number): string => `${(bytes / 1e6 / seconds).toFixed(0)} MB/s`;
  console.log(`file: ${file}, ${(bytes / 1e6).toFixed(1)} MB; load average ${os.loadavg().map((value) => value.toFixed(2)).join(' ')}`);
  for (const level of [1, 6]) {
    let output = 0;
    const started = performance.now();
    await pipeline(
      createReadStream(file, { highWaterMark: MEBIBYTE }),
      createGzip({ level }),
      new Writable({
        write(chunk: Buffer, _encoding, callback) {
          output += chunk.length;
          callback();
        },
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    console.log(`gzip level ${level}: ${seconds.toFixed(2)} s (${rate(seconds)}), ${(output / 1e6).toFixed(1)} MB out`);
  }
  const root = mkdtempSync(path.join(os.tmpdir(), 'opa-backup-encoding-'));
  try {
    const store = new ArtifactStore(new LocalBlobStore(root), { gzipLevel: 1, encrypt: { recipients: [generateIdentity().recipient] } });
    const started = performance.now();
    await store.put('bench/artifact', createReadStream(file, { highWaterMark: MEBIBYTE }));
    const seconds = (performance.now() - started) / 1000;
    const encoded = store.encoded('bench/artifact')!;
    console.log(`ArtifactStore put (gzip 1 + age + digests + fsync): ${seconds.toFixed(2)} s (${rate(seconds)}), ${(encoded.size / 1e6).toFixed(1)} MB stored`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

main().catch((error: unknown) => {
  console.error((error as Error).message);
  process.exitCode = 1;
});
