// Structured logs: one JSON object per line on stdout, with the workflow id,
// backup id and source of the step that writes them. Secrets are never
// passed to the logger; `redact` guards the usual header names as well.
import pino from 'pino';
import { Context } from '@temporalio/activity';

export const logger = pino({
  base: { service: 'opa-backup' },
  level: process.env.OPA_BACKUP_LOG_LEVEL ?? 'info',
  timestamp: pino.stdTimeFunctions.isoTime,
  redact: ['authorization', 'token', 'headers.authorization', '*.authorization'],
  serializers: { error: pino.stdSerializers.err, err: pino.stdSerializers.err },
});

/** Returns a child logger for the current activity, carrying its workflow and activity ids. */
export function activityLogger(fields: Record<string, string>): pino.Logger {
  let workflow: Record<string, string | number> = {};
  try {
    const info = Context.current().info;
    workflow = {
      workflowId: info.workflowExecution?.workflowId ?? '',
      runId: info.workflowExecution?.runId ?? '',
      activity: info.activityType,
      attempt: info.attempt,
    };
  } catch {
    // Not inside an activity: the fields given are all there is.
  }
  return logger.child({ ...workflow, ...fields });
}
