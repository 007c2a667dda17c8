// Writes a standard OPA bundle (gzip-compressed tar) from a snapshot:
// /.manifest, /data.json and one .rego file per policy module.
// `opa run --server --bundle FILE` loads the result unchanged.
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createGzip } from 'node:zlib';
import { PassThrough, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { DigestStream } from '../digest';
import type { PolicyRecord } from '../../common/manifest';

export interface BundleContents {
  revision: string;
  regoVersion: 0 | 1;
  modules: Array<{ id: string; raw: string; regoVersion: 0 | 1 }>;
  policies: PolicyRecord[];
  /** File holding data.json. */
  dataFile: string;
  /** Free-form metadata stored in the .manifest. */
  metadata: Record<string, unknown>;
  /** zlib compression level, 1 (fastest) to 9 (smallest). */
  gzipLevel: number;
}

export interface BundleStream {
  stream: Readable;
  /** Resolves with the SHA-256 of data.json once the pack is complete. */
  dataSha256: Promise<string>;
}

/** Builds the bundle's .manifest document. */
export function bundleManifest(
  contents: Pick<BundleContents, 'revision' | 'regoVersion' | 'metadata' | 'modules' | 'policies'>,
): Record<string, unknown> {
  const manifest: Record<string, unknown> = { revision: contents.revision, rego_version: contents.regoVersion };
  // Modules parsed with another version than the bundle's keep theirs.
  const exceptions: Record<string, number> = {};
  contents.modules.forEach((module, index) => {
    if (module.regoVersion !== contents.regoVersion) exceptions[contents.policies[index].file] = module.regoVersion;
  });
  if (Object.keys(exceptions).length > 0) manifest.file_rego_versions = exceptions;
  manifest.metadata = contents.metadata;
  return manifest;
}

/** Packs the bundle into a gzip stream; files are added in a fixed order so equal input packs alike. */
export function packBundle(contents: BundleContents): BundleStream {
  const pack = tar.pack();
  const gzip = createGzip({ level: contents.gzipLevel });
  const output = new PassThrough();
  const mtime = new Date(0);

  const dataSha256 = (async () => {
    const manifest = Buffer.from(JSON.stringify(bundleManifest(contents), null, 2) + '\n');
    pack.entry({ name: '.manifest', size: manifest.length, mtime, mode: 0o644 }, manifest);

    const { size } = await stat(contents.dataFile);
    const entry = pack.entry({ name: 'data.json', size, mtime, mode: 0o644 });
    const hasher = new DigestStream();
    await pipeline(createReadStream(contents.dataFile), hasher, entry);

    contents.modules.forEach((module, index) => {
      const body = Buffer.from(module.raw, 'utf8');
      pack.entry({ name: contents.policies[index].file, size: body.length, mtime, mode: 0o644 }, body);
    });
    pack.finalize();
    return hasher.digest();
  })();
  dataSha256.catch((error: unknown) => pack.destroy(error as Error));

  pipeline(pack, gzip, output).catch((error: unknown) => output.destroy(error as Error));
  return { stream: output, dataSha256 };
}
