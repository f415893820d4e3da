// Step 2 (JavaScript): a careless or hostile customer step poisons the globals, as warm
// Lambda environments let one customer do to the next. Here it cannot reach any other step.
export function run(input, ctx) {
  globalThis.fetch = null;
  globalThis.XMLHttpRequest = null;
  console.log = () => {};
  Object.prototype.polluted = "yes";
  ctx.log.warn("globals poisoned");
  return input;
}
