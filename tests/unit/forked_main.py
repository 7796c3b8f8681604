"""A ``main(argv)`` for the fork server's test: writes what it got and a random draw, then exits or sleeps."""

import json
import random
import sys
import time


def main(argv: list[str]) -> None:
    out, action = argv[0], argv[1]
    with open(out, "w") as file:
        json.dump({"argv": argv, "draw": random.random()}, file)
    print(f"child says {action}", flush=True)
    if action == "sleep":
        time.sleep(60)
    sys.exit(int(action))
