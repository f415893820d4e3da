// The node zygote: node started once, with the step runner loaded, forking one confined child
// per JavaScript step (sandbox/runtimes/node_fork.c does the fork and the confinement).
//
//   node --single-threaded --v8-pool-size=0 node_zygote.cjs ADDON CONTROL_FD HOST_NET_FD
//
// The zygote loads only the runner: whatever it loaded or ran, every child would share. It
// never calls Math.random or crypto (their state would be copied into every child), and it
// never touches libuv's thread pool (see step_runner.cjs).

"use strict";

const crypto = require("node:crypto");
const vm = require("node:vm");
const { rehearse } = require("./step_rehearsal.cjs");
const { serveOneStep } = require("./step_runner.cjs");

const [addonPath, controlFd, hostNetFd] = process.argv.slice(2);
const threadsAtStart = threads();
const addon = require(addonPath);

warm().then(() => {
  // Only a step child gets past this line, confined, with its event loop its own.
  const plan = JSON.parse(addon.serve(Number(controlFd), Number(hostNetFd)));
  freshProcessState();
  serveOneStep({
    layers: plan.layers, tmpdir: plan.tmpdir, outputMax: plan.output_max, pids: plan.pids, network: plan.network, exit: addon.exit,
  });
});

// Compile here, once, what every child would otherwise compile for itself: the runner's path
// from Ready to result, run on harmless ends (see rehearse), with the ES module loader's path
// for a step's source.
async function warm() {
  await rehearse({ layers: [], outputMax: 1024 * 1024 });
  // libuv's thread pool, once started here, would be missing in every child (its threads do
  // not survive a fork): refuse to serve, and JS steps start a node each.
  if (threads() !== threadsAtStart) throw new Error("the warm-up started threads");
}

function threads() {
  return Number(require("node:fs").readFileSync("/proc/self/status", "utf8").match(/^Threads:\s+(\d+)/m)[1]);
}

// What a copy of the zygote would otherwise share with every other child.
function freshProcessState() {
  process.argv.splice(2); // the zygote's own arguments (its addon, its fds) are not the step's
  // process.pid was read once, when node started: it is the zygote's.
  Object.defineProperty(process, "pid", { value: addon.getpid(), writable: false, enumerable: true, configurable: true });
  // V8's Math.random state is the zygote's in every child: the same sequence for each step.
  // This one draws from the kernel (through OpenSSL, which reseeds itself in a new process).
  const pool = new Uint32Array(1024);
  let next = pool.length;
  Object.defineProperty(Math, "random", {
    value: function random() {
      if (next + 2 > pool.length) { crypto.getRandomValues(pool); next = 0; }
      const high = pool[next++] >>> 5; // 27 bits
      const low = pool[next++] >>> 6;  // 26 bits
      return (high * 67108864 + low) / 9007199254740992;
    },
    writable: true, enumerable: false, configurable: true,
  });
  // node's own exit would join threads that only the zygote has: leave before it does, by
  // process.exit() and when the event loop runs out alike.
  process.reallyExit = (code) => addon.exit(code ?? 0);
  process.on("exit", (code) => addon.exit(code ?? process.exitCode ?? 0));
  // A context made by `vm` is seeded from V8's generator, whose state is the zygote's too.
  const seeded = (context) => {
    if (context && typeof context === "object" && vm.isContext(context)) {
      Object.defineProperty(vm.runInContext("Math", context), "random", {
        value: Math.random, writable: true, enumerable: false, configurable: true,
      });
    }
    return context;
  };
  const original = vm.createContext;
  const wrapped = {
    createContext(...args) { return seeded(original.apply(this, args)); },
    runInNewContext(code, context, options) {
      return vm.runInContext(code, vm.createContext(context ?? {}), options);
    },
    scriptRunInNewContext(context, options) {
      return this.runInContext(vm.createContext(context ?? {}), options);
    },
  };
  vm.createContext = wrapped.createContext;
  vm.runInNewContext = wrapped.runInNewContext;
  vm.Script.prototype.runInNewContext = wrapped.scriptRunInNewContext;
}
