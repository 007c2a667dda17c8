// Reads an OPA bundle (.tar.gz) into memory, for checks on small test bundles.
import { createReadStream } from 'node:fs';
import { createGunzip } from 'node:zlib';
import tar from 'tar-stream';

export interface BundleFiles {
  files: Map<string, Buffer>;
  manifest: Record<string, unknown>;
  data: string;
}

export async function readBundle(file: string): Promise<BundleFiles> {
  const extract = tar.extract();
  const files = new Map<string, Buffer>();
  createReadStream(file).pipe(createGunzip()).pipe(extract);
  for await (const entry of extract) {
    const chunks: Buffer[] = [];
    for await (const chunk of entry) chunks.push(chunk as Buffer);
    files.set(entry.header.name.replace(/^\/+/, ''), Buffer.concat(chunks));
  }
  return {
    files,
    manifest: JSON.parse(files.get('.manifest')?.toString('utf8') ?? '{}') as Record<string, unknown>,
    data: files.get('data.json')?.toString('utf8') ?? '',
  };
}
