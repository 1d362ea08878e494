"""The image's self-check: the bundled model loads (SHA-256 checked) and a request is answered.

Runs the real app in process, with no server and no network: once at build
time (a broken image fails its build) and in `make test-deploy` under
`--network none`. Exits non-zero with one line when anything is wrong.
"""

import dataclasses
import sys

from app import create_app, load_config

CHUNKS = [
    {"id": "a", "text": "The river flooded the valley after three days of rain.", "score": 0.9},
    {"id": "b", "text": "After three days of rain, the river flooded the valley.", "score": 0.8},
    {"id": "c", "text": "Invoices are due within thirty days of delivery.", "score": 0.7},
]


def main() -> int:
    config = dataclasses.replace(load_config(), cache_url="none")  # the model itself, and no store in the image
    response = create_app(config).test_client().post("/v1/dedupe", json={"chunks": CHUNKS})
    body = response.get_json(silent=True) or {}
    kept = [c["id"] for c in body.get("chunks", [])]
    if response.status_code != 200 or kept != ["a", "c"]:
        print(f"selfcheck failed: {response.status_code} {body}", file=sys.stderr)
        return 1
    print(f"selfcheck ok: kept {kept} of 3 chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
