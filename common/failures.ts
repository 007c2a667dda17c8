// Failure types that activities raise and workflows and the CLI test for.
// Pure code: workflows import it.

export const FailureType = {
  /** The plan is invalid; a retry cannot fix it. */
  InvalidPlan: 'InvalidPlan',
  /** A secret reference does not resolve on the worker. */
  MissingSecret: 'MissingSecret',
  /** The source rejected the credentials (HTTP 401 or 403). */
  Unauthorized: 'Unauthorized',
  /** The source could not be reached or returned a server error, so the step is retried. */
  SourceUnavailable: 'SourceUnavailable',
  /** The source returned a response its API does not document. */
  InvalidResponse: 'InvalidResponse',
  /** Writing to or reading from the blob store failed. */
  StorageFailed: 'StorageFailed',
} as const;

export type FailureTypeName = (typeof FailureType)[keyof typeof FailureType];

/** Failure types that a retry cannot fix. */
export const NON_RETRYABLE_FAILURES: readonly string[] = [
  FailureType.InvalidPlan,
  FailureType.MissingSecret,
  FailureType.Unauthorized,
];

/** Failure type of a drill step whose server binary (opa, initdb, redis-server, git) the worker lacks. */
export const DRILL_TOOL_MISSING = 'DrillToolMissing';
