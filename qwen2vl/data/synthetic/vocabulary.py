"""Word lists for the synthetic images (all written for this project) and random-string makers."""

from __future__ import annotations

import random
import string

WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt bench bike
bird blue boat body bone book boot born boss bowl box bread brick bridge brown brush cake call calm
camp card care cart case cash cast cat cell chain chair chalk cheap chess chin city clay clean clock
cloud coal coast coat code coin cold cook cool copper corn cost cotton crab cream crew crop crowd cup
dark dawn day deck deep desk dish door dust duty earth east easy edge egg engine even face farm fast
fear field film fire fish flag flat floor flour fog food foot fork form fox frame free fresh frog
fruit fuel game gate gift glass glove goat gold golf good grain grape grass gray green grid ground
hall hand harbor hat head heat hill hole home honey hook horse hotel hour house ice idea inch iron
island jacket jam jar joke juice jump key king kite knee knife lake lamp land lane leaf left lemon
letter light lime line lion list lock long loud lunch map maple market meal metal milk mint moon
morning moss mouse music nail name navy neck nest net night noon north nose note oak ocean office
oil olive open orange oven owl page paint palm paper park path peach pear pen pencil pepper piano
pilot pine pink pipe plain plant plate pond port post pot queen quick quiet rail rain red ring river
road rock roof room root rope rose round salt sand scale school sea seed shelf ship shoe shop silk
silver sink sky slow snow soap sock soft soup south spoon spring square stair star steam steel stone
storm street sugar summer sun table tail tea tent test tiger tile toast tower town toy track train
tree truck tulip van vase wall water wave west wheat wheel white wind window winter wolf wood wool
yard year yellow zebra zinc
""".split()

FIRST_NAMES = """
Anna Ben Carla David Elena Farid Grace Hugo Ines Jonas Kara Liam Maya Nora Omar Paula Quinn Rosa
Sam Tara Umar Vera Will Xena Yusuf Zoe Leo Mia Ivan Lena
""".split()

LAST_NAMES = """
Berg Costa Diaz Evans Fischer Garcia Hansen Ito Jensen Klein Lopez Moreau Novak Olsen Park Quist
Rossi Silva Tanaka Urban Vogel Walker Young Zhang Brown Green Hill Stone Wood Lee
""".split()

GROCERIES = """
milk bread eggs butter cheese apples bananas rice pasta coffee tea sugar flour juice yogurt
tomatoes onions carrots potatoes lemons soap salt pepper honey jam water cereal beans chicken fish
""".split()

SHOP_KINDS = ["MARKET", "SHOP", "CAFE", "STORE", "BAKERY", "DELI", "GROCER", "KIOSK"]

SIGN_WORDS = """
STOP EXIT ENTRANCE OPEN CLOSED PARKING NORTH SOUTH EAST WEST CITY CENTRE STATION AIRPORT HARBOR
PLATFORM GATE ROAD LANE STREET BRIDGE TUNNEL MUSEUM LIBRARY HOSPITAL SCHOOL PARK BEACH MARKET
HOTEL SLOW DANGER NO ENTRY TAXI BUS ONLY PRIVATE OFFICE FLOOR LEVEL ZONE
""".split()

DOC_TITLES = ["INVOICE", "RECEIPT", "REPORT", "MEMO", "NOTICE", "ORDER", "LETTER", "SUMMARY",
              "FORM", "TICKET", "STATEMENT", "CERTIFICATE"]

CHART_TITLES = ["Sales", "Visitors", "Scores", "Orders", "Rainfall", "Votes", "Downloads", "Sightings",
                "Tickets", "Harvest"]


def word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def code(rng: random.Random) -> str:
    """A random identifier such as ``K7-39QX`` or ``B214``."""
    shape = rng.choice(["LD-DDLL", "LLDD", "LDDD", "LL-DDDD", "DDDD-LL", "LLL-DDD", "DLDL"])
    return "".join(rng.choice(string.ascii_uppercase) if c == "L" else rng.choice(string.digits) if c == "D"
                   else c for c in shape)


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def date(rng: random.Random) -> str:
    y, m, d = rng.randint(2001, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"])


def amount(rng: random.Random, lo: float = 0.5, hi: float = 99.0) -> str:
    return f"{rng.uniform(lo, hi):.2f}"


def phone(rng: random.Random) -> str:
    return f"555-{rng.randint(0, 9999):04d}"


# Document fields: the label printed on the page (also the noun in the question) and a value maker.
FIELDS = {
    "invoice number": lambda rng: f"INV-{rng.randint(1000, 99999)}",
    "date": date,
    "name": person,
    "reference": code,
    "account": lambda rng: str(rng.randint(100000, 9999999)),
    "phone": phone,
    "order number": lambda rng: str(rng.randint(1000, 999999)),
    "room": lambda rng: rng.choice("ABCDEFG") + str(rng.randint(100, 499)),
    "code": code,
    "city": lambda rng: word(rng).capitalize() + rng.choice(["ton", "ville", "burg", "field", "port"]),
    "total": lambda rng: "$" + amount(rng, 5, 999),
}
