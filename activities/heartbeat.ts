import { Context } from '@temporalio/activity';

/**
 * Sends a heartbeat when the caller runs as an activity, and does nothing
 * elsewhere: the CLI's local checks and the benchmarks call activity code
 * directly.
 */
export function heartbeatIfActivity(details?: unknown): void {
  let context;
  try {
    context = Context.current();
  } catch {
    return;
  }
  context.heartbeat(details);
}
