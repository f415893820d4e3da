"""A Python step: `run(input, ctx)` gets the previous step's output and returns the next input."""


def run(input, ctx):
    ctx.log.info(f"greeting {input['name']}")
    return {"greeting": f"Hello, {input['name']}!", "step": ctx.step, "attempt": ctx.attempt}
