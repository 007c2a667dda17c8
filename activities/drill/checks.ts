// Running one drill check and recording its outcome.
import type { CheckResult } from './types';

/** Maximum length of a check's message, because results travel through workflow history. */
const MAX_MESSAGE_CHARS = 4000;

/** A verification that found a difference between the restore and the backup's records. */
export class CheckFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckFailure';
  }
}

function clip(message: string): string {
  return message.length > MAX_MESSAGE_CHARS ? `${message.slice(0, MAX_MESSAGE_CHARS)}… (${message.length} characters)` : message;
}

/**
 * Runs `verify` and returns a passed result with its message, or a failed
 * result when it throws CheckFailure. Other errors (a server that cannot be
 * reached, a full disk) propagate, so Temporal retries the step.
 */
export async function runCheck(name: string, object: string, verify: () => Promise<string>): Promise<CheckResult> {
  const started = performance.now();
  try {
    const message = await verify();
    return { name, object, outcome: 'passed', message: clip(message), durationSeconds: (performance.now() - started) / 1000 };
  } catch (error) {
    if (!(error instanceof CheckFailure)) throw error;
    return { name, object, outcome: 'failed', message: clip(error.message), durationSeconds: (performance.now() - started) / 1000 };
  }
}

/** Returns failed results for checks that could not run, with the reason. */
export function notRun(names: string[], object: string, reason: string): CheckResult[] {
  return names.map((name) => ({ name, object, outcome: 'failed', message: clip(`not checked: ${reason}`), durationSeconds: 0 }));
}
