// A node started for one step (the path without the node zygote): the Python child that exec'd
// it confined it first, and passed what the step runner needs in the environment.

"use strict";

const { serveOneStep } = require("./step_runner.cjs");

serveOneStep({
  layers: (process.env.RUNNERD_LAYERS || "").split(",").filter(Boolean),
  tmpdir: process.env.RUNNERD_TMPDIR || "/tmp",
  outputMax: Number(process.env.RUNNERD_OUTPUT_MAX || 128 * 1024 * 1024),
  pids: Number(process.env.RUNNERD_PIDS || 0),
  network: Boolean(process.env.RUNNERD_NETWORK),
  exit: (code) => process.exit(code),
});
