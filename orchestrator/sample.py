"""Realistic sample order records as JSON Lines, for the demo, the tests and the benchmarks.

Orders are 0.5-2 KB each: line items (an array of objects), addresses, totals, and for contact
scope a ``contactIdentity`` by email. The output is deterministic for a given seed. Contacts whose
email ends in ``.invalid`` are "unknown" to the bundled simulator, so a fraction of them exercises
per-record API failures; a fraction of bad lines exercises local validation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

from orchestrator import errors

__all__ = ["UNKNOWN_CONTACT_DOMAIN", "generate_orders"]

UNKNOWN_CONTACT_DOMAIN = "unknown.invalid"

_PRODUCTS = (
    ("Everyday Cotton T-Shirt", "apparel", 14.99),
    ("Merino Wool Jumper", "apparel", 59.0),
    ("Slim Fit Chinos", "apparel", 39.5),
    ("Waterproof Trail Jacket", "outdoor", 129.0),
    ("Insulated Steel Bottle 750ml", "outdoor", 22.0),
    ("Ultralight Camping Stove", "outdoor", 44.95),
    ("Ceramic Pour-Over Coffee Set", "kitchen", 34.0),
    ("Cast Iron Skillet 26cm", "kitchen", 42.5),
    ("Bamboo Chopping Board", "kitchen", 18.75),
    ("Noise Cancelling Headphones", "electronics", 199.0),
    ("USB-C Charging Hub", "electronics", 49.99),
    ("Smart LED Desk Lamp", "electronics", 64.0),
    ("Organic Face Moisturiser", "beauty", 27.5),
    ("Natural Bristle Hair Brush", "beauty", 16.0),
    ("Yoga Mat Pro 6mm", "fitness", 55.0),
    ("Adjustable Dumbbell Pair", "fitness", 149.0),
)
_CITIES = (
    ("London", "GB", "GBP"),
    ("Manchester", "GB", "GBP"),
    ("Dublin", "IE", "EUR"),
    ("Berlin", "DE", "EUR"),
    ("Paris", "FR", "EUR"),
    ("New York", "US", "USD"),
    ("Austin", "US", "USD"),
    ("Sydney", "AU", "AUD"),
    ("Singapore", "SG", "SGD"),
)
_STREETS = ("High Street", "Station Road", "Church Lane", "Park Avenue", "Mill Road", "Main St")
_STATUSES = ("complete", "complete", "complete", "processing", "shipped", "refunded")
_CHANNELS = ("web", "web", "app", "store", "marketplace")
_PAYMENTS = ("card", "card", "paypal", "applepay", "klarna")
_PROMOS = ("SPRING10", "FREESHIP", "WELCOME5", "VIP20")


def _order(rng: random.Random, number: int) -> dict[str, object]:
    city, country, currency = rng.choice(_CITIES)
    items = []
    subtotal = 0.0
    for line_no in range(1, rng.randint(1, 10) + 1):
        name, category, price = rng.choice(_PRODUCTS)
        quantity = rng.choice((1, 1, 1, 2, 2, 3))
        line_total = round(price * quantity, 2)
        subtotal += line_total
        items.append(
            {
                "lineNo": line_no,
                "sku": f"{category[:3].upper()}-{rng.randrange(10_000, 99_999)}",
                "name": name,
                "category": category,
                "quantity": quantity,
                "unitPrice": price,
                "lineTotal": line_total,
            }
        )
    shipping = 0.0 if subtotal > 50 else 4.95
    tax = round(subtotal * 0.2, 2)
    day = rng.randint(1, 28)
    order: dict[str, object] = {
        "orderId": f"ORD-{number:09d}",
        "status": rng.choice(_STATUSES),
        "placedAt": f"2025-{rng.randint(1, 12):02d}-{day:02d}T{rng.randint(0, 23):02d}:"
        f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
        "channel": rng.choice(_CHANNELS),
        "currency": currency,
        "subtotal": round(subtotal, 2),
        "shipping": shipping,
        "tax": tax,
        "total": round(subtotal + shipping + tax, 2),
        "items": items,
        "shippingAddress": {
            "line1": f"{rng.randint(1, 250)} {rng.choice(_STREETS)}",
            "city": city,
            "postcode": f"{rng.choice('ABCDEFGHKLMNPRSTW')}{rng.randint(1, 99)}"
            f" {rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
            f"{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}",
            "country": country,
        },
        "paymentMethod": rng.choice(_PAYMENTS),
        "discountCodes": rng.sample(_PROMOS, rng.choice((0, 0, 0, 1, 2))),
        "giftWrap": rng.random() < 0.1,
    }
    return order


def _bad_line(rng: random.Random, record: dict[str, object], good: bytes) -> bytes:
    contact = "contactIdentity" in record
    kind = rng.randrange(6 if contact else 5)
    if kind == 0:  # json-syntax: a truncated line
        return good[: len(good) // 2]
    bad = dict(record)
    if kind == 1:  # key-missing
        del bad["key"]
    elif kind == 2:  # json-nested-array
        bad["json"] = {"orderId": record["key"], "dimensions": [[10, 20], [30, 40]]}
    elif kind == 3:  # unknown-field
        bad["comment"] = "misplaced"
    elif kind == 4:  # json-type
        bad["json"] = "not an object"
    else:  # contact-identity-missing
        del bad["contactIdentity"]
    return orjson.dumps(bad)


def generate_orders(
    n: int | None,
    *,
    seed: int = 0,
    scope: str = "contact",
    unknown_contact_fraction: float = 0.0,
    bad_fraction: float = 0.0,
    duplicate_fraction: float = 0.0,
    customers: int | None = None,
) -> Iterator[bytes]:
    """Generate sample order records as JSON Lines, each line ending with ``b"\\n"``.

    The result is deterministic for a given seed and settings, ready for ``file.writelines``.

    Args:
        n: how many lines to generate; ``None`` for an endless stream.
        seed: the random seed.
        scope: ``"contact"`` adds a ``contactIdentity`` (email) to each order; ``"account"`` puts
            the email inside ``json`` instead.
        unknown_contact_fraction: the share of orders (contact scope) whose email ends in
            ``.invalid``: contacts the simulator does not know, so the API rejects those records.
        bad_fraction: the share of lines that break a local record rule (bad JSON, missing key,
            nested array, unknown field, json not an object, missing contactIdentity).
        duplicate_fraction: the share of orders that repeat an earlier order's key (an update of
            the same order: the last occurrence must win).
        customers: how many distinct known customers to draw emails from (default: about a third
            of ``n``, at least 1).
    """
    for name, fraction in (
        ("unknown_contact_fraction", unknown_contact_fraction),
        ("bad_fraction", bad_fraction),
        ("duplicate_fraction", duplicate_fraction),
    ):
        if not 0.0 <= fraction <= 1.0:
            raise errors.ConfigError(f"{name} must be between 0 and 1, not {fraction}")
    if scope not in ("account", "contact"):
        raise errors.ConfigError(f"scope must be 'account' or 'contact', not {scope!r}")
    contact = scope == "contact"
    rng = random.Random(seed)
    pool = customers if customers is not None else max(1, (n or 30_000) // 3)
    produced = 0
    while n is None or produced < n:
        produced += 1
        number = produced
        if duplicate_fraction and produced > 1 and rng.random() < duplicate_fraction:
            number = rng.randint(1, produced - 1)
        key = f"order-{number:09d}"
        # a fixed customer per order number, so a repeated order keeps its contact
        customer = (number * 2_654_435_761) % pool
        if contact and (customer * 40_503 % 10_007) / 10_007 < unknown_contact_fraction:
            email = f"customer{customer}@{UNKNOWN_CONTACT_DOMAIN}"
        else:
            email = f"customer{customer}@example.com"
        order = _order(rng, number)
        record: dict[str, object]
        if contact:
            record = {
                "key": key,
                "contactIdentity": {"identifier": "email", "value": email},
                "json": order,
            }
        else:
            order["customerEmail"] = email
            record = {"key": key, "json": order}
        line = orjson.dumps(record)
        if bad_fraction and rng.random() < bad_fraction:
            line = _bad_line(rng, record, line)
        yield line + b"\n"
