import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';

/** A pass-through stream that computes the SHA-256 and size of what flows through it. */
export class DigestStream extends Transform {
  private readonly hash: Hash = createHash('sha256');
  bytes = 0;

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }

  private hex: string | undefined;

  /** Returns the lowercase hex digest; call after the stream ended. Later calls return the same value. */
  digest(): string {
    this.hex ??= this.hash.digest('hex');
    return this.hex;
  }
}
