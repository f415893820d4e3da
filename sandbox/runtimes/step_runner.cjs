// The JavaScript side of the step channel (see sandbox/protocol.py): run exactly one step in a
// process that is already confined, then leave. Used by both ways a JS step starts: forked from
// the node zygote (node_zygote.cjs) or as a node exec'd per step (node_runner.cjs).
//
// fd 3 is the step channel: we say Ready, read one StepRequest, answer one StepResult.
// Frames are a 4-byte big-endian length and a msgpack payload.
//
// CommonJS, not an ES module: the zygote must load this without libuv's thread pool (an ES
// module is read with fs.promises), whose threads would not exist in a forked child.

"use strict";

const fs = require("node:fs");
const path = require("node:path");
const Module = require("node:module");
const { Raw, decode, encode } = require("./msgpack.cjs");
const { describe } = require("./step_errors.cjs");
const { Fatal, makeLog } = require("./step_context.cjs");

const CHANNEL = 3;
const REQUEST_OVERHEAD = 64 * 1024 * 1024;

function readExactly(fd, n) {
  const buffer = Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    const count = fs.readSync(fd, buffer, got, n - got, null);
    if (count === 0) throw new Error(`channel closed after ${got} of ${n} bytes`);
    got += count;
  }
  return buffer;
}

function readFrame(fd, max) {
  const length = readExactly(fd, 4).readUInt32BE(0);
  if (length > max) throw new Error(`frame of ${length} bytes exceeds the limit of ${max}`);
  return decode(readExactly(fd, length));
}

function writeFrame(fd, message) {
  const payload = encode(message);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(payload.length, 0);
  for (const part of [header, payload]) {
    let sent = 0;
    while (sent < part.length) sent += fs.writeSync(fd, part, sent, part.length - sent);
  }
}

function isModule(filename, source) {
  if (filename.endsWith(".mjs")) return true;
  if (filename.endsWith(".cjs")) return false;
  return /^[ \t]*export\s/m.test(source); // [ \t], not \s: linear on many blank lines
}

// The step is compiled from its source as its author named it (stacks say `boom.mjs:2:18`),
// never written to a file: an ES module is imported from a data: URL (a file would be read
// through fs.promises, which starts libuv's thread pool, 4 threads, in every child), and a
// CommonJS one is compiled as node's own loader would, with `require` from the step's tmpdir.
// The author's file name, as stacks show it. Only letters, digits and a few marks: it goes into
// a sourceURL comment, which a line terminator (U+2028 too) would end, making it code.
function stepFilename(request) {
  return String(request.filename || "step.mjs").replace(/[^\p{L}\p{N}._\-@+/ ]/gu, "_").slice(0, 200);
}

async function loadStep(request, tmpdir) {
  const filename = stepFilename(request);
  const mod = isModule(filename, request.source) ? await importSource(request.source, filename) : compileCommonJS(request.source, filename, tmpdir, request.bundle);
  const run = mod.run ?? mod.default?.run ?? (typeof mod.default === "function" ? mod.default : undefined);
  if (typeof run !== "function") throw new Error("the step exports no run(input, ctx)");
  return run;
}

function importSource(source, filename) {
  const text = `${source}\n//# sourceURL=${filename}\n`;
  return import(`data:text/javascript;base64,${Buffer.from(text).toString("base64")}`);
}

// Compiled under its path in the tmpdir, which node 18 needs to resolve a dynamic import() from
// it; step_errors puts the author's name back in what they see. `require` finds node's builtins
// and, with a dependency bundle, the bundle's packages; nothing else of the disk's by name.
function compileCommonJS(source, filename, tmpdir, bundle) {
  const step = new Module(commonJSPath(filename, tmpdir), null);
  // No node_modules search from the tmpdir: without a filesystem view its parents include the
  // host's /tmp, where another step could plant a package for this one to require.
  step.paths = bundle ? [path.join(bundle, "node_modules")] : [];
  step._compile(source, step.id);
  return { run: step.exports?.run, default: step.exports };
}

function commonJSPath(filename, tmpdir) {
  return path.join(tmpdir, path.basename(filename));
}

function seconds(started) {
  return Number(process.hrtime.bigint() - started) / 1e9;
}

function failure(type, message, started, lines) {
  return { type: "result", ok: false, output: null, error: { type, message }, logs: lines, duration_s: seconds(started) };
}

// An error thrown in a callback or a promise nobody awaited ends the step as an exception,
// as one thrown by run() does (node's own handler would end the process without a result).
function escapedErrors() {
  let fail;
  const escaped = new Promise((_, reject) => { fail = reject; });
  escaped.catch(() => {});
  process.on("uncaughtException", (err) => fail(err));
  process.on("unhandledRejection", (err) => fail(err));
  return escaped;
}

async function runStep(request, config) {
  const started = process.hrtime.bigint();
  const { log, tail } = makeLog(writeFrame, config.channel);
  const escaped = escapedErrors();
  let value;
  let loaded = false;
  try {
    if (request.bundle) { // no require() lookup above the bundle (its real path, used from here on)
      const inside = (request.bundle = fs.realpathSync(request.bundle)) + path.sep, lookup = Module._nodeModulePaths;
      Module._nodeModulePaths = (from) => lookup(from).filter((p) => p.startsWith(inside));
    }
    const run = await Promise.race([loadStep(request, config.tmpdir), escaped]);
    loaded = true;
    const ctx = {
      execution_id: request.context?.execution_id ?? "",
      step: request.context?.step ?? "",
      attempt: request.context?.attempt ?? 1,
      tmpdir: config.tmpdir,
      log,
      Fatal,
      // An ES module is imported from a data: URL, from which node resolves no bare
      // specifier: it reaches its bundle's packages through this.
      require: request.bundle ? Module.createRequire(path.join(request.bundle, "node_modules", "_")) : undefined,
    };
    value = await Promise.race([run(request.input, ctx), escaped]);
  } catch (err) {
    const filename = stepFilename(request);
    const shown = describe(err, filename, request.source, commonJSPath(filename, config.tmpdir), config);
    // A source that does not compile fails the same way on every attempt.
    const fatal = err?.name === "Fatal" || (!loaded && err instanceof SyntaxError);
    return failure(fatal ? "fatal" : "exception", shown, started, tail());
  }
  let output;
  try {
    output = encode(value);
  } catch (err) {
    return failure("exception", `output is not msgpack-serializable: ${err.message}`, started, tail());
  }
  const limit = Math.min(config.outputMax, request.output_max ?? config.outputMax);
  if (output.length > limit) {
    return failure("output_limit", `output of ${output.length} bytes exceeds the limit of ${limit}`, started, tail());
  }
  return { type: "result", ok: true, output: new Raw(output), error: null, logs: tail(), duration_s: seconds(started) };
}

function enterEnvironment(request, tmpdir) {
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, { PATH: "/usr/local/bin:/usr/bin:/bin", HOME: tmpdir, TMPDIR: tmpdir, LANG: "C.UTF-8" }, request.env ?? {});
  process.chdir(tmpdir);
}

function releaseStdio(fds = [1, 2]) {
  // Pipes are written synchronously by node on Linux, so nothing is pending; closing them lets
  // the caller see their end as soon as the result arrives.
  for (const fd of fds) {
    try { fs.closeSync(fd); } catch { /* already closed by the step */ }
  }
}

// config: { layers: [names], tmpdir, outputMax, exit(code) }
async function serveOneStep(config) {
  try {
    writeFrame(CHANNEL, { type: "ready", layers: config.layers });
    const request = readFrame(CHANNEL, config.outputMax + REQUEST_OVERHEAD);
    if (request.type !== "request") throw new Error(`expected a request, got ${request.type}`);
    enterEnvironment(request, config.tmpdir);
    const result = await runStep(request, { ...config, channel: CHANNEL });
    releaseStdio();
    writeFrame(CHANNEL, result);
    config.exit(0);
  } catch (err) {
    try {
      writeFrame(CHANNEL, { type: "result", ok: false, output: null, error: { type: "protocol", message: String(err?.message ?? err) }, logs: [] });
    } catch { /* the channel is gone: the caller sees the exit */ }
    config.exit(72);
  }
}

// For step_rehearsal.cjs, which runs this path in the node zygote.
module.exports = { serveOneStep, parts: { decode, encode, enterEnvironment, readExactly, releaseStdio, runStep, writeFrame } };
