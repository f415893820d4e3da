// What a step's author sees of an error: node's own uncaught-error form, pointed at their file.
//
//   boom.mjs:4
//     return input.deep.value;
//                       ^
//
//   TypeError: Cannot read properties of undefined (reading 'value')
//       at helper (boom.mjs:4:23)
//       at run (boom.mjs:9:31)
//
// The message appears once, the runner's and node's internal frames are dropped, and the line
// shown is the first of the stack that is in the author's file. V8 gives an ES module's syntax
// error no position at all; acorn (vendor/acorn.js, MIT) finds it, parsed only then. Its source
// is read when this module loads, so that a forked child, whose view may not hold this
// directory, has it too.

"use strict";

const fs = require("node:fs");
const path = require("node:path");
const Module = require("node:module");

const ACORN_SOURCE = fs.readFileSync(path.join(__dirname, "vendor", "acorn.js"), "utf8");
const RUNTIME_FILES = /[/(](step_runner|step_errors|node_runner|node_zygote|msgpack)\.cjs:|\(node:internal\/|^\s*at node:internal\//;

// The same words as a Python step's (sandbox/runtimes/__init__.py).
const NETWORK_HINT = 'a step gets it with "network": true in its integration, or run-step --network';
const PIDS_HINT = "processes and threads count alike; raise limits.pids (run-step --pids) for more";

// compiledAs: the path a CommonJS step was compiled under, shown as the author's file name.
// limits: { pids, network } of this step, to name a limit the error comes from.
function describe(err, filename, source, compiledAs, limits = {}) {
  if (!(err instanceof Error)) return `thrown: ${String(err)}`;
  const reached = limitReached(err, limits);
  const text = described(err, filename, source, compiledAs);
  return reached ? `${reached[0]} (it raised ${err.name}: ${err.message}); ${reached[1]}\n${text}` : text;
}

function described(err, filename, source, compiledAs) {
  const heading = named(`${err.name}: ${err.message}`, filename, compiledAs);
  const stack = named(typeof err.stack === "string" ? err.stack : heading, filename, compiledAs);
  const frames = stack.split("\n").filter((line) => /^\s+at /.test(line) && !RUNTIME_FILES.test(line));
  let where = err instanceof SyntaxError ? syntaxPosition(stack, filename, source) : null;
  where ??= firstFrameIn(frames, filename);
  const shown = where ? pointAt(filename, source, where) : "";
  return `${shown}${heading}${frames.length ? `\n${frames.join("\n")}` : ""}`;
}

// The names the step was compiled under, as the author's file name. The data: URL an ES module
// step was imported from is its whole source, which a resolution error would quote.
function named(text, filename, compiledAs) {
  return text.split(compiledAs).join(filename).replace(/data:text\/javascript;base64,[A-Za-z0-9+/=]*/g, filename);
}

// node already puts "file:line\ncode\n   ^\n\n" before a script's syntax error (CommonJS).
function syntaxPosition(stack, filename, source) {
  const decorated = stack.match(new RegExp(`^${escape(filename)}:(\\d+)\\n`));
  if (decorated) return { line: Number(decorated[1]), column: caretColumn(stack) };
  try {
    parser().parse(source, { ecmaVersion: "latest", sourceType: "module", allowHashBang: true, allowAwaitOutsideFunction: true });
  } catch (err) {
    if (err?.loc) return { line: err.loc.line, column: err.loc.column + 1 };
  }
  return null;
}

function caretColumn(stack) {
  const caret = stack.split("\n")[2]?.indexOf("^");
  return caret >= 0 ? caret + 1 : 1;
}

function firstFrameIn(frames, filename) {
  const pattern = new RegExp(`[ (]${escape(filename)}:(\\d+):(\\d+)\\)?$`);
  for (const frame of frames) {
    const found = frame.match(pattern);
    if (found) return { line: Number(found[1]), column: Number(found[2]) };
  }
  return null;
}

function pointAt(filename, source, { line, column }) {
  const text = String(source).split("\n")[line - 1];
  if (text === undefined) return `${filename}:${line}\n\n`;
  const shown = text.replace(/\r$/, "").slice(0, 400);
  const pad = shown.slice(0, Math.max(0, column - 1)).replace(/[^\t]/g, " ");
  return `${filename}:${line}\n${shown}\n${pad}^\n\n`;
}

// What was reached, and what to do about it; null when no limit or policy explains the error.
// A refused fork is EAGAIN from a spawn; a refused socket, with network off, is seccomp's EPERM
// (or an unreachable network, a failed name lookup), also inside fetch's "fetch failed".
function limitReached(err, limits) {
  for (let current = err, depth = 0; current && depth < 8; current = current.cause, depth++) {
    const code = current.code;
    const syscall = String(current.syscall ?? "");
    if (code === "EAGAIN" && syscall.startsWith("spawn")) {
      return [limits.pids ? `pids limit of ${limits.pids} reached` : "pids limit reached", PIDS_HINT];
    }
    const refused = ["EPERM", "EACCES", "ENETUNREACH", "EAI_AGAIN", "ENOTFOUND"].includes(code);
    if (refused && !limits.network && /^(connect|socket|bind|getaddrinfo|query)/.test(syscall)) {
      return ["network is off for this step", NETWORK_HINT];
    }
  }
  return null;
}

let acorn;
function parser() {
  if (!acorn) {
    const loaded = new Module("acorn.js", null);
    loaded._compile(ACORN_SOURCE, "acorn.js");
    acorn = loaded.exports;
  }
  return acorn;
}

function escape(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

module.exports = { describe };
