// Benchmark of retention on the S3-compatible test server (SeaweedFS `weed
// mini`, test/harness/s3-server.ts). It creates N backup folders, each with
// a manifest and one small artifact, one backup an hour back from now. Then
// it times the retention activities as the worker runs them, without
// Temporal around them. planRetention lists every key of the plan (folder
// names first, then ranges of folders side by side), reads the manifests of
// the backups it keeps and decides. deleteBackups deletes the manifests
// first, then the other keys that planRetention found, with DeleteObjects,
// in batches of 5,000 backups as retentionWorkflow sends them.
//
//   npx tsc -p . && node dist/bench/retention.js [--backups 10000] [--concurrency 32]
//
// --concurrency sets the puts in flight while the folders are created.
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { createHash } from 'node:crypto';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { deleteBackups, planRetention } from '../activities/retention';
import { S3BlobStore } from '../activities/storage/s3';
import { makeBackupId } from '../common/layout';
import type { Plan } from '../common/plan';
import { startS3Server } from '../test/harness/s3-server';

/** Listing, deciding and deleting N = 10,000 backups should take at most this long. */
const TARGET_SECONDS = 10;
const HOUR = 3_600_000;

async function mapLimit<T>(items: readonly T[], limit: number, action: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await action(items[next++]);
    }),
  );
}

function loadLine(): string {
  return os.loadavg().map((value) => value.toFixed(2)).join(' ');
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { backups: { type: 'string', default: '10000' }, concurrency: { type: 'string', default: '32' } },
  });
  const count = Number(values.backups);
  const concurrency = Number(values.concurrency);

  const s3 = await startS3Server({ name: 'bench-retention' });
  try {
    await s3.createBucket('opa-backups');
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: s3.region });
    const plan: Plan = {
      name: 'bench',
      destination: { s3: { bucket: 'opa-backups', prefix: 'retention', endpoint: s3.endpoint, region: s3.region } },
      encryption: { unencrypted: true },
      sources: { opa: [{ name: 'edge-1', url: 'http://127.0.0.1:9' }] },
      retention: { keepLast: 24, keepDaily: 30, keepWeekly: 12, keepMonthly: 12 },
    } as Plan;
    const store = new S3BlobStore(plan.destination.s3!);

    const now = Date.now();
    const ids = Array.from({ length: count }, (_, index) =>
      makeBackupId(new Date(now - (index + 1) * HOUR), index.toString(16).padStart(8, '0')),
    );
    const bundle = Buffer.alloc(512, 7);
    const sha256 = createHash('sha256').update(bundle).digest('hex');
    const createStart = performance.now();
    await mapLimit(ids, concurrency, async (backupId) => {
      const folder = `retention/bench/${backupId}`;
      await store.client.send(new PutObjectCommand({ Bucket: 'opa-backups', Key: `${folder}/opa/edge-1.tar.gz`, Body: bundle }));
      const manifest = {
        format: 'opa-backup.manifest',
        version: 1,
        backupId,
        plan: 'bench',
        status: 'complete',
        artifacts: [{ kind: 'opa-bundle', source: 'edge-1', key: 'opa/edge-1.tar.gz', size: bundle.length, sha256 }],
        failures: [],
      };
      await store.client.send(new PutObjectCommand({ Bucket: 'opa-backups', Key: `${folder}/manifest.json`, Body: JSON.stringify(manifest) }));
    });
    const createSeconds = (performance.now() - createStart) / 1000;
    console.log(`created ${count} backups (${2 * count} objects) in ${createSeconds.toFixed(1)} s`);

    const loadBefore = loadLine();
    const planStart = performance.now();
    const report = await planRetention({ plan });
    const planSeconds = (performance.now() - planStart) / 1000;

    const deleteStart = performance.now();
    // Batches of 5,000 ids, as retentionWorkflow sends them.
    for (let start = 0; start < report.deleted.length; start += 5000) {
      const contents = { ...report.contents, keySetOf: report.contents.keySetOf.slice(start, start + 5000) };
      await deleteBackups({ plan, backupIds: report.deleted.slice(start, start + 5000), contents, checkDrills: false });
    }
    const deleteSeconds = (performance.now() - deleteStart) / 1000;
    const loadAfter = loadLine();

    const check = await planRetention({ plan });
    const total = planSeconds + deleteSeconds;
    console.log(`S3 server ${s3.endpoint}, ${os.cpus().length} cores, Node.js ${process.version}`);
    console.log(`load average (1, 5, 15 min) before: ${loadBefore}; after: ${loadAfter}`);
    console.log(`list + read manifests + decide: ${planSeconds.toFixed(2)} s (${report.backups} backups, ${report.kept.length} kept)`);
    console.log(`delete ${report.deleted.length} backups: ${deleteSeconds.toFixed(2)} s`);
    console.log(`total: ${total.toFixed(2)} s (target ≤ ${TARGET_SECONDS} s): ${total <= TARGET_SECONDS ? 'PASS' : 'FAIL'}`);
    console.log(`after: ${check.backups} backups listed, ${check.deleted.length} more to delete`);
  } finally {
    await s3.stop();
  }
}

main().catch((error: unknown) => {
  console.error((error as Error).stack ?? String(error));
  process.exitCode = 1;
});
