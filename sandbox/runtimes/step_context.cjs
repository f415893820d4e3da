// What a JavaScript step gets besides its input: `ctx.log`, and `ctx.Fatal`. (The rest of ctx
// is plain values, made in step_runner.cjs.)

"use strict";

const LOG_LINES_MAX = 1000;
const LOG_LINE_MAX = 4096;

// ctx.log: each line goes to the caller as it is written (a `log` frame), so that the lines
// outlive a step that times out or is killed; the result carries only how many were cut.
function makeLog(writeFrame, channel) {
  let sent = 0;
  let cut = 0;
  const add = (level) => (...args) => {
    if (sent >= LOG_LINES_MAX - 1) { cut += 1; return; }
    sent += 1;
    writeFrame(channel, { type: "log", lines: [`${level} ${args.map(String).join(" ")}`.slice(0, LOG_LINE_MAX)] });
  };
  const log = add("INFO");
  Object.assign(log, { debug: add("DEBUG"), info: add("INFO"), warn: add("WARNING"), warning: add("WARNING"), error: add("ERROR") });
  return { log, tail: () => (cut ? [`[${cut} more log lines cut]`] : []) };
}

// `throw new ctx.Fatal("why")` (or any error named "Fatal"): retrying cannot help, so the
// execution fails at once. The same contract as a Python step's runnerd.step.Fatal.
class Fatal extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = "Fatal";
  }
}

module.exports = { Fatal, makeLog };
