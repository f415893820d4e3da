// Step 3 (JavaScript): the next customer's step; it sees pristine globals.
export async function run(input, ctx) {
  const isolation = {
    fetch_intact: typeof fetch === "function",
    console_intact: console.log.name === "log",
    prototype_clean: ({}).polluted === undefined,
  };
  const total = input.orders.reduce((sum, order) => sum + order.price, 0);
  return { orders: input.orders, total, count: input.orders.length, isolation };
}
