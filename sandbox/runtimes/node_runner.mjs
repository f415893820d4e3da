// The JavaScript side of the step channel (see sandbox/protocol.py): one node process, already
// confined by the Python child that exec'd it, runs exactly one step and exits.
//
// fd 3 is the step channel: we say Ready, read one StepRequest, answer one StepResult.
// Frames are a 4-byte big-endian length and a msgpack payload.

import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { Raw, decode, encode } from "./msgpack.mjs";

const CHANNEL = 3;
const LOG_LINES_MAX = 1000;
const LOG_LINE_MAX = 4096;
const tmpdir = process.env.RUNNERD_TMPDIR || "/tmp";
const layers = (process.env.RUNNERD_LAYERS || "").split(",").filter(Boolean);
const outputMax = Number(process.env.RUNNERD_OUTPUT_MAX || 128 * 1024 * 1024);

function readExactly(n) {
  const buffer = Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    const count = fs.readSync(CHANNEL, buffer, got, n - got, null);
    if (count === 0) throw new Error(`channel closed after ${got} of ${n} bytes`);
    got += count;
  }
  return buffer;
}

function readFrame(max) {
  const length = readExactly(4).readUInt32BE(0);
  if (length > max) throw new Error(`frame of ${length} bytes exceeds the limit of ${max}`);
  return decode(readExactly(length));
}

function writeFrame(message) {
  const payload = encode(message);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(payload.length, 0);
  for (const part of [header, payload]) {
    let sent = 0;
    while (sent < part.length) sent += fs.writeSync(CHANNEL, part, sent, part.length - sent);
  }
}

function makeLog() {
  const lines = [];
  const add = (level) => (...args) => {
    if (lines.length < LOG_LINES_MAX) lines.push(`${level} ${args.map(String).join(" ")}`.slice(0, LOG_LINE_MAX));
  };
  const log = add("INFO");
  Object.assign(log, { debug: add("DEBUG"), info: add("INFO"), warn: add("WARNING"), warning: add("WARNING"), error: add("ERROR") });
  return { log, lines };
}

function isModule(filename, source) {
  if (filename.endsWith(".mjs")) return true;
  if (filename.endsWith(".cjs")) return false;
  return /^\s*export\s/m.test(source);
}

async function loadStep(request) {
  const extension = isModule(request.filename, request.source) ? ".mjs" : ".cjs";
  const file = path.join(tmpdir, `step-${process.pid}${extension}`);
  fs.writeFileSync(file, request.source);
  const mod = await import(pathToFileURL(file).href);
  const run = mod.run ?? mod.default?.run ?? (typeof mod.default === "function" ? mod.default : undefined);
  if (typeof run !== "function") throw new Error("the step exports no run(input, ctx)");
  return run;
}

function failure(type, message, started, lines) {
  return { type: "result", ok: false, output: null, error: { type, message }, logs: lines, duration_s: seconds(started) };
}

function seconds(started) {
  return Number(process.hrtime.bigint() - started) / 1e9;
}

async function runStep(request) {
  const started = process.hrtime.bigint();
  const { log, lines } = makeLog();
  let value;
  try {
    const run = await loadStep(request);
    const ctx = {
      execution_id: request.context?.execution_id ?? "",
      step: request.context?.step ?? "",
      attempt: request.context?.attempt ?? 1,
      tmpdir,
      log,
    };
    value = await run(request.input, ctx);
  } catch (err) {
    const message = err instanceof Error ? `${err.name}: ${err.message}\n${err.stack ?? ""}` : `thrown: ${String(err)}`;
    return failure("exception", message.trimEnd(), started, lines);
  }
  let output;
  try {
    output = encode(value);
  } catch (err) {
    return failure("exception", `output is not msgpack-serializable: ${err.message}`, started, lines);
  }
  if (output.length > Math.min(outputMax, request.output_max ?? outputMax)) {
    return failure("output_limit", `output of ${output.length} bytes exceeds the limit of ${request.output_max}`, started, lines);
  }
  return { type: "result", ok: true, output: new Raw(output), error: null, logs: lines, duration_s: seconds(started) };
}

function enterEnvironment(request) {
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, { PATH: "/usr/local/bin:/usr/bin:/bin", HOME: tmpdir, TMPDIR: tmpdir, LANG: "C.UTF-8" }, request.env ?? {});
}

function releaseStdio() {
  // Pipes are written synchronously by node on Linux, so nothing is pending; closing them lets
  // the caller see their end as soon as the result arrives.
  for (const fd of [1, 2]) {
    try { fs.closeSync(fd); } catch { /* already closed by the step */ }
  }
}

async function main() {
  writeFrame({ type: "ready", layers });
  const request = readFrame(outputMax + 64 * 1024 * 1024);
  if (request.type !== "request") throw new Error(`expected a request, got ${request.type}`);
  enterEnvironment(request);
  const result = await runStep(request);
  releaseStdio();
  writeFrame(result);
  process.exit(0);
}

main().catch((err) => {
  try {
    writeFrame({ type: "result", ok: false, output: null, error: { type: "protocol", message: String(err?.message ?? err) }, logs: [] });
  } catch { /* the channel is gone: the caller sees the exit */ }
  process.exit(72);
});
