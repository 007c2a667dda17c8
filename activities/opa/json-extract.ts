// Streams the raw bytes of one value out of a JSON document, such as the
// "x" binding in OPA's {"result":[{"x":...}]} query response, without
// parsing the value. OPA writes numbers exactly as they were stored
// (9007199254740993, 1.0, 1e-320); passing the bytes through keeps them,
// where JSON.parse would round them. Memory use is bounded by the longest
// object key on the path, not by the document.

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN_BRACE = 0x7b;
const CLOSE_BRACE = 0x7d;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACKET = 0x5d;
const COLON = 0x3a;
const COMMA = 0x2c;

function isWhitespace(byte: number): boolean {
  return byte === 0x20 || byte === 0x0a || byte === 0x0d || byte === 0x09;
}

/** One step of a path into a JSON document: an object key or an array index. */
export type JsonPathStep = string | number;

interface Frame {
  kind: 'object' | 'array';
  /** Current key (objects) while its value is read. */
  key?: string;
  /** Current element index (arrays). */
  index: number;
  expect: 'key' | 'colon' | 'value' | 'comma';
}

type Mode =
  | 'navigate'
  | 'skip-container'
  | 'capture-container'
  | 'skip-string'
  | 'capture-string'
  | 'skip-bare'
  | 'capture-bare'
  | 'key'
  | 'done';

/** Raised when the input is not the JSON document the extractor expects. */
export class JsonShapeError extends Error {}

export class JsonValueExtractor {
  private readonly steps: readonly JsonPathStep[];
  private readonly emit: (chunk: Buffer) => void;
  private readonly stack: Frame[] = [];
  private mode: Mode = 'navigate';
  /** Nesting depth inside a skipped or captured container. */
  private innerDepth = 0;
  private inString = false;
  private escaped = false;
  private keyBytes: number[] = [];
  private started = false;
  private capturedBytes = 0;
  found = false;

  /**
   * @param steps path of the wanted value, such as ["result", 0, "x"]
   * @param emit receives the value's bytes in order; slices may share memory with the input chunk
   */
  constructor(steps: readonly JsonPathStep[], emit: (chunk: Buffer) => void) {
    if (steps.length === 0) throw new Error('JsonValueExtractor needs at least one path step');
    this.steps = steps;
    this.emit = emit;
  }

  /** Bytes of the wanted value seen so far. */
  get size(): number {
    return this.capturedBytes;
  }

  write(chunk: Buffer): void {
    let captureStart = -1;
    if (this.capturing()) {
      captureStart = 0;
    }
    const length = chunk.length;
    let position = 0;

    while (position < length) {
      const byte = chunk[position];
      switch (this.mode) {
        case 'done':
          return;

        case 'skip-container':
        case 'capture-container': {
          // Tight loop: only strings and brackets matter until the container closes.
          let depth = this.innerDepth;
          let inString = this.inString;
          let escaped = this.escaped;
          let index = position;
          for (; index < length; index++) {
            const current = chunk[index];
            if (inString) {
              if (escaped) escaped = false;
              else if (current === BACKSLASH) escaped = true;
              else if (current === QUOTE) inString = false;
              continue;
            }
            if (current === QUOTE) inString = true;
            else if (current === OPEN_BRACE || current === OPEN_BRACKET) depth++;
            else if (current === CLOSE_BRACE || current === CLOSE_BRACKET) {
              depth--;
              if (depth === 0) break;
            }
          }
          this.inString = inString;
          this.escaped = escaped;
          this.innerDepth = depth;
          if (index === length) {
            position = length;
            break;
          }
          // index is the closing bracket of the container.
          if (this.mode === 'capture-container') {
            this.flush(chunk, captureStart, index + 1);
            captureStart = -1;
            this.finishCapture();
            return;
          }
          this.valueEnded();
          position = index + 1;
          break;
        }

        case 'skip-string':
        case 'capture-string': {
          if (this.escaped) this.escaped = false;
          else if (byte === BACKSLASH) this.escaped = true;
          else if (byte === QUOTE) {
            if (this.mode === 'capture-string') {
              this.flush(chunk, captureStart, position + 1);
              this.finishCapture();
              return;
            }
            this.valueEnded();
          }
          position++;
          break;
        }

        case 'skip-bare':
        case 'capture-bare': {
          if (isWhitespace(byte) || byte === COMMA || byte === CLOSE_BRACE || byte === CLOSE_BRACKET) {
            if (this.mode === 'capture-bare') {
              this.flush(chunk, captureStart, position);
              this.finishCapture();
              return;
            }
            this.valueEnded();
            // The delimiter belongs to the enclosing frame: read it again in navigate mode.
            break;
          }
          position++;
          break;
        }

        case 'key': {
          if (this.escaped) {
            this.escaped = false;
            this.keyBytes.push(byte);
          } else if (byte === BACKSLASH) {
            this.escaped = true;
            this.keyBytes.push(byte);
          } else if (byte === QUOTE) {
            const frame = this.stack[this.stack.length - 1];
            frame.key = JSON.parse(`"${Buffer.from(this.keyBytes).toString('utf8')}"`) as string;
            frame.expect = 'colon';
            this.keyBytes = [];
            this.mode = 'navigate';
          } else {
            this.keyBytes.push(byte);
          }
          position++;
          break;
        }

        case 'navigate': {
          position++;
          if (isWhitespace(byte)) break;
          const frame = this.stack[this.stack.length - 1];
          if (!frame) {
            if (this.started) throw new JsonShapeError('unexpected data after the end of the JSON document');
            this.started = true;
            this.startValue(byte);
            if (this.capturing()) {
              captureStart = position - 1;
            }
            break;
          }
          if (frame.expect === 'key') {
            if (byte === QUOTE) {
              this.mode = 'key';
              this.keyBytes = [];
            } else if (byte === CLOSE_BRACE && frame.kind === 'object') {
              this.popFrame();
            } else {
              throw new JsonShapeError(`unexpected byte "${String.fromCharCode(byte)}" where an object key was expected`);
            }
            break;
          }
          if (frame.expect === 'colon') {
            if (byte !== COLON) throw new JsonShapeError('expected ":" after an object key');
            frame.expect = 'value';
            break;
          }
          if (frame.expect === 'comma') {
            if (byte === COMMA) {
              if (frame.kind === 'object') frame.expect = 'key';
              else {
                frame.index++;
                frame.expect = 'value';
              }
            } else if ((byte === CLOSE_BRACE && frame.kind === 'object') || (byte === CLOSE_BRACKET && frame.kind === 'array')) {
              this.popFrame();
            } else {
              throw new JsonShapeError(`unexpected byte "${String.fromCharCode(byte)}" between values`);
            }
            break;
          }
          // expect === 'value'
          if (byte === CLOSE_BRACKET && frame.kind === 'array' && frame.index === 0) {
            this.popFrame();
            break;
          }
          this.startValue(byte);
          if (this.capturing()) {
            captureStart = position - 1;
          }
          break;
        }
      }
    }
    this.flush(chunk, captureStart, length);
  }

  /** Checks that the document ended where a value could end; call after the last chunk. */
  end(): void {
    if (this.mode === 'capture-bare') {
      this.finishCapture();
      return;
    }
    if (this.mode === 'done') return;
    if (!this.started) throw new JsonShapeError('the response body is empty; expected a JSON document');
    if (this.stack.length > 0 || this.mode !== 'navigate') throw new JsonShapeError('the JSON document is truncated');
  }

  private capturing(): boolean {
    return this.mode === 'capture-container' || this.mode === 'capture-string' || this.mode === 'capture-bare';
  }

  private flush(chunk: Buffer, start: number, end: number): void {
    if (start >= 0 && end > start) {
      this.capturedBytes += end - start;
      this.emit(chunk.subarray(start, end));
    }
  }

  private finishCapture(): void {
    this.found = true;
    this.mode = 'done';
  }

  /** True when every open frame sits on the step of the wanted path. */
  private onPath(): boolean {
    for (let depth = 0; depth < this.stack.length; depth++) {
      const frame = this.stack[depth];
      const step = this.steps[depth];
      if (frame.kind === 'object' ? frame.key !== step : frame.index !== step) return false;
    }
    return true;
  }

  private startValue(byte: number): void {
    const depth = this.stack.length;
    const onPath = this.onPath();
    const wanted = onPath && depth === this.steps.length;
    const descend = onPath && depth < this.steps.length;

    if (byte === OPEN_BRACE || byte === OPEN_BRACKET) {
      const kind = byte === OPEN_BRACE ? 'object' : 'array';
      if (wanted) {
        this.mode = 'capture-container';
        this.innerDepth = 1;
      } else if (descend && (kind === 'object') === (typeof this.steps[depth] === 'string')) {
        this.stack.push({ kind, index: 0, expect: kind === 'object' ? 'key' : 'value' });
      } else {
        this.mode = 'skip-container';
        this.innerDepth = 1;
      }
      this.inString = false;
      this.escaped = false;
      return;
    }
    if (byte === QUOTE) {
      this.mode = wanted ? 'capture-string' : 'skip-string';
      this.escaped = false;
      return;
    }
    if (byte === 0x2d || (byte >= 0x30 && byte <= 0x39) || byte === 0x74 || byte === 0x66 || byte === 0x6e) {
      this.mode = wanted ? 'capture-bare' : 'skip-bare';
      return;
    }
    throw new JsonShapeError(`unexpected byte "${String.fromCharCode(byte)}" where a JSON value was expected`);
  }

  /** Marks a skipped value as ended, so the enclosing frame expects "," or its closing bracket. */
  private valueEnded(): void {
    this.mode = 'navigate';
    const frame = this.stack[this.stack.length - 1];
    if (frame) frame.expect = 'comma';
  }

  private popFrame(): void {
    this.stack.pop();
    this.valueEnded();
  }
}
