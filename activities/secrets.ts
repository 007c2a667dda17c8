// Resolves secret references ("env:NAME", "file:/path") on the worker. The
// value never leaves the activity: errors name the reference, never the value.
import { readFileSync } from 'node:fs';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../common/failures';

/**
 * Returns the secret a reference points to, trimmed of a trailing newline.
 * Throws a non-retryable MissingSecret failure that names `field` and the
 * reference when the variable is unset or the file is unreadable.
 */
export function resolveSecret(reference: string, field: string, where = 'on the worker'): string {
  if (reference.startsWith('env:')) {
    const variable = reference.slice(4);
    const value = process.env[variable];
    if (value === undefined) {
      throw ApplicationFailure.create({
        type: FailureType.MissingSecret,
        nonRetryable: true,
        message: `${field}: environment variable ${variable} (from "${reference}") is not set ${where}; export it ${where === 'on the worker' ? 'where the worker runs' : 'and run again'}`,
      });
    }
    return value;
  }
  if (reference.startsWith('file:')) {
    const file = reference.slice(5);
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (error) {
      throw ApplicationFailure.create({
        type: FailureType.MissingSecret,
        nonRetryable: true,
        message: `${field}: cannot read ${file} (from "${reference}") ${where}: ${describeReadError(error as NodeJS.ErrnoException)}`,
      });
    }
  }
  throw ApplicationFailure.create({
    type: FailureType.InvalidPlan,
    nonRetryable: true,
    message: `${field}: "${reference.split(':')[0]}:…" is not a secret reference; use env:NAME or file:PATH`,
  });
}

function describeReadError(error: NodeJS.ErrnoException): string {
  if (error.code === 'ENOENT') return 'file not found';
  if (error.code === 'EACCES') return 'permission denied';
  if (error.code === 'EISDIR') return 'it is a folder, not a file';
  return error.code ?? error.message;
}
