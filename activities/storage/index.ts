import type { Destination } from '../../common/plan';
import type { BlobStore } from './blob-store';
import { LocalBlobStore } from './local';
import { S3BlobStore } from './s3';

export * from './blob-store';

/** Opens the blob store a plan's destination names. */
export function openBlobStore(destination: Destination): BlobStore {
  if (destination.local) return new LocalBlobStore(destination.local.path);
  if (destination.s3) return new S3BlobStore(destination.s3);
  throw new Error('the destination sets neither "local" nor "s3"');
}
