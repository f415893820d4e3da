"""Step 1 (Python): "fetch" an order feed and parse it (XML, as integration feeds often are)."""

import xml.etree.ElementTree as ElementTree

FEED = """<orders>{}</orders>"""


def run(input, ctx):
    count = input.get("orders", 5)
    xml = FEED.format("".join(f'<order id="{i}" price="{10 + i}.50"/>' for i in range(count)))
    orders = [
        {"id": int(node.get("id")), "price": float(node.get("price"))}
        for node in ElementTree.fromstring(xml)
    ]
    ctx.log.info(f"parsed {len(orders)} orders")
    return {"orders": orders}
