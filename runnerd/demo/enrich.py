"""Step 4 (Python): add tax, and (badly) monkey-patch builtins on the way out."""

import builtins
import json


def run(input, ctx):
    input["total_with_tax"] = round(input["total"] * 1.2, 2)
    builtins.len = lambda value: 0
    json.dumps = None
    return input
