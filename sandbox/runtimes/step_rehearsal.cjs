// The node zygote runs a child's path here before it serves, on harmless ends (/dev/null for
// the channel and stdio, /dev/zero to read from, steps of its own), so that V8 compiles it once
// there: V8 compiles a function when it first runs, and each child would otherwise compile all
// of this anew. Nothing here touches a host file or libuv's thread pool, and the zygote's
// environment, working directory and listeners are left as they were.

"use strict";

const fs = require("node:fs");
const { parts } = require("./step_runner.cjs");

const { decode, encode, enterEnvironment, readExactly, releaseStdio, runStep, writeFrame } = parts;

const REHEARSALS = [
  ["rehearsal.mjs", "export async function run(input, ctx) { ctx.log.info('a', 1); await null; return { got: input }; }"],
  ["rehearsal.cjs", "exports.run = (input, ctx) => { ctx.log.warn('b'); return [input]; };"],
  ["rehearsal-failing.mjs", "export default function () { throw new TypeError('rehearsed'); }"],
];

async function rehearse(config) {
  const sink = fs.openSync("/dev/null", "w");
  const source = fs.openSync("/dev/zero", "r");
  const cwd = process.cwd();
  const env = { ...process.env };
  try {
    for (const [filename, code] of REHEARSALS) {
      writeFrame(sink, { type: "ready", layers: config.layers });
      readExactly(source, 4);
      const request = decode(encode({
        type: "request", source: code, filename, input: { a: [1, 2.5, "b"] }, env: {},
        context: { execution_id: "e", step: "s", attempt: 1 }, output_max: config.outputMax,
      }));
      enterEnvironment(request, cwd);
      const limits = { pids: 16, network: false };
      writeFrame(sink, await runStep(request, { tmpdir: cwd, outputMax: config.outputMax, channel: sink, ...limits }));
    }
    releaseStdio([fs.openSync("/dev/null", "r")]);
  } finally {
    for (const key of Object.keys(process.env)) delete process.env[key];
    Object.assign(process.env, env);
    process.removeAllListeners("uncaughtException");
    process.removeAllListeners("unhandledRejection");
    fs.closeSync(sink);
    fs.closeSync(source);
  }
}

module.exports = { rehearse };
