"""A steady well-formed client, run as its own process by the attack and soak tests so that the
attackers' Python threads (and their GIL) do not sit between it and its clock.

    python latency_probe.py PORT

Sends one small greedy chat completion after another over one keep-alive connection (a short
pause between them) until its stdin closes, then prints a JSON list of
`[start, end, status, completion_tokens]`, times in `time.monotonic()` seconds (CLOCK_MONOTONIC,
the same clock as the test's), status 0 for a request that failed on the wire."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

BODY = json.dumps(
    {
        "messages": [{"role": "user", "content": "Say something short about cats."}],
        "max_tokens": 8,
        "temperature": 0,
    }
).encode()
PAUSE_S = 0.02


def main() -> None:
    port = int(sys.argv[1])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    samples = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        start = time.monotonic()
        status, tokens = 0, 0
        try:
            conn.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            status = response.status
            if status == 200:
                tokens = json.loads(data)["usage"]["completion_tokens"]
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        samples.append([start, time.monotonic(), status, tokens])
        stop.wait(PAUSE_S)
    conn.close()
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
