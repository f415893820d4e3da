// A JavaScript step, the kind most integration code is: sync or async `run(input, ctx)`.
export async function run(input, ctx) {
  ctx.log.info(`transforming ${input.items.length} items`);
  return { total: input.items.reduce((sum, item) => sum + item.price, 0), count: input.items.length };
}
